"""Fused Triton re-ranking: the target's verify queries choose which of the draft's candidate rows they read.

Same contract as :func:`sts.attention.rerank.rerank_rows` (its module docstring states it): for
each sequence and KV head, score the usable candidate rows with the group's ``G * T`` query rows
(keys only) and write ``[B, Hkv, budget]`` rows: sinks, window, then the ``free`` best candidates.

Layout of the work: two launches per call up to :data:`MAX_CANDIDATES` candidates per (sequence, KV head)
(a budget of 4096 rows at ``rerank`` 4), eight past it (the radix path, below).

1. *Logits* (grid: sequence x KV head, candidate tile). Each program gathers one tile of
   ``BLOCK_N`` candidate K rows by index (unusable ones are masked out of the load, so they cost
   no bandwidth), multiplies them with the group's query rows packed into one tile (as in
   :mod:`sts.attention.triton_verify`: row ``r = g * T + t``), stores the base-2 logits to a
   float32 scratch ``[B * Hkv, G * T, C]`` (a few hundred KB at budget 512: it stays in L2) and, per query
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

Past :data:`MAX_CANDIDATES` candidates (or with ``chunk`` given) step 2 runs over chunks of :data:`CHUNK`
candidates instead: :func:`_lse_kernel` merges each query row's statistics, :func:`_key_kernel` writes each
candidate's score as an order key with its level-1 histogram, the levels and counts of
:mod:`sts.attention.triton_radix` find the exact threshold, and :func:`_emit_kernel` writes the rows in
candidate order, ties at the threshold first by position, as the one-program path does (16-bit inputs store the
logits as float16 offsets below their tile's max, so equal logits in different tiles may round apart).

Every launch parameter (tile count, block sizes, warps) comes from static shapes, and
``start_pos`` is read on the device, so the call is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sts.attention.rerank import ONE_PROGRAM_CANDIDATES
from sts.attention.triton_radix import (HIST, HIST_BINS, INVALID, LEVELS, add_histogram, chunk_take, count_kernel,
                                       order_key, radix_level_kernel, row_k)
from sts.attention.triton_scores import _score_logits
from sts.attention.triton_verify import LOG2E, dot_precision, load_queries, program_head

# Candidate rows one logits program gathers (the same, as a constant kernels can read).
BLOCK_N = 64
LOGIT_TILE = tl.constexpr(BLOCK_N)
# Most logits one select program holds at once while reducing them to scores (rows x candidates):
# on the H200, 8 rows of 2048 at a time beat 2 or 4 (about 1 us per call, fewer dependent L2 loads).
_SELECT_TILE = 16384
# Most candidates per (sequence, KV head) one select program keeps in registers; more go to the radix path.
MAX_CANDIDATES = ONE_PROGRAM_CANDIDATES
# Candidates per program of the radix path, and most logits (rows x candidates) its key kernel holds at once: on the
# H200 at 52156 candidates, 4096 and 16384 beat 2048 and 8192 chunks and 4096-32768 logits by 3-20% per call
# (docs/bench/rerank-profile-h200.json).
CHUNK = 4096
_KEY_TILE = 16384
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, OFFSETS: tl.constexpr,
):  # fmt: skip
    """Grid (sequence x KV head, tile of ``BLOCK_N`` candidates): the tile's base-2 logits (``OFFSETS``: each as its
    offset below the tile's max for its query row, in the scratch's dtype) and each query row's max and sum of
    exponentials over the tile."""
    bh, b, h = program_head(n_kv_heads)
    tile = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q_t, rows, row_ok = load_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qt, d, GROUP, T, BLOCK_M)
    c = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_c = c < n_cand
    keys = tl.load(cand_ptr + b * stride_cb + h * stride_ch + c, mask=in_c, other=0)
    ok = in_c & (tl.load(usable_ptr + b * stride_ub + h * stride_uh + c, mask=in_c, other=0) != 0)
    s = _score_logits(q_t, k_ptr + b * stride_kb + h * stride_kh, stride_ks, keys, ok, d, qk_scale, PRECISION)
    m = tl.max(s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a tile with no usable candidate: l = 0
    logit_rows = logit_ptr + (bh * (GROUP * T) + rows).to(tl.int64) * n_cand
    stored = s - m_safe[None, :] if OFFSETS else s
    tl.store(logit_rows[None, :] + c[:, None], stored, mask=in_c[:, None] & row_ok[None, :])
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
    logit_ptr, m_part_ptr, l_part_ptr, lse_ptr, bh, c, n_cand, n_tiles,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, PROB: tl.constexpr,
    LSE_STORED: tl.constexpr, OFFSETS: tl.constexpr,
):  # fmt: skip
    """Return each candidate's score (shaped like ``c``): summed probability over the query rows (``PROB``)
    or max logit, from the stored logits (``OFFSETS``: stored below their tile's max, added back here),
    ``BLOCK_R`` rows at a time. Each row's log-sum-exp comes from ``lse_ptr`` (``LSE_STORED``:
    :func:`_lse_kernel`'s) or is merged here from the tiles' statistics."""
    acc = tl.full(c.shape, 0.0 if PROB else float("-inf"), tl.float32)
    for r0 in tl.range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < ROWS)[:, None] & (c < n_cand)[None, :]
        ptrs = logit_ptr + (bh * ROWS + rows).to(tl.int64)[:, None] * n_cand + c[None, :]
        s = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32)
        if OFFSETS:
            tile_max = m_part_ptr + (bh * n_tiles + c[None, :] // LOGIT_TILE) * BLOCK_M + rows[:, None]
            s += tl.load(tile_max, mask=ok, other=0.0)
        if PROB:
            if LSE_STORED:
                lse = tl.load(lse_ptr + bh * BLOCK_M + rows, mask=rows < ROWS, other=0.0)
            else:
                lse = _row_lse(m_part_ptr, l_part_ptr, bh, rows, n_tiles, BLOCK_M, BLOCK_T)
            acc += tl.sum(tl.exp2(s - lse[:, None]), 0)
        else:
            acc = tl.maximum(acc, tl.max(s, 0))
    return acc


@triton.jit
def _lse_kernel(m_part_ptr, l_part_ptr, lse_ptr, hist_ptr, n_tiles, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Radix path, grid (sequence x KV head): merge the logits tiles' statistics into each query row's base-2
    log-sum-exp (0 for a row with no usable candidate), and zero the row's select histograms."""
    bh = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for t0 in tl.range(0, n_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        part = (bh * n_tiles + tiles[:, None]) * BLOCK_M + rows[None, :]
        ok = (tiles < n_tiles)[:, None]
        m_all = tl.load(m_part_ptr + part, mask=ok, other=float("-inf"))
        l_all = tl.load(l_part_ptr + part, mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(m_all, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp2(m - m_safe) + tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(total > 0.0, m_safe + tl.log2(tl.where(total > 0.0, total, 1.0)), 0.0)
    tl.store(lse_ptr + bh * BLOCK_M + rows, lse)
    for i in tl.static_range(0, HIST, 1024):
        tl.store(hist_ptr + bh * HIST + i + tl.arange(0, 1024), tl.zeros([1024], tl.int32))


@triton.jit
def _key_kernel(
    logit_ptr, m_part_ptr, lse_ptr, usable_ptr, key_ptr, hist_ptr, stride_ub, stride_uh, n_kv_heads, n_cand, n_tiles,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, PROB: tl.constexpr,
    OFFSETS: tl.constexpr,
):  # fmt: skip
    """Radix path, grid (sequence x KV head, chunk of candidates): each usable candidate's score as an order key
    (:data:`~sts.attention.triton_radix.INVALID` for the others), and the keys' level-1 histogram."""
    bh, b, h = program_head(n_kv_heads)
    c = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    in_c = c < n_cand
    valid = in_c & (tl.load(usable_ptr + b * stride_ub + h * stride_uh + c, mask=in_c, other=0) != 0)
    scores = _candidate_scores(logit_ptr, m_part_ptr, m_part_ptr, lse_ptr, bh, c, n_cand, n_tiles, ROWS, BLOCK_M,
                               BLOCK_R, 1, PROB, LSE_STORED=True, OFFSETS=OFFSETS)
    key = tl.where(valid, order_key(scores), INVALID)
    tl.store(key_ptr + bh.to(tl.int64) * n_cand + c, key, mask=in_c)
    add_histogram(hist_ptr + bh * HIST, key, valid, 1, 0)


@triton.jit
def _emit_kernel(
    key_ptr, hist_ptr, count_ptr, cand_ptr, start_ptr, budgets_ptr, out_ptr, stride_cb, stride_ch,
    n_kv_heads, n_cand, n_chunks, seq_len, budget, n_out, k,
    SINK: tl.constexpr, WINDOW: tl.constexpr, CHUNK: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
    PER_SEQUENCE: tl.constexpr,
):  # fmt: skip
    """Radix path, grid (sequence x KV head, chunk of output slots and of candidates): write the fixed slots
    (sinks, window, unfilled tail) of this chunk of the output, and this chunk's chosen candidates after the
    chosen ones of earlier chunks (position order: the same rows in the same slots on every run)."""
    bh, b, h = program_head(n_kv_heads)
    chunk = tl.program_id(1)
    c, take, before, n_taken = chunk_take(key_ptr, hist_ptr, count_ptr, bh, chunk, n_cand, n_chunks,
                                          row_k(budgets_ptr, bh, n_kv_heads, k, PER_SEQUENCE), CHUNK, BLOCK_CHUNKS)
    own = tl.load(budgets_ptr + b).to(tl.int64) if PER_SEQUENCE else budget
    start = tl.load(start_ptr + b).to(tl.int64)
    _write_rows(out_ptr + bh.to(tl.int64) * n_out, chunk * CHUNK + tl.arange(0, CHUNK),
                cand_ptr + b * stride_cb + h * stride_ch, c, take, before, n_taken, start > own, start, seq_len, n_out,
                SINK, WINDOW)


@triton.jit
def _write_rows(out_row, j, cand_row, c, take, before, n_taken, ranked, start, seq_len, n_out,
                SINK: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    """Write output slots ``j`` that are fixed (sinks, window, unfilled tail; rows ``j`` when the context fits the
    budget: not ``ranked``) and the candidates ``c`` chosen by ``take`` into the slots after ``before`` chosen ones.

    The fixed slots and the chosen slots are disjoint: no two threads store to one address, so the two
    stores need no ordering."""
    forced = SINK + WINDOW
    fixed = tl.where(j < SINK, j, tl.where(j < forced, start - forced + j, seq_len))
    fixed_ok = (j < n_out) & (~ranked | (j < forced) | (j >= forced + n_taken))
    tl.store(out_row + j, tl.where(ranked, fixed, j), mask=fixed_ok)
    rows = tl.load(cand_row + c, mask=take, other=0)
    slot = forced + before + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(out_row + slot, rows, mask=take & ranked)


@triton.jit
def _top_mask(scores, valid, k):
    """Return the mask of the ``k`` largest valid ``scores`` (all valid ones if fewer), ties taken by position.

    The threshold is the exact ``k``-th largest key, found by bisection over the integer keys
    (each step counts the keys at or above the midpoint; the bounds are int64 scalars so that
    their difference cannot overflow). The search stops early at a midpoint exactly ``k`` keys
    reach: those are then the ``k`` largest, the set the full search keeps (a tie at the ``k``-th
    key never counts exactly ``k``, so ties still run the search to the end). Each step is one
    reduction over the block, which bounds the kernel's latency (32 steps: most of its ~14 us at
    1776 candidates on an H200); with distinct scores the stop comes after about log2 of the key
    range over the gap at the ``k``-th key.
    """
    key = tl.where(valid, order_key(scores), INT32_MIN)
    k = tl.minimum(k, tl.sum(valid.to(tl.int32), 0))
    lo = tl.min(tl.where(valid, key, INT32_MAX), 0).to(tl.int64)  # count(key >= lo) >= k holds
    hi = tl.max(key, 0).to(tl.int64)
    while lo < hi:
        mid = lo + ((hi - lo + 1) >> 1)
        count = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0)
        enough = count >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(count == k, mid, tl.where(enough, hi, mid - 1))
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
    scores = _candidate_scores(logit_ptr, m_part_ptr, l_part_ptr, m_part_ptr, bh, c, n_cand, n_tiles, ROWS, BLOCK_M,
                               BLOCK_R, BLOCK_T, PROB, LSE_STORED=False, OFFSETS=False)
    if PER_SEQUENCE:  # this sequence's own budget (at most the round's)
        own = tl.load(budgets_ptr + b).to(tl.int64)
        take = _top_mask(scores, valid, own - SINK - WINDOW)
    else:
        own = budget
        take = _top_mask(scores, valid, FREE)
    start = tl.load(start_ptr + b).to(tl.int64)
    # ranked: else the context fits the budget: rows 0 .. n_out - 1
    _write_rows(out_ptr + bh.to(tl.int64) * n_out, tl.arange(0, BLOCK_OUT), cand_ptr + b * stride_cb + h * stride_ch,
                c, take, 0, tl.sum(take.to(tl.int32), 0), start > own, start, seq_len, n_out, SINK, WINDOW)


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
    if (hq // hkv) * q.shape[2] > MAX_QUERY_ROWS:
        raise ValueError(f"at most {MAX_QUERY_ROWS} query rows (G * T) per KV head")


def rerank_rows_triton(
    q: Tensor, k_cache: Tensor, cand: Tensor, usable: Tensor, start_pos: Tensor,
    sink: int, window: int, budget: int, prob: bool, budgets: Tensor | None = None, chunk: int | None = None,
) -> Tensor:  # fmt: skip
    """Return ``[B, Hkv, budget]`` int64 rows: sinks, window, and the candidates the queries ``q`` rank best.

    ``q`` ``[B, Hq, T, D]``; ``k_cache`` ``[B, Hkv, S, D]``; ``cand`` ``[B, Hkv, C]`` int candidate
    rows and ``usable`` ``[B, Hkv, C]`` bool (only usable candidates are read and ranked);
    ``start_pos`` ``[B]``. ``prob``: rank by each query's softmax over the usable candidates,
    averaged over the group's ``G * T`` query rows; otherwise by the max logit. The chosen
    candidates follow the ``sink + window`` forced rows in no particular order; with fewer than
    ``C`` free slots the result is ``sink + window + C`` wide, as the reference's. No host
    synchronisation: safe to capture in a CUDA graph. ``budgets``: ``[B]`` each sequence's own
    budget, at most ``budget`` (contract in :mod:`sts.attention.rerank`); None: ``budget`` for every one.

    Up to :data:`MAX_CANDIDATES` candidates one program per (sequence, KV head) selects them (two
    launches); more (budgets of thousands of rows), or a ``chunk`` given, and the selection runs
    over chunks of ``chunk`` candidates (default :data:`CHUNK`) by radix select
    (:mod:`sts.attention.triton_radix`, eight launches).
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
    n_tiles = triton.cdiv(n_cand, BLOCK_N)
    n_out = sink + window + min(free, n_cand)

    radix = chunk is not None or n_cand > MAX_CANDIDATES
    # The radix path's logits leave the L2 (80 bytes a candidate at 20 query rows in float32): 16-bit inputs store
    # them as float16 offsets below their tile's max, as the score kernel does (sts.attention.triton_scores).
    offsets = radix and q.dtype != torch.float32
    f32 = dict(device=q.device, dtype=torch.float32)
    logits = torch.empty(b * hkv * rows * n_cand, device=q.device, dtype=torch.float16 if offsets else torch.float32)
    m_part = torch.empty(b * hkv * n_tiles * block_m, **f32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(b, hkv, n_out, device=q.device, dtype=torch.int64)
    cand_strides = (*cand.stride()[:2], *usable.stride()[:2])

    _logits_kernel[(b * hkv, n_tiles)](
        q, k_cache, cand, usable, logits, m_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3], *cand_strides,
        hkv, n_cand, LOG2E / math.sqrt(d),
        GROUP=group, T=t, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=BLOCK_N, PRECISION=dot_precision(q.dtype),
        OFFSETS=offsets, num_warps=4,
    )  # fmt: skip
    if not radix:
        block_c = triton.next_power_of_2(n_cand)
        _select_kernel[(b * hkv,)](
            logits, m_part, l_part, cand, usable, start_pos, start_pos if budgets is None else budgets, out,
            *cand_strides, hkv, n_cand, n_tiles, seq_len, budget, n_out,
            SINK=sink, WINDOW=window, FREE=free, ROWS=rows, BLOCK_M=block_m,
            BLOCK_R=max(1, min(triton.next_power_of_2(rows), _SELECT_TILE // block_c)),
            BLOCK_T=triton.next_power_of_2(n_tiles), BLOCK_C=block_c,
            BLOCK_OUT=triton.next_power_of_2(n_out), PROB=prob, PER_SEQUENCE=budgets is not None,
            num_warps=max(4, min(16, block_c // 256)),
        )  # fmt: skip
        return out
    chunk = chunk or CHUNK
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    n_chunks = triton.cdiv(n_cand, chunk)
    lse = torch.empty(b * hkv * block_m, **f32)
    hist = torch.empty(b * hkv * HIST_BINS, device=q.device, dtype=torch.int32)
    keys = torch.empty(b * hkv * n_cand, device=q.device, dtype=torch.int32)
    counts = torch.empty(b * hkv * n_chunks * 2, device=q.device, dtype=torch.int32)
    # Each row's k: the shared free rows, or each sequence's own budget minus the forced rows.
    k_ptr, k = (start_pos, free) if budgets is None else (budgets, -(sink + window))
    per_sequence = budgets is not None
    _lse_kernel[(b * hkv,)](m_part, l_part, lse, hist, n_tiles, BLOCK_M=block_m,
                            BLOCK_T=min(256, triton.next_power_of_2(n_tiles)), num_warps=4)
    _key_kernel[(b * hkv, n_chunks)](
        logits, m_part, lse, usable, keys, hist, *usable.stride()[:2], hkv, n_cand, n_tiles,
        ROWS=rows, BLOCK_M=block_m, BLOCK_R=max(1, min(triton.next_power_of_2(rows), _KEY_TILE // chunk)),
        CHUNK=chunk, PROB=prob, OFFSETS=offsets, num_warps=8,
    )  # fmt: skip
    for level in range(2, LEVELS + 1):
        radix_level_kernel[(b * hkv, n_chunks)](keys, hist, k_ptr, hkv, n_cand, k, LEVEL=level, CHUNK=chunk,
                                                PER_SEQUENCE=per_sequence, num_warps=8)
    count_kernel[(b * hkv, n_chunks)](keys, hist, k_ptr, counts, hkv, n_cand, n_chunks, k, CHUNK=chunk,
                                      PER_SEQUENCE=per_sequence, num_warps=8)
    _emit_kernel[(b * hkv, triton.cdiv(max(n_cand, n_out), chunk))](
        keys, hist, counts, cand, start_pos, k_ptr, out, *cand.stride()[:2],
        hkv, n_cand, n_chunks, seq_len, budget, n_out, k,
        SINK=sink, WINDOW=window, CHUNK=chunk, BLOCK_CHUNKS=triton.next_power_of_2(n_chunks),
        PER_SEQUENCE=per_sequence, num_warps=8,
    )  # fmt: skip
    return out
