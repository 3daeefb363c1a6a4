"""Triton kernel for one-row linear layers: the autoregressive and draft decode steps at batch 1.

``y = x @ W.T (+ bias)`` for one row ``x`` ``[K]`` and ``W`` ``[N, K]`` (``nn.Linear``'s layout). At one row a
projection only streams its weights: one program owns ``BLOCK_N`` output columns and walks the whole of
``K`` on the CUDA cores (no split, no second reduction kernel as cuBLAS runs for long rows), accumulating
in float32 and reducing once at the end.

``swiglu=True`` folds SwiGLU into the load of ``x`` (a launch less per layer): ``x`` is a gate/up
projection's output ``[2K]`` and the product reads ``silu(x[:K]) * x[K:]``, computed in float32 and rounded
once to the weight dtype, as the compiled element-wise kernel it replaces does.

Measured on an H200 (2026-11-30, docs/benchmarks.md): alone in CUDA graphs, q/k/v and o projections ran
1.16-1.69x and down projections with SwiGLU folded in 1.24-1.75x cuBLAS's speed; in the product's graphs
the 8B target's decode step got 5% faster, the 1B draft's steps not measurably. Pipelining the weight loads
through shared memory (``num_stages`` > 1) was faster alone but slowed the speculative rounds' graphs by
2%, so the loads are not staged. Two to 16 rows in one tensor-core tile matched or beat cuBLAS alone
but slowed verification by 1% in the graphs: more than one row stays with cuBLAS. Static shapes only:
safe in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class LinearConfig:
    """Launch parameters of :func:`gemv`: output columns per program, the K tile, warps and pipeline stages."""

    block_n: int = 16
    block_k: int = 1024
    num_warps: int = 8
    num_stages: int = 1


def linear_config(n: int, k: int, gated: bool = False) -> LinearConfig | None:
    """Return the launch for one row through an ``[n, k]`` weight (``gated``: with SwiGLU folded in), or None where
    cuBLAS streamed it as fast (gate/up projections, ``n >= 4k``). From ``docs/bench/linear_probe.py`` on an H200."""
    if n >= 32768:  # LM heads
        return LinearConfig(16, 256, 4, 1)
    if n >= 4 * k and not gated:
        return None
    if gated or k > 2 * n:  # down projections
        return LinearConfig(8, 1024, 4, 1)
    return LinearConfig(8, 512, 4, 1) if n > k else LinearConfig(16, 1024, 8, 1)


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
