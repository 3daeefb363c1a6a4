"""Probe: what limits pass 1 of STS's score kernel (sts.attention.triton_scores) when the draft's keys are 8-bit.

A copy of pass 1 with switches: STORE=0 skips the logit offsets' stores (what pass 2 reads back), FP8_DOT=1 rounds
the queries to float8 and multiplies on float8 tensor cores instead of widening each K tile to bf16. Times per call
(one draft layer, CUDA graphs) at the 1B draft's shapes, 16-bit and 8-bit keys.

    OUT=. python docs/bench/pass1_probe.py      # writes $OUT/pass1-probe.json
"""
import itertools
import json
import math
import os

import torch
import triton
import triton.language as tl

from sts.attention.triton_scores import _score_queries
from sts.attention.triton_verify import LOG2E, load_rows, program_head, split_count, split_range
from sts.bench.kernels import copies, time_calls


@triton.jit
def pass1(
    q_ptr, k_ptr, start_ptr, m_part_ptr, l_part_ptr, off_ptr, tmax_ptr,
    stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_ks,
    n_kv_heads, seq_len, qk_scale, n_splits,
    GQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE: tl.constexpr, FP8_DOT: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    split = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_M)
    q_t, _ = _score_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qg, d, GQ, G, G_P, BLOCK_M)
    if FP8_DOT:
        q_t = q_t.to(tl.float8e4nv)
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
        k = load_rows(k_base, offs, stride_ks, ok, d)
        k = k if FP8_DOT else k.to(tl.bfloat16)
        s = tl.where(ok[:, None], tl.dot(k, q_t) * qk_scale, float("-inf"))
        t_max = tl.max(s, 0)
        if STORE:
            tl.store(tmax_base + (n0 // BLOCK_N) * BLOCK_M + cols, t_max)
            below = (s - t_max[None, :]).to(off_ptr.dtype.element_ty)
            tl.store(off_base + offs[:, None] * BLOCK_M + cols[None, :], below, mask=ok[:, None])
        m_new = tl.maximum(m_i, t_max)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[None, :]), 0)
        m_i = m_new
    part = (bh * n_splits + split) * BLOCK_M + cols
    tl.store(m_part_ptr + part, m_i)
    tl.store(l_part_ptr + part, l_i)


HQ, HKV, G, D, BLOCK_N = 32, 8, 4, 64, 128
records = []
for b, ctx in ((16, 32768), (1, 131072)):
    q = torch.randn(b, HQ, G, D, device="cuda", dtype=torch.bfloat16)
    start = torch.full((b,), ctx, device="cuda")
    s = ctx + 64
    n_splits = split_count(s, b * HKV, q.device, BLOCK_N, per_sm=4)
    block_m = 16
    m_part = torch.empty(b * HKV * n_splits * block_m, device="cuda")
    l_part = torch.empty_like(m_part)
    offsets = torch.empty(b * HKV * s * block_m, device="cuda", dtype=torch.float16)
    tile_max = torch.empty(b * HKV * triton.cdiv(s, BLOCK_N) * block_m, device="cuda")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        keys = [torch.randn(b, HKV, s, D, device="cuda").to(dtype) for _ in range(copies(b * HKV * s * D * dtype.itemsize))]
        for store, fp8_dot in itertools.product((1, 0), (0, 1)):
            if fp8_dot and dtype != torch.float8_e4m3fn:
                continue

            def call(k, store=store, fp8_dot=fp8_dot):
                pass1[(b * HKV, n_splits)](
                    q, k, start, m_part, l_part, offsets, tile_max, *q.stride()[:3], *k.stride()[:3], HKV, s,
                    LOG2E / math.sqrt(D), n_splits, GQ=HQ // HKV, G=G, G_P=4, HEAD_DIM=D, BLOCK_M=block_m,
                    BLOCK_N=BLOCK_N, STORE=store, FP8_DOT=fp8_dot, num_warps=4, num_stages=3)

            us, mode = time_calls([lambda k=k: call(k) for k in keys])
            records.append(dict(batch=b, context=ctx, keys=str(dtype), store=store, fp8_dot=fp8_dot, us=round(us, 1),
                                mode=mode))
            print(records[-1], flush=True)
        del keys
with open(os.path.join(os.environ.get("OUT", "."), "pass1-probe.json"), "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)
