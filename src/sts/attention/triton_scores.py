"""Triton kernel for context scores: what the draft's queries attend to, aggregated per query head.

Same values as :func:`sts.attention.scores.context_scores` but with a static width: the result
is ``[B, Hq, S]`` (S the cache length) with ``-inf`` at and past ``start_pos[b]``, where the
reference returns ``[B, Hq, max(start_pos)]``. On ``[..., :max(start_pos)]`` the two agree;
a top-k over the extra ``-inf`` columns only ever picks rows ``>= start_pos[b]``, which the
verify kernel treats as padding. A static width keeps the call free of host synchronisation
(CUDA-graph safe); to score fewer rows, pass a view ``k_cache[:, :, :n]``.

Two passes over K (V is never read), each split over the context like the verify kernel:
pass 1 computes each query's softmax statistics (max and sum) per split; pass 2 merges them
into a log-sum-exp, recomputes the logits and writes the aggregated probabilities. Reading K
twice costs the same bytes as writing and re-reading the ``G``-times larger float32 logits.
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
    q_ptr, k_ptr, start_ptr, m_part_ptr, l_part_ptr,
    stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_ks,
    n_kv_heads, qk_scale, n_splits,
    GQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    split = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q_t, _ = _score_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qg, d, GQ, G, G_P, BLOCK_M)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    start = tl.load(start_ptr + b).to(tl.int32)
    lo, hi = split_range(start, split, n_splits, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        s = _score_logits(q_t, k_base, stride_ks, offs, offs < hi, d, qk_scale, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[None, :]), 0)
        m_i = m_new
    part = (bh * n_splits + split) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(m_part_ptr + part, m_i)
    tl.store(l_part_ptr + part, l_i)


@triton.jit
def _score_probs_kernel(
    q_ptr, k_ptr, start_ptr, m_part_ptr, l_part_ptr, out_ptr,
    stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_ks, stride_ob, stride_oh,
    n_kv_heads, seq_len, qk_scale, n_splits,
    GQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    MEAN: tl.constexpr, HEAD_MAX: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    split = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q_t, row_ok = _score_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qg, d, GQ, G, G_P, BLOCK_M)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    start = tl.load(start_ptr + b).to(tl.int32)

    # Every program merges all splits' statistics itself: a few KB from L2, one launch fewer.
    sp = tl.arange(0, BLOCK_S)
    part = (bh * n_splits + sp[:, None]) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    m_all = tl.load(m_part_ptr + part, mask=sp[:, None] < n_splits, other=float("-inf"))
    l_all = tl.load(l_part_ptr + part, mask=sp[:, None] < n_splits, other=0.0)
    m_max = tl.max(m_all, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    lse = m_safe + tl.log2(tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0))

    heads = tl.arange(0, BLOCK_M // G_P)
    head_ok = (heads < GQ)[None, :]
    # HEAD_MAX: one column per KV head (the max over its query heads), else one per query head.
    out_base = out_ptr + b * stride_ob + (h + 0 * heads[None, :] if HEAD_MAX else (h * GQ + heads)[None, :]) * stride_oh
    lo, hi = split_range(start, split, n_splits, BLOCK_N)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        ok = offs < hi
        s = _score_logits(q_t, k_base, stride_ks, offs, ok, d, qk_scale, PRECISION)
        p = tl.where(row_ok[None, :], tl.exp2(s - lse[None, :]), 0.0)
        p = tl.reshape(p, [BLOCK_N, BLOCK_M // G_P, G_P])
        agg = tl.sum(p, 2) / G if MEAN else tl.max(p, 2)
        if HEAD_MAX:  # padding heads hold 0, below any real probability's max but never above it
            agg = tl.max(agg, 1, keep_dims=True)
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

    ``q`` ``[B, Hq, G, D]`` (G queries per head), ``k_cache`` ``[B, Hkv, S, D]``. Each query's
    softmax runs over the rows ``< start_pos[b]``; probabilities are aggregated over the G
    queries (``"max"`` or ``"mean"``). Equal to :func:`sts.attention.scores.context_scores`
    on the first ``max(start_pos)`` columns (``max_heads``: its ``amax(1)``). No host synchronisation.

    With ``max_heads`` each program writes the max over its KV head's query heads, ``[B, Hkv, S]``, and one
    reduction over the KV heads follows: a quarter of the writes and reads of the per-head scores at 4 query
    heads per KV head.
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
    out = torch.empty(b, hkv if max_heads else hq, seq_len, device=q.device, dtype=torch.float32)
    common = dict(
        GQ=gq, G=g, G_P=g_p, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    grid = (b * hkv, n_splits)
    strides = (*q.stride()[:3], *k_cache.stride()[:3])
    qk_scale = LOG2E / math.sqrt(d)
    _score_stats_kernel[grid](q, k_cache, start_pos, m_part, l_part, *strides, hkv, qk_scale, n_splits, **common)
    _score_probs_kernel[grid](
        q, k_cache, start_pos, m_part, l_part, out, *strides, out.stride(0), out.stride(1),
        hkv, seq_len, qk_scale, n_splits, BLOCK_S=triton.next_power_of_2(n_splits), MEAN=aggregate == "mean",
        HEAD_MAX=max_heads, **common,
    )  # fmt: skip
    return out.amax(1) if max_heads else out
