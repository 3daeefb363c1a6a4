"""Fused Triton re-ranking: the target's verify queries choose which of the draft's candidate rows they read.

Same contract as :func:`sts.attention.rerank.rerank_rows` (its module docstring states it): for
each sequence and KV head, score the usable candidate rows with the group's ``G * T`` query rows
(keys only) and write ``[B, Hkv, budget]`` rows: sinks, window, then the ``free`` best candidates.

Layout of the work: two launches per call, whatever the shapes.

1. *Logits* (grid: sequence x KV head, candidate tile). Each program gathers one tile of
   ``BLOCK_N`` candidate K rows by index (unusable ones are masked out of the load, so they cost
   no bandwidth), multiplies them with the group's query rows packed into one tile (as in
   :mod:`sts.attention.triton_verify`: row ``r = g * T + t``), stores the base-2 logits to a
   float32 scratch ``[B * Hkv, G * T, C]`` (a few hundred KB: it stays in L2) and, per query
   row, the tile's softmax statistics (max and sum of exponentials). Cutting the candidates into
   tiles gives the launch enough programs to spread the gathers over the GPU at batch 1 (8 KV
   heads x 28 tiles for C = 1776).
2. *Select* (grid: sequence x KV head). One program merges the tiles' statistics into each
   query row's log-sum-exp, reads the logits back a few rows at a time and reduces them to one
   score per candidate (``prob``: the softmax probability averaged over the ``G * T`` rows;
   otherwise the max logit), all ``C`` scores held as one block in registers. It finds the
   exact ``free``-th largest score by bisection on an order-preserving integer view of the float
   bits (at most 32 counts over the block), keeps the scores above it plus the first ties by
   position (a prefix sum), compacts the kept candidates with a second prefix sum and writes
   them after the sinks and window rows it also writes; the remaining slots get ``S`` (invalid).
   A sequence whose context fits the budget gets rows ``0 .. budget - 1`` instead.

Every launch parameter (tile count, block sizes, warps) comes from static shapes, and
``start_pos`` is read on the device, so the call is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sts.attention.triton_scores import _score_logits
from sts.attention.triton_verify import LOG2E, dot_precision, load_queries, program_head

# Candidate rows one logits program gathers.
BLOCK_N = 64
# Most logits one select program holds at once while reducing them to scores (rows x candidates):
# on the H200, 8 rows of 2048 at a time beat 2 or 4 (about 1 us per call, fewer dependent L2 loads).
_SELECT_TILE = 16384
# Most candidates per (sequence, KV head): the select program keeps them all in registers.
MAX_CANDIDATES = 16384
# Most query rows (G * T) per KV head: they form one tile of the logits product.
MAX_QUERY_ROWS = 128
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _logits_kernel(
    q_ptr, k_ptr, cand_ptr, usable_ptr, logit_ptr, m_part_ptr, l_part_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
    stride_cb, stride_ch, stride_ub, stride_uh,
    n_kv_heads, n_cand, qk_scale,
    GROUP: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    tile = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q_t, rows, row_ok = load_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qt, d, GROUP, T, BLOCK_M)
    c = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_c = c < n_cand
    keys = tl.load(cand_ptr + b * stride_cb + h * stride_ch + c, mask=in_c, other=0)
    ok = in_c & (tl.load(usable_ptr + b * stride_ub + h * stride_uh + c, mask=in_c, other=0) != 0)
    s = _score_logits(q_t, k_ptr + b * stride_kb + h * stride_kh, stride_ks, keys, ok, d, qk_scale, PRECISION)
    logit_rows = logit_ptr + (bh * (GROUP * T) + rows).to(tl.int64) * n_cand
    tl.store(logit_rows[None, :] + c[:, None], s, mask=in_c[:, None] & row_ok[None, :])
    m = tl.max(s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a tile with no usable candidate: l = 0
    part = (bh * tl.num_programs(1) + tile) * BLOCK_M + rows
    tl.store(m_part_ptr + part, m)
    tl.store(l_part_ptr + part, tl.sum(tl.exp2(s - m_safe[None, :]), 0))


@triton.jit
def _row_lse(m_part_ptr, l_part_ptr, bh, rows, n_tiles, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Return the base-2 log-sum-exp of each query row in ``rows`` over every tile (0 where it has none)."""
    tiles = tl.arange(0, BLOCK_T)
    part = (bh * n_tiles + tiles[:, None]) * BLOCK_M + rows[None, :]
    ok = (tiles < n_tiles)[:, None]
    m_all = tl.load(m_part_ptr + part, mask=ok, other=float("-inf"))
    l_all = tl.load(l_part_ptr + part, mask=ok, other=0.0)
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0)
    return tl.where(total > 0.0, m_safe + tl.log2(tl.where(total > 0.0, total, 1.0)), 0.0)


