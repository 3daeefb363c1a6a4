"""Triton kernel for context scores: what the draft's queries attend to, aggregated per query head.

Same values as :func:`sts.attention.scores.context_scores` but with a static width: the result
is ``[B, Hq, S]`` (S the cache length) with ``-inf`` at and past ``start_pos[b]``, where the
reference returns ``[B, Hq, max(start_pos)]``. On ``[..., :max(start_pos)]`` the two agree;
a top-k over the extra ``-inf`` columns only ever picks rows ``>= start_pos[b]``, which the
verify kernel treats as padding. A static width keeps the call free of host synchronisation
(CUDA-graph safe); to score fewer rows, pass a view ``k_cache[:, :, :n]``.

K is read once (V never), in two launches split over the context like the verify kernel. Pass 1
computes each query's softmax statistics (max and sum) per split and stores every logit as its
offset below its tile's max (float16 for 16-bit inputs: at most 32 bytes a row for 16 query rows,
against the 128 bytes of a K row of head dim 64 a second read of K would cost), and the tile
maxima in float32. Pass 2 merges the splits' statistics into a log-sum-exp per query and turns the
stored logits into the aggregated probabilities without touching K. A float16 offset rounds by at
most 2^-11 of its size (base-2 log units): a row at its tile's max scores exactly, one a unit below
within 0.034% of its probability; the rows a top-k keeps are the ones near the max.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

from sts.attention.triton_verify import (
    LOG2E, KernelConfig, dot_precision, load_rows, program_head, split_count, split_range,
)

Aggregate = Literal["max", "mean"]


@triton.jit
def _score_queries(
    q_ptr, b, h, stride_qb, stride_qh, stride_qg, d,
    GQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Return the ``[D, BLOCK_M]`` transposed query tile of one KV head and a mask of its real rows.

    Row ``r`` holds query ``g = r % G_P`` of query head ``h * GQ + r // G_P``; padding rows are 0.
    """
    rows = tl.arange(0, BLOCK_M)
    row_ok = (rows // G_P < GQ) & (rows % G_P < G)
    ptrs = q_ptr + b * stride_qb + (h * GQ + rows // G_P) * stride_qh + (rows % G_P) * stride_qg
    return tl.load(ptrs[None, :] + d[:, None], mask=row_ok[None, :], other=0.0), row_ok


@triton.jit
def _score_logits(q_t, k_base, stride_ks, keys, ok, d, qk_scale, PRECISION: tl.constexpr):
    """Return the ``[BLOCK_N, BLOCK_M]`` base-2 logits of one tile of context rows (-inf where not ``ok``)."""
    k = load_rows(k_base, keys, stride_ks, ok, d)
    s = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale
    return tl.where(ok[:, None], s, float("-inf"))


@triton.jit
def _score_stats_kernel(
    q_ptr, k_ptr, start_ptr, m_part_ptr, l_part_ptr, off_ptr, tmax_ptr,
    stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_ks,
    n_kv_heads, seq_len, qk_scale, n_splits,
    GQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, EIGHT_BIT: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    split = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_M)
    q_t, _ = _score_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qg, d, GQ, G, G_P, BLOCK_M)
    if EIGHT_BIT:  # 8-bit keys: the queries in the same format, one float8 tensor-core product per tile
        q_t = q_t.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    off_base = off_ptr + bh.to(tl.int64) * seq_len * BLOCK_M
    tmax_base = tmax_ptr + bh.to(tl.int64) * tl.cdiv(seq_len, BLOCK_N) * BLOCK_M
    start = tl.load(start_ptr + b).to(tl.int32)
    lo, hi = split_range(start, split, n_splits, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < hi
        s = _score_logits(q_t, k_base, stride_ks, offs, ok, d, qk_scale, PRECISION)
        t_max = tl.max(s, 0)  # finite: a tile holds at least one row below hi
        tl.store(tmax_base + (n0 // BLOCK_N) * BLOCK_M + cols, t_max)
        below = (s - t_max[None, :]).to(off_ptr.dtype.element_ty)
        # Padding query rows are stored too: a mask along rows only keeps the stores vectorised.
        tl.store(off_base + offs[:, None] * BLOCK_M + cols[None, :], below, mask=ok[:, None])
        m_new = tl.maximum(m_i, t_max)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[None, :]), 0)
        m_i = m_new
    part = (bh * n_splits + split) * BLOCK_M + cols
    tl.store(m_part_ptr + part, m_i)
    tl.store(l_part_ptr + part, l_i)


@triton.jit
def _score_probs_kernel(
    start_ptr, m_part_ptr, l_part_ptr, off_ptr, tmax_ptr, out_ptr,
    stride_ob, stride_oh, n_kv_heads, seq_len, n_splits,
    GQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, SUB: tl.constexpr, MEAN: tl.constexpr,
    HEAD_MAX: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_M)
    row_ok = (cols // G_P < GQ) & (cols % G_P < G)
    off_base = off_ptr + bh.to(tl.int64) * seq_len * BLOCK_M
    tmax_base = tmax_ptr + bh.to(tl.int64) * tl.cdiv(seq_len, BLOCK_N) * BLOCK_M
    start = tl.load(start_ptr + b).to(tl.int32)

    # Every program merges all splits' statistics itself: a few KB from L2, one launch fewer.
    sp = tl.arange(0, BLOCK_S)
    part = (bh * n_splits + sp[:, None]) * BLOCK_M + cols[None, :]
    m_all = tl.load(m_part_ptr + part, mask=sp[:, None] < n_splits, other=float("-inf"))
    l_all = tl.load(l_part_ptr + part, mask=sp[:, None] < n_splits, other=0.0)
    m_max = tl.max(m_all, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    lse = m_safe + tl.log2(tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0))

    heads = tl.arange(0, BLOCK_M // G_P)
    head_ok = (heads < GQ)[None, :]
    # HEAD_MAX: one column per KV head (the max over its query heads), else one per query head.
    out_base = out_ptr + b * stride_ob + (h + 0 * heads[None, :] if HEAD_MAX else (h * GQ + heads)[None, :]) * stride_oh
    # SUB of pass 1's tiles a step: one 4 KB load a step left the pass latency-bound (1.7 TB/s at 128K, H200).
    ROWS: tl.constexpr = SUB * BLOCK_N
    lo, hi = split_range(start, split, n_splits, ROWS)
    for n0 in tl.range(lo, hi, ROWS):
        offs = n0 + tl.arange(0, ROWS)
        ok = offs < hi
        tiles = n0 // BLOCK_N + tl.arange(0, SUB)
        t_max = tl.load(tmax_base + tiles[:, None] * BLOCK_M + cols[None, :], mask=(tiles * BLOCK_N < hi)[:, None], other=0.0)
        below = tl.load(off_base + offs[:, None] * BLOCK_M + cols[None, :], mask=ok[:, None], other=0.0)
        # Base-2 log-probabilities; the max is taken before the exponential (one per output, not per query).
        x = tl.reshape(tl.reshape(below.to(tl.float32), [SUB, BLOCK_N, BLOCK_M]) + (t_max - lse[None, :])[:, None, :],
                       [ROWS, BLOCK_M])
        x = tl.where(ok[:, None] & row_ok[None, :], x, float("-inf"))
        x = tl.reshape(x, [ROWS, BLOCK_M // G_P, G_P])
        agg = tl.sum(tl.exp2(x), 2) / G if MEAN else tl.max(x, 2)
        if HEAD_MAX:  # padding heads hold -inf (0 once exponentiated): below any real head's score
            agg = tl.max(agg, 1, keep_dims=True)
        agg = agg if MEAN else tl.exp2(agg)
        if HEAD_MAX:
            tl.store(out_base + offs[:, None], agg, mask=ok[:, None] & (heads == 0)[None, :])
        else:
            tl.store(out_base + offs[:, None], agg, mask=ok[:, None] & head_ok)
    # Rows at and past start_pos[b] score -inf; the splits share them out as they share the context.
    lo, hi = split_range(seq_len - start, split, n_splits, BLOCK_N)
    for n0 in tl.range(start + lo, start + hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        neg = tl.full([BLOCK_N, BLOCK_M // G_P], float("-inf"), tl.float32)
        tl.store(out_base + offs[:, None], neg, mask=(offs < start + hi)[:, None] & ((heads == 0) if HEAD_MAX else head_ok))


def context_scores_triton(
    q: Tensor,
    k_cache: Tensor,
    start_pos: Tensor,
    aggregate: Aggregate = "max",
    *,
    max_heads: bool = False,
    config: KernelConfig | None = None,
) -> Tensor:
    """Return ``[B, Hq, S]`` float32 scores of the context rows, ``-inf`` at and past ``start_pos[b]``; with
    ``max_heads``, ``[B, S]``: their max over the query heads (STS's default map scores a draft layer so).

    ``q`` ``[B, Hq, G, D]`` (G queries per head), ``k_cache`` ``[B, Hkv, S, D]`` in ``q``'s dtype or float8 e4m3
    (:meth:`~sts.models.transformer.KVCache.keep_score_keys`: half the bytes of 16-bit keys; the queries are then
    rounded to float8 e4m3 too and multiplied on float8 tensor cores: widening each K tile to 16 bits instead left
    pass 1 as slow as over 16-bit keys, 160 against 168 us a draft layer at 32K, batch 16, on the H200). Each query's
    softmax runs over the rows ``< start_pos[b]``; probabilities are aggregated over the G
    queries (``"max"`` or ``"mean"``). Equal to :func:`sts.attention.scores.context_scores`
    on the first ``max(start_pos)`` columns (``max_heads``: its ``amax(1)``). No host synchronisation.

    With ``max_heads`` each program writes the max over its KV head's query heads, ``[B, Hkv, S]``, and one
    reduction over the KV heads follows: a quarter of the writes and reads of the per-head scores at 4 query
    heads per KV head. Scratch memory while it runs: the stored logits, ``B * Hkv * S`` rows of the KV head's query
    rows (padded to a power of two) in float16 (float32 for float32 inputs): 134 MB for 16 sequences of 32K rows and
    16 query rows per KV head, 8 KV heads.
    """
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    b, hq, g, d = q.shape
    hkv, seq_len = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[-1] != d or hq % hkv or k_cache.stride(-1) != 1:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k_cache.shape)} (last dim contiguous)")
    if start_pos.shape != (b,):
        raise ValueError(f"start_pos must be [B], got {tuple(start_pos.shape)}")
    q = q.contiguous()
    # Three stages: 81.6 us against 87.1 with two for 16 query rows over 128K rows of head dim 64 (H200, 2026-11-30).
    cfg = config or KernelConfig(block_n=128, num_stages=3)
    gq = hq // hkv
    g_p = triton.next_power_of_2(g)
    gq_p = triton.next_power_of_2(gq)
    g_p = max(g_p, 16 // gq_p)  # the matrix units want at least 16 query rows
    # Both passes fit four programs per SM (small tiles, no V).
    n_splits = cfg.num_splits or split_count(seq_len, b * hkv, q.device, cfg.block_n, per_sm=4)
    block_m = gq_p * g_p

    m_part = torch.empty(b * hkv * n_splits * block_m, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    # The logits, as offsets below their tile's max: float16 for 16-bit inputs, float32 for float32 ones.
    off_dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    offsets = torch.empty(b * hkv * seq_len * block_m, device=q.device, dtype=off_dtype)
    tile_max = torch.empty(b * hkv * triton.cdiv(seq_len, cfg.block_n) * block_m, device=q.device, dtype=torch.float32)
    out = torch.empty(b, hkv if max_heads else hq, seq_len, device=q.device, dtype=torch.float32)
    meta = dict(GQ=gq, G=g, G_P=g_p, BLOCK_M=block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    grid = (b * hkv, n_splits)
    _score_stats_kernel[grid](
        q, k_cache, start_pos, m_part, l_part, offsets, tile_max, *q.stride()[:3], *k_cache.stride()[:3],
        hkv, seq_len, LOG2E / math.sqrt(d), n_splits, HEAD_DIM=d, PRECISION=dot_precision(q.dtype),
        EIGHT_BIT=k_cache.dtype == torch.float8_e4m3fn, **meta,
    )  # fmt: skip
    _score_probs_kernel[grid](
        start_pos, m_part, l_part, offsets, tile_max, out, out.stride(0), out.stride(1), hkv, seq_len, n_splits,
        BLOCK_S=triton.next_power_of_2(n_splits), SUB=4, MEAN=aggregate == "mean", HEAD_MAX=max_heads, **meta,
    )  # fmt: skip
    return out.amax(1) if max_heads else out
