"""Sparse prefill: the draft's prefill attention picks, per target head, which key blocks each prompt
chunk of the target attends to (block level; the sink block and the local blocks are always kept).

Both models read the prompt chunk by chunk; the draft goes first on each chunk, its queries of
the mapped layers score the earlier blocks (through the STS head mapping), and the target's
chunk then attends to the chosen blocks plus, causally, the chunk itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sts.attention import reference
from sts.attention.backend import AttentionFn, QueryRecorder, chunk_attention
from sts.models.transformer import Transformer
from sts.errors import STSError
from sts.selection.base import RoundContext, SelectionConfig, topk_rows
from sts.selection.sts import STSPolicy


@dataclass(frozen=True)
class PrefillConfig:
    """Sparse prefill settings: ``budget`` context rows per target KV head, chosen ``block`` rows at a time."""

    budget: int = 1024
    block: int = 64

    def __post_init__(self) -> None:
        if self.block < 1:
            raise STSError(f"prefill block must be >= 1 row, got {self.block}")
        if self.budget < 2 * self.block:
            raise STSError(f"prefill budget ({self.budget}) must hold at least two blocks of {self.block}")


class BlockAttention:
    """Attention of a prefill chunk over precomputed rows per layer (dense where a layer has none)."""

    def __init__(self, rows: dict[int, Tensor | None]) -> None:
        self.rows = rows

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the chunk's attention over its layer's chosen rows and, causally, itself."""
        rows = self.rows.get(layer)
        if rows is None:
            return reference.dense_attention(q, k_cache, v_cache, start_pos)
        return reference.sparse_attention(q, k_cache, v_cache, start_pos, rows)


def block_rows(row_scores: Tensor, start_pos: Tensor, config: PrefillConfig, sink: int, window: int) -> Tensor:
    """Return ``[B, H, budget]`` rows: whole blocks ranked by their best row score, sink and local blocks forced."""
    b, h, n = row_scores.shape
    blk = config.block
    n_blocks = -(-n // blk)
    padded = torch.nn.functional.pad(row_scores, (0, n_blocks * blk - n), value=float("-inf"))
    block_scores = padded.view(b, h, n_blocks, blk).amax(-1)
    filled = -(-start_pos // blk)  # blocks holding any context row
    chosen = topk_rows(block_scores, filled, config.budget // blk, max(1, -(-sink // blk)), max(1, -(-window // blk)))
    rows = chosen.unsqueeze(-1) * blk + torch.arange(blk, device=chosen.device)
    # Rows of invalid blocks, or past the context inside the last block, are >= start_pos: ignored.
    return torch.where(chosen.unsqueeze(-1) < filled.view(b, 1, 1, 1), rows, n_blocks * blk + blk).flatten(2)


def sparse_prefill(
    target: Transformer, draft: Transformer, slot: int, prompt: Sequence[int], policy: STSPolicy,
    config: PrefillConfig, selection: SelectionConfig, chunk: int,
) -> Tensor:
    """Return the target's logits ``[1, V]`` after ``prompt``, read into batch slot ``slot`` of both models'
    caches chunk by chunk: the draft reads each chunk first, and the target's chunk attends to the
    key blocks its queries' mapped scores rank best (plus, causally, itself)."""
    recorder = QueryRecorder(policy.mapping.draft_layers())
    device = target.embed_tokens.weight.device
    ids = torch.tensor(prompt, device=device).view(1, -1)
    for start in range(0, len(prompt), chunk):
        part = ids[:, start : start + chunk]
        pos = torch.full((1,), start, device=device)
        recorder.inner = chunk_attention(start)
        draft.hidden(part, pos, recorder, slot=slot)
        queries = recorder.take()
        attention: AttentionFn = chunk_attention(start)
        if start > config.budget:
            policy.prepare(RoundContext(pos, target, config.budget, draft, queries, slot=slot))
            rows = {
                layer: block_rows(policy.scores(layer, None, None, pos), pos, config, selection.sink, selection.window)
                for layer in range(target.config.n_layers)
            }
            attention = BlockAttention(rows)
        hidden = target.hidden(part, pos, attention, slot=slot)
    return target.lm_head(hidden[:, -1]).float()
