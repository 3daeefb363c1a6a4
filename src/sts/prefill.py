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
from sts.attention.backend import QueryRecorder
from sts.decoding import Decoder
from sts.errors import STSError
from sts.selection.base import RoundContext, SelectionConfig, topk_rows
from sts.selection.sts import STSPolicy


@dataclass(frozen=True)
class PrefillConfig:
    """Sparse prefill settings: ``budget`` context rows per target KV head, chosen ``block`` rows at a time."""

    budget: int = 1024
    block: int = 64

    def __post_init__(self) -> None:
        if self.block < 1 or self.budget < 2 * self.block:
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
    tdec: Decoder, ddec: Decoder, prompts: Sequence[Sequence[int]], policy: STSPolicy, config: PrefillConfig,
    selection: SelectionConfig,
) -> Tensor:
    """Return the target's logits after each prompt, prefilled chunk by chunk with draft-chosen blocks."""
    recorder = QueryRecorder(policy.mapping.draft_layers())
    chunk = tdec.chunk
    final: list[Tensor | None] = [None] * len(prompts)
    for end in range(chunk, max(len(p) for p in prompts) + chunk, chunk):
        part = [list(p[:end]) for p in prompts]
        if all(len(p) <= n for p, n in zip(part, tdec.lengths.tolist())):
            continue
        ddec.feed(part, recorder)
        context = tdec.lengths.clone()
        queries = recorder.take()
        if int(context.max()) <= config.budget:
            logits = tdec.feed(part)
        else:
            policy.prepare(RoundContext(context, tdec.model, ddec.model, queries))
            rows = {
                layer: block_rows(policy.scores(layer, None, None, context), context, config, selection.sink, selection.window)
                for layer in range(tdec.model.config.n_layers)
            }
            logits = tdec.feed(part, BlockAttention(rows))
        for b, (p, n) in enumerate(zip(part, context.tolist())):
            if len(p) == len(prompts[b]) and len(p) > n:  # this chunk held the prompt's last token
                final[b] = logits[b]
    return torch.stack(final)  # type: ignore[arg-type]