@triton.jit
def _candidate_scores(
    logit_ptr, m_part_ptr, l_part_ptr, bh, c, n_cand, n_tiles,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, PROB: tl.constexpr,
):  # fmt: skip
    """Return each candidate's score ``[BLOCK_C]``: summed probability over the query rows (``PROB``)
    or max logit, from the stored logits, ``BLOCK_R`` rows at a time."""
    acc = tl.full(c.shape, 0.0 if PROB else float("-inf"), tl.float32)
    for r0 in tl.range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < ROWS)[:, None] & (c < n_cand)[None, :]
        ptrs = logit_ptr + (bh * ROWS + rows).to(tl.int64)[:, None] * n_cand + c[None, :]
        s = tl.load(ptrs, mask=ok, other=float("-inf"))
        if PROB:
            lse = _row_lse(m_part_ptr, l_part_ptr, bh, rows, n_tiles, BLOCK_M, BLOCK_T)
            acc += tl.sum(tl.exp2(s - lse[:, None]), 0)
        else:
            acc = tl.maximum(acc, tl.max(s, 0))
    return acc


@triton.jit
def _order_key(x):
    """Return int32 keys that order like the float32 values ``x`` (IEEE bits, negatives' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _top_mask(scores, valid, k):
    """Return the mask of the ``k`` largest valid ``scores`` (all valid ones if fewer), ties taken by position.

    The threshold is the exact ``k``-th largest key, found by bisection over the integer keys
    (each step counts the keys at or above the midpoint; the bounds are int64 scalars so that
    their difference cannot overflow).
    """
    key = tl.where(valid, _order_key(scores), INT32_MIN)
    k = tl.minimum(k, tl.sum(valid.to(tl.int32), 0))
    lo = tl.min(tl.where(valid, key, INT32_MAX), 0).to(tl.int64)  # count(key >= lo) >= k holds
    hi = tl.max(key, 0).to(tl.int64)
    while lo < hi:
        mid = lo + ((hi - lo + 1) >> 1)
        enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = valid & (key > lo.to(tl.int32))
    tie = valid & (key == lo.to(tl.int32))
    need = k - tl.sum(above.to(tl.int32), 0)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))


@triton.jit
def _select_kernel(
    logit_ptr, m_part_ptr, l_part_ptr, cand_ptr, usable_ptr, start_ptr, budgets_ptr, out_ptr,
    stride_cb, stride_ch, stride_ub, stride_uh,
    n_kv_heads, n_cand, n_tiles, seq_len, budget, n_out,
    SINK: tl.constexpr, WINDOW: tl.constexpr, FREE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_OUT: tl.constexpr, PROB: tl.constexpr, PER_SEQUENCE: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    c = tl.arange(0, BLOCK_C)
    in_c = c < n_cand
    valid = in_c & (tl.load(usable_ptr + b * stride_ub + h * stride_uh + c, mask=in_c, other=0) != 0)
    scores = _candidate_scores(logit_ptr, m_part_ptr, l_part_ptr, bh, c, n_cand, n_tiles, ROWS, BLOCK_M, BLOCK_R, BLOCK_T, PROB)
    if PER_SEQUENCE:  # this sequence's own budget (at most the round's)
        own = tl.load(budgets_ptr + b).to(tl.int64)
        take = _top_mask(scores, valid, own - SINK - WINDOW)
    else:
        own = budget
        take = _top_mask(scores, valid, FREE)

    start = tl.load(start_ptr + b).to(tl.int64)
    ranked = start > own  # else the context fits the budget: rows 0 .. n_out - 1
    j = tl.arange(0, BLOCK_OUT)
    forced = SINK + WINDOW
    # The fixed slots (sinks, window, unfilled tail) and the chosen slots are disjoint: no two
    # threads store to one address, so the two stores need no ordering.
    fixed = tl.where(j < SINK, j, tl.where(j < forced, start - forced + j, seq_len))
    n_taken = tl.sum(take.to(tl.int32), 0)
    out_row = out_ptr + bh.to(tl.int64) * n_out
    fixed_ok = (j < n_out) & (~ranked | (j < forced) | (j >= forced + n_taken))
    tl.store(out_row + j, tl.where(ranked, fixed, j), mask=fixed_ok)
    rows = tl.load(cand_ptr + b * stride_cb + h * stride_ch + c, mask=take, other=0)
    slot = forced + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(out_row + slot, rows, mask=take & ranked)


def _check_inputs(q: Tensor, k_cache: Tensor, cand: Tensor, usable: Tensor, start_pos: Tensor) -> None:
    b, hq, _, d = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[0] != b or k_cache.shape[-1] != d or hq % hkv or cand.shape[:2] != (b, hkv):
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, cand {tuple(cand.shape)}")
    if usable.shape != cand.shape or usable.dtype != torch.bool or start_pos.shape != (b,):
        raise ValueError("usable must be a bool tensor shaped like cand, start_pos [B]")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {d} unsupported (16..256, a power of two)")
    if any(x.stride(-1) != 1 for x in (q, k_cache, cand, usable)):
        raise ValueError("q's, the cache's, cand's and usable's last dimension must be contiguous")
    if cand.shape[-1] > MAX_CANDIDATES or (hq // hkv) * q.shape[2] > MAX_QUERY_ROWS:
        raise ValueError(f"at most {MAX_CANDIDATES} candidates and {MAX_QUERY_ROWS} query rows (G * T) per KV head")


def rerank_rows_triton(
    q: Tensor, k_cache: Tensor, cand: Tensor, usable: Tensor, start_pos: Tensor,
    sink: int, window: int, budget: int, prob: bool, budgets: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Return ``[B, Hkv, budget]`` int64 rows: sinks, window, and the candidates the queries ``q`` rank best.

    ``q`` ``[B, Hq, T, D]``; ``k_cache`` ``[B, Hkv, S, D]``; ``cand`` ``[B, Hkv, C]`` int candidate
    rows and ``usable`` ``[B, Hkv, C]`` bool (only usable candidates are read and ranked);
    ``start_pos`` ``[B]``. ``prob``: rank by each query's softmax over the usable candidates,
    averaged over the group's ``G * T`` query rows; otherwise by the max logit. The chosen
    candidates follow the ``sink + window`` forced rows in no particular order; with fewer than
    ``C`` free slots the result is ``sink + window + C`` wide, as the reference's. Two launches,
    no host synchronisation: safe to capture in a CUDA graph. ``budgets``: ``[B]`` each sequence's own
    budget, at most ``budget`` (contract in :mod:`sts.attention.rerank`); None: ``budget`` for every one.
    """
    _check_inputs(q, k_cache, cand, usable, start_pos)
    free = budget - sink - window
    if free < 1 or sink < 0 or window < 0:
        raise ValueError(f"budget {budget} leaves no free rows after sink {sink} and window {window}")
    b, hq, t, d = q.shape
    hkv, seq_len, n_cand = k_cache.shape[1], k_cache.shape[2], cand.shape[2]
    group = hq // hkv
    rows = group * t
    block_m = max(16, triton.next_power_of_2(rows))
    block_c = triton.next_power_of_2(n_cand)
    n_tiles = triton.cdiv(n_cand, BLOCK_N)
    n_out = sink + window + min(free, n_cand)

    f32 = dict(device=q.device, dtype=torch.float32)
    logits = torch.empty(b * hkv * rows * n_cand, **f32)
    m_part = torch.empty(b * hkv * n_tiles * block_m, **f32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(b, hkv, n_out, device=q.device, dtype=torch.int64)
    cand_strides = (*cand.stride()[:2], *usable.stride()[:2])

    _logits_kernel[(b * hkv, n_tiles)](
        q, k_cache, cand, usable, logits, m_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3], *cand_strides,
        hkv, n_cand, LOG2E / math.sqrt(d),
        GROUP=group, T=t, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=BLOCK_N, PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )  # fmt: skip
    _select_kernel[(b * hkv,)](
        logits, m_part, l_part, cand, usable, start_pos, start_pos if budgets is None else budgets, out, *cand_strides,
        hkv, n_cand, n_tiles, seq_len, budget, n_out,
        SINK=sink, WINDOW=window, FREE=free, ROWS=rows, BLOCK_M=block_m,
        BLOCK_R=max(1, min(triton.next_power_of_2(rows), _SELECT_TILE // block_c)),
        BLOCK_T=triton.next_power_of_2(n_tiles), BLOCK_C=block_c,
        BLOCK_OUT=triton.next_power_of_2(n_out), PROB=prob, PER_SEQUENCE=budgets is not None,
        num_warps=max(4, min(16, block_c // 256)),
    )  # fmt: skip
    return out
