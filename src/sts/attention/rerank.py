"""Reference re-ranking: the target's verify queries choose, among the draft's candidate rows, the ones it reads.

Contract shared with the fused Triton kernel (:mod:`sts.attention.triton_rerank`): for each
sequence ``b`` and KV head ``h``, the ``C`` candidate rows ``cand[b, h]`` (only those with
``usable[b, h]``) are scored by the target's ``G * T`` query rows of that KV head's group, using
keys only (never values), and the ``free = budget - sink - window`` best are kept. The result is
``[B, Hkv, budget]``: the ``sink`` first rows, the ``window`` last rows before ``start_pos[b]``,
then the chosen candidates, in no particular order; slots no usable candidate fills hold ``S``
(the cache length: an invalid row). A sequence whose context fits the budget reads rows
``0 .. budget - 1`` (those past its context are invalid). With ``budgets`` (``[B]``, each at most
``budget``), sequence ``b`` keeps only its ``budgets[b] - sink - window`` best candidates (the
caller limits ``usable`` to its own candidates) and reads its whole context when that fits
``budgets[b]``: every row it reads lies in its first ``budgets[b]`` slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sts.attention.reference import gather_rows

#: Candidates per (sequence, KV head) the fused kernel ranks in one program; past that it selects them by
#: radix select over chunks of candidates (:mod:`sts.attention.triton_radix`), which costs more per candidate.
ONE_PROGRAM_CANDIDATES = 16384


def sink_window_rows(start_pos: Tensor, sink: int, window: int) -> Tensor:
    """Return ``[B, sink + window]``: the first ``sink`` and the last ``window`` context rows of each sequence
    (meaningful when the context is longer than ``sink + window``)."""
    col = torch.arange(sink + window, device=start_pos.device).view(1, -1)
    return torch.where(col < sink, col, start_pos.view(-1, 1) - (sink + window) + col)


def candidate_scores(q: Tensor, keys: Tensor, usable: Tensor, prob: bool) -> Tensor:
    """Return ``[B, Hkv, C]`` float32 scores of candidate keys ``[B, Hkv, C, D]``; ``-inf`` where not usable.

    ``prob``: each query's softmax over the usable candidates, averaged over the group's heads
    and the T queries (the oracle's ranking restricted to the candidates); otherwise the max
    logit over them.
    """
    b, hq, t, d = q.shape
    logits = torch.matmul(q.float().reshape(b, keys.shape[1], -1, d), keys.float().transpose(-1, -2))
    logits = logits.masked_fill(~usable.unsqueeze(2), float("-inf"))
    if prob:
        exact = torch.nan_to_num(torch.softmax(logits / d**0.5, dim=-1), nan=0.0).mean(dim=2)
        return exact.masked_fill(~usable, float("-inf"))
    return logits.amax(dim=2)


def rerank_rows(
    q: Tensor, k_cache: Tensor, cand: Tensor, usable: Tensor, start_pos: Tensor,
    sink: int, window: int, budget: int, prob: bool, budgets: Tensor | None = None,
) -> Tensor:
    """Return ``[B, Hkv, budget]`` rows: sinks, window, and the candidates the queries ``q`` rank best (``budgets``:
    each sequence's own budget, see the module docstring)."""
    b, hkv, _ = cand.shape
    exact = candidate_scores(q, gather_rows(k_cache, cand), usable, prob)
    free = budget - sink - window
    best = torch.topk(exact, min(free, exact.shape[-1]), dim=-1)  # sorted: rank order
    chosen = torch.where(torch.isinf(best.values), k_cache.shape[2], cand.gather(-1, best.indices))
    limit = torch.full((b,), budget, device=cand.device) if budgets is None else budgets
    rank = torch.arange(chosen.shape[-1], device=chosen.device).view(1, 1, -1)
    chosen = torch.where(rank < (limit - sink - window).view(b, 1, 1), chosen, k_cache.shape[2])
    forced = sink_window_rows(start_pos, sink, window).unsqueeze(1).expand(b, hkv, -1)
    rows = torch.cat([forced, chosen], dim=-1)
    everything = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
    return torch.where((start_pos <= limit).view(b, 1, 1), everything, rows)
