"""Triton kernel for linear layers over a few rows: the draft's and target's decode and verify steps.

``y = x @ W.T (+ bias)`` for ``x`` ``[M, K]`` with ``M <= MAX_ROWS`` and ``W`` ``[N, K]`` (``nn.Linear``'s
layout). At one to a few rows a projection only streams its weights, and on an H200 cuBLAS streams the
small matrices of a 1B draft (8-34 MB) at 1.8-2.6 TB/s, splitting long rows into a second reduction
kernel (docs/benchmarks.md). Here one program owns ``BLOCK_N`` output columns for every row and walks
the whole of ``K`` (no split, no second kernel); the ``M`` rows ride along in one ``tl.dot`` tile (padded
to 16, the smallest ``tl.dot`` shape), so each weight byte is read once whatever ``M``.

A single row takes a matrix-vector path on the CUDA cores instead of a 16-row tile.

``swiglu=True`` folds SwiGLU into the load of ``x`` (a launch less per layer): ``x`` is a gate/up
projection's output ``[M, 2K]`` and the product reads ``silu(x[:, :K]) * x[:, K:]``, computed in float32
and rounded once to the weight dtype, as the compiled element-wise kernel it replaces does. Every program
recomputes it over its row tile: at 16 padded rows the 1B draft's down projection took 137 us against
17 for SwiGLU + cuBLAS (H200, 2026-11-30), so the model folds it at one row only. Static shapes only:
safe in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sts.attention.triton_verify import dot_precision

# Most rows one launch serves (one tl.dot tile).
MAX_ROWS = 16


@dataclass(frozen=True)
class LinearConfig:
    """Launch parameters: output columns per program, the K tile, warps and pipeline stages."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 4


def linear_config(n: int, k: int, rows: int, gated: bool = False) -> LinearConfig | None:
    """Return the launch for an ``[n, k]`` weight over ``rows`` rows (``gated``: with SwiGLU folded in), or None
    where cuBLAS was as fast (measured on an H200 in CUDA graphs, bf16, 2026-11-30: ``docs/bench/linear_probe.py``,
    docs/benchmarks.md; the gains over cuBLAS given there).

    One row: q/k/v and o projections 1.16-1.69x, down projections with SwiGLU folded in 1.24-1.75x, LM heads
    1.04x. Two to 16 rows: square projections 1.07-1.35x (o: 1.18x at 8B), LM heads 1.04x, q/k/v ties. Gate/up
    projections (``n >= 4k``) and, past one row, down projections stay with cuBLAS, which streams them as fast.
    """
    if rows > MAX_ROWS or rows < 1:
        return None
    if n >= 32768:  # LM heads
        return LinearConfig(16, 256, 4, 3) if rows == 1 else LinearConfig(64, 256, 4, 3)
    if n >= 4 * k or (rows > 1 and (gated or k > 2 * n)):
        return None
    if rows == 1:
        if gated or k > 2 * n:
            return LinearConfig(8, 1024, 4, 3)
        return LinearConfig(8, 512, 4, 3) if n > k else LinearConfig(16, 1024, 8, 3)
    if n * k <= 2**22:
        return LinearConfig(16, 512, 4, 3)
    if n > k and n * k >= 2**24:
        return LinearConfig(64, 128, 4, 5)
    return LinearConfig(32, 512, 4, 3)


@triton.jit
def _load_x(x_ptr, offs, ok, K, SWIGLU: tl.constexpr, dtype: tl.constexpr):
    """Return the ``x`` tile at ``offs`` (row offset + column): ``x`` itself, or with ``SWIGLU``
    ``silu(gate) * up`` of the row's halves ``[gate | up]`` (float32, rounded once to ``dtype``)."""
    if SWIGLU:
        gate = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + offs + K, mask=ok, other=0.0).to(tl.float32)
        return (gate * tl.sigmoid(gate) * up).to(dtype)
    return tl.load(x_ptr + offs, mask=ok, other=0.0)


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if BLOCK_M == 1:  # one row: a matrix-vector product on the CUDA cores, reduced once at the end
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x = _load_x(x_ptr, k, k_ok, K, SWIGLU, w.dtype)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=col_ok)
    else:  # up to 16 rows in one tensor-core tile
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x = _load_x(x_ptr, rows[:, None] * stride_xm + k[None, :], row_ok[:, None] & k_ok[None, :], K, SWIGLU,
                        w.dtype)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def skinny_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, swiglu: bool = False, config: LinearConfig | None = None,
) -> Tensor:
    """Return ``x @ weight.T + bias`` ``[..., N]`` for ``x`` ``[..., K]`` of at most ``MAX_ROWS`` rows in all.

    ``weight`` ``[N, K]`` with contiguous rows, ``bias`` ``[N]`` or None, all of one dtype. With ``swiglu``, ``x`` is a
    gate/up projection's output ``[..., 2K]`` and the product takes ``silu(x[..., :K]) * x[..., K:]``
    (SwiGLU, Shazeer 2020) in its place; every program recomputes it for all rows, which pays at one row
    only. Raises ``ValueError`` for more than ``MAX_ROWS`` rows or mismatched widths.
    """
    cfg = config or LinearConfig()
    n, k = weight.shape
    width = 2 * k if swiglu else k
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.shape[-1] != width or rows > MAX_ROWS or weight.stride(-1) != 1:
        raise ValueError(f"skinny_linear takes up to {MAX_ROWS} rows of width {width} and a weight with contiguous rows; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    flat = x.reshape(rows, width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n),)
    _skinny_linear_kernel[grid](
        flat, weight, bias if bias is not None else weight, out, rows, n, k, flat.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, SWIGLU=swiglu, PRECISION=dot_precision(weight.dtype),
        BLOCK_M=1 if rows == 1 else MAX_ROWS, BLOCK_N=cfg.block_n,
        BLOCK_K=max(16, min(cfg.block_k, triton.next_power_of_2(k))),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.view(*x.shape[:-1], n)
