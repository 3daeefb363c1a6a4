"""Micro: weight-only int8 linear layers (per-output-channel scales) against cuBLAS bf16, 1-16 rows, CUDA graphs.

Written for an int8 draft (gpt-fast's ``int8`` mode: a draft step streams every draft weight, so half the bytes
could be nearly half the time) and measured on 2026-12-01 before wiring it into sts; not in the product
(docs/benchmarks.md, first section: at one row it was 1.17-1.37x cuBLAS, far from 2x, and slower at 4-16 rows on
the down projection). The kernel and its quantizer live here so a later attempt starts from the numbers.

Shapes of the synthetic Llama 3.2 1B draft and the Qwen2.5 0.5B demo draft; each call reads a different copy of its
weight (384 MB of copies, past the 50 MB L2). Prints and writes $OUT/int8-probe.json.

    PYTHONPATH=src python docs/bench/int8_probe.py
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from sts.bench.kernels import time_calls

MAX_ROWS = 16


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(q, scale)`` for ``weight`` ``[N, K]``: int8 ``q`` and float32 ``scale`` ``[N]`` with
    ``weight ~= q * scale[:, None]``, each row's largest magnitude mapped to 127 (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass(frozen=True)
class Int8Config:
    """Launch parameters: output columns per program, the input-width tile, warps and pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: One row: long tiles of few columns (as the bf16 matrix-vector kernel of docs/bench/linear_probe.py).
ONE_ROW = Int8Config(block_n=16, block_k=1024, num_warps=8, num_stages=1)
#: 2-16 rows: 16 x 16 column tiles on the matrix units, loads pipelined.
FEW_ROWS = Int8Config(block_n=16, block_k=256, num_warps=4, num_stages=4)


@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    if BLOCK_M == 1:
        partial = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            partial += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(partial, 1)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & col_ok[None, :])


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                config: Int8Config | None = None) -> Tensor:
    """Return ``x @ (qweight * scale[:, None]).T + bias`` ``[..., N]`` in ``x``'s dtype.

    ``x`` ``[..., K]`` with at most :data:`MAX_ROWS` rows in all; ``qweight`` ``[N, K]`` int8 with contiguous rows;
    ``scale`` ``[N]`` float32; ``bias`` ``[N]`` or None. Accumulates in float32. No host synchronisation: safe to
    capture in a CUDA graph. Raises ``ValueError`` for more rows or mismatched shapes.
    """
    n, k = qweight.shape
    rows = x.numel() // max(x.shape[-1], 1)
    if x.shape[-1] != k or rows > MAX_ROWS or qweight.dtype != torch.int8 or qweight.stride(-1) != 1:
        raise ValueError(f"int8_linear takes up to {MAX_ROWS} rows of width {k} and an int8 [N, K] weight with "
                         f"contiguous rows; got x {tuple(x.shape)}, weight {tuple(qweight.shape)} {qweight.dtype}")
    flat = x.reshape(rows, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    cfg = config or (ONE_ROW if rows == 1 else FEW_ROWS)
    _int8_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
        flat, qweight, scale, bias if bias is not None else scale, out, rows, n, k,
        flat.stride(0), qweight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=1 if rows == 1 else 16, BLOCK_N=cfg.block_n,
        BLOCK_K=min(cfg.block_k, triton.next_power_of_2(k)),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)


SHAPES = {"1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
          "1b.lm_head": (128256, 2048), "q0.5b.gate_up": (9728, 896), "q0.5b.down": (896, 4864)}
CFG1 = [ONE_ROW, Int8Config(16, 2048, 8, 1), Int8Config(32, 1024, 8, 1), Int8Config(8, 2048, 4, 1), Int8Config(16, 512, 4, 2), Int8Config(8, 1024, 4, 1)]
CFGM = [FEW_ROWS, Int8Config(32, 256, 4, 3), Int8Config(16, 512, 4, 3), Int8Config(64, 128, 4, 4), Int8Config(32, 128, 4, 4)]
res = []
for name, (n, k) in SHAPES.items():
    copies = max(2, min(48, -(-384 * 2**20 // (n * k * 2))))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    qs = [quantize_rows(w) for w in ws]
    for rows in (1, 4, 16):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0])
        row = dict(shape=name, rows=rows, bf16_mb=round(n * k * 2 / 1e6, 1))
        row["cublas"] = round(time_calls([lambda w=w: F.linear(x, w) for w in ws])[0], 2)
        best = None
        for cfg in (CFG1 if rows == 1 else CFGM):
            out = int8_linear(x, *qs[0], config=cfg)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            us = time_calls([lambda q=q: int8_linear(x, *q, config=cfg) for q in qs])[0]
            key = f"{cfg.block_n}/{cfg.block_k}/{cfg.num_warps}/{cfg.num_stages}"
            row[key] = round(us, 2); row["err"] = round(err, 4)
            if best is None or us < best[0]: best = (us, key)
        row["best"] = best[1]; row["speedup"] = round(row["cublas"] / best[0], 2)
        row["int8_TBs"] = round(n * k / best[0] / 1e6, 2)
        print(json.dumps(row), flush=True); res.append(row)
    del ws, qs
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "int8-probe.json"), "w"), indent=1)
