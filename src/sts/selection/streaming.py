"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.selection.base import SelectionPolicy, register


def streaming_rows(start_pos: Tensor, budget: int, sink: int, n_kv_heads: int) -> Tensor:
    """Return ``[B, Hkv, budget]`` rows in rank order: the first ``sink`` context rows of each sequence, then its latest
    ``budget - sink`` newest first (so a prefix is a smaller budget's choice). A context that fits the budget is read
    whole; the slots past it hold ``start_pos[b]`` (invalid)."""
    sink = min(sink, budget)
    col = torch.arange(budget, device=start_pos.device).view(1, budget)
    ctx = start_pos.view(-1, 1)
    latest = ctx - 1 - (col - sink)
    rows = torch.where(col < sink, col, torch.where(latest >= sink, latest, ctx))
    return rows.unsqueeze(1).expand(-1, n_kv_heads, -1)


@register
class StreamingPolicy(SelectionPolicy):
    """Attention sinks plus the most recent rows: the whole budget past the sinks is the window."""

    name = "streaming"
    graph_safe = True

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return recency as the score, so top-k fills the budget with the latest rows."""
        b, hkv = k_cache.shape[:2]
        n = int(start_pos.max())
        return torch.arange(n, device=k_cache.device, dtype=torch.float32).expand(b, hkv, n)

    def select(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the same rows as top-k of :meth:`scores`, computed directly (no top-k, no host sync)."""
        return streaming_rows(start_pos, self.budget, self.config.sink, k_cache.shape[1])
