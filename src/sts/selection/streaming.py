"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.selection.base import SelectionPolicy, register


@register
class StreamingPolicy(SelectionPolicy):
    """Attention sinks plus the most recent rows: the whole budget past the sinks is the window."""

    name = "streaming"

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return recency as the score, so top-k fills the budget with the latest rows."""
        b, hkv = k_cache.shape[:2]
        n = int(start_pos.max())
        return torch.arange(n, device=k_cache.device, dtype=torch.float32).expand(b, hkv, n)
