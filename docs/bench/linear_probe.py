"""Micro: one-row linear layers in CUDA graphs, cuBLAS (F.linear) against a Triton matrix-vector kernel.

The kernel below served sts's one-row projections in commits 7e3484f..0b82049 (with SwiGLU folded into the
down projection) and was taken out again: faster than cuBLAS alone, it made the 8B target's decode step 4%
faster in the product's graphs but dense speculative rounds 2.6% slower (docs/benchmarks.md).

Shapes of the synthetic Llama 8B target / 1B draft and the Qwen2.5 1.5B / 0.5B demo pair. Each call reads
a different copy of its weight (at least 384 MB of copies in all, so the 50 MB L2 never holds the next one),
as a model's layers do. Prints and writes $OUT/linear-probe.json: us per call and TB/s of weight bytes.

    [ONLY=substring] python docs/bench/linear_probe.py [configs]   # configs: block_n/block_k/warps/stages,...
"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from sts.models.transformer import swiglu


@dataclass(frozen=True)
class LinearConfig:
    """Launch parameters of :func:`gemv`: output columns per program, the K tile, warps and pipeline stages."""

    block_n: int = 16
    block_k: int = 1024
    num_warps: int = 8
    num_stages: int = 1


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if SWIGLU:
            gate = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
            x = (gate * tl.sigmoid(gate) * up).to(w.dtype)
        else:
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=col_ok)


def gemv(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, swiglu: bool = False, config: LinearConfig | None = None,
) -> Tensor:
    """Return ``x @ weight.T + bias`` ``[..., N]`` for one row ``x`` ``[..., K]`` (every leading dimension 1).

    ``weight`` ``[N, K]`` with contiguous rows, ``bias`` ``[N]`` or None, all of one dtype. With ``swiglu``, ``x``
    is a gate/up projection's output ``[..., 2K]`` and the product takes ``silu(x[:K]) * x[K:]`` (SwiGLU,
    Shazeer 2020) in its place. Raises ``ValueError`` for more than one row or mismatched widths.
    """
    cfg = config or LinearConfig()
    n, k = weight.shape
    width = 2 * k if swiglu else k
    if x.shape[-1] != width or x.numel() != width or weight.stride(-1) != 1:
        raise ValueError(f"gemv takes one row of width {width} and a weight with contiguous rows; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    row = x.reshape(width)
    if row.stride(0) != 1:
        row = row.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        row, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, SWIGLU=swiglu, BLOCK_N=cfg.block_n,
        BLOCK_K=min(cfg.block_k, triton.next_power_of_2(k)), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.view(*x.shape[:-1], n)


OUT = os.environ.get("OUT", "/tmp")
SHAPES = {  # name: (N, K)
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
    "1b.lm_head": (128256, 2048),
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "q0.5b.qkv": (1152, 896), "q0.5b.o": (896, 896), "q0.5b.gate_up": (9728, 896), "q0.5b.down": (896, 4864),
    "q1.5b.qkv": (2048, 1536), "q1.5b.o": (1536, 1536), "q1.5b.gate_up": (17920, 1536), "q1.5b.down": (1536, 8960),
}


def timed(calls, reps=10):
    """Return us per call of ``calls`` (a list of thunks) replayed in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / len(calls)


def main():
    configs = [LinearConfig(*map(int, c.split("/"))) for c in (sys.argv[1].split(",") if len(sys.argv) > 1 else [])]
    configs = configs or [LinearConfig()]
    res = []
    only = os.environ.get("ONLY", "")
    for name, (n, k) in SHAPES.items():
        if only not in name:
            continue
        nbytes = n * k * 2
        copies = max(2, min(64, -(-384 * 2**20 // nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        m = 1
        fold = name.endswith("down")  # SwiGLU folded into the down projection (the model's use)
        x = torch.randn(m, 2 * k if fold else k, device="cuda", dtype=torch.bfloat16)
        if fold:
            gate, up = x.chunk(2, dim=-1)
            ref_calls = [lambda w=w: F.linear(swiglu(gate, up), w) for w in ws]
            ref = F.linear(swiglu(gate, up), ws[0])
        else:
            ref_calls = [lambda w=w: F.linear(x, w) for w in ws]
            ref = F.linear(x, ws[0])
        row = {"shape": name + ("+swiglu" if fold else ""), "n": n, "k": k, "rows": m, "mb": round(nbytes / 1e6, 1),
               "cublas_us": round(timed(ref_calls), 2)}
        timings = []
        for cfg in configs:
            key = f"{cfg.block_n}/{cfg.block_k}/{cfg.num_warps}/{cfg.num_stages}"
            try:
                out = gemv(x, ws[0], swiglu=fold, config=cfg)
                us = timed([lambda w=w: gemv(x, w, swiglu=fold, config=cfg) for w in ws])
            except Exception as e:  # a config past the shared memory
                row[key] = type(e).__name__
                continue
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[key] = round(us, 2)
            row[key + "_err"] = float(f"{err:.2e}")
            timings.append((us, key))
        best = min(timings)
        row["best"] = best[1]
        row["cublas_tbs"] = round(nbytes / row["cublas_us"] / 1e6, 2)
        row["best_tbs"] = round(nbytes / best[0] / 1e6, 2)
        row["speedup"] = round(row["cublas_us"] / best[0], 3)
        print(json.dumps(row), flush=True)
        res.append(row)
        del ws
    with open(os.path.join(OUT, "linear-probe.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": res}, f, indent=1)


if __name__ == "__main__":
    main()
