"""Split-KV Triton kernel: the target's verification attention over selected (or all) cached rows.

Same contract as :func:`sts.attention.reference.sparse_attention` (and, with ``indices=None``,
:func:`sts.attention.reference.dense_attention`); the conventions are in that module's docstring.

Layout of the work. One program serves one KV head of one sequence and one slice ("split") of
its selected rows: the ``G * T`` query rows of the GQA group (G query heads x T new tokens) are
packed into a single tile, so each selected K/V row is read from memory once for all of them.
The index list (or, on the dense path, the context ``0 .. start_pos[b] - 1``) is cut into
``num_splits`` slices, the last of which also attends causally to the T new rows; every slice
writes a normalised partial output and its log-sum-exp, and the slices are merged (flash-decoding): by the
last program of each (sequence, KV head) to finish, which a counter per pair tells (one launch), or by a
second kernel. Matrix products run transposed (keys x query rows) so that on Hopper they are
wgmma with the long key axis as M; the K/V gathers are software-pipelined by Triton (cp.async,
two tiles in flight per program), which works because each split's indices are loaded before
its loop. The split count comes from static shapes only (K or
S, batch, heads and the SM count), never from ``start_pos`` values, so the launch can be
captured in a CUDA graph; on the dense path each split's share of the context is computed on
the device from ``start_pos[b]``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
# Most index tiles one split holds in registers (more splits are used beyond that).
_MAX_TILES = 32


# Most slices the split kernel's last program merges itself (more: a second kernel merges them in parallel).
FUSED_MERGE_SPLITS = 8
# Arrival counters of the fused merge, one int32 per (sequence, KV head), per device. Each launch leaves its counters
# at zero (the last program resets them); pools are never freed, as CUDA graphs keep their addresses. Kernels on one
# device that share them must not run concurrently (the engine launches them on one stream).
_COUNTERS: dict[torch.device, list[Tensor]] = {}


def split_counters(device: torch.device, n: int) -> Tensor | None:
    """Return ``n`` zeroed int32 arrival counters for one launch on ``device`` (None while a CUDA graph is being
    captured before any pool large enough exists: the caller then merges in a second launch)."""
    pools = _COUNTERS.setdefault(device, [])
    if not pools or pools[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        pools.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return pools[-1][:n]


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of a split-KV kernel; ``num_splits=None`` lets the wrapper fill the GPU."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None
    #: Merge the slices in the split kernel's last program per (sequence, KV head) rather than in a second launch.
    fused_merge: bool = True


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # Triton interpreter: the count only shapes the test grid
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(n_rows: int, n_groups: int, device: torch.device, block_n: int, per_sm: int = 2,
                min_rows: int | None = None) -> int:
    """Return how many slices to cut ``n_rows`` rows into so ``n_groups`` x slices fills the GPU once.

    ``per_sm`` is how many programs one SM runs at once (2 for the verify kernel's default
    config, bound by shared memory): filling exactly one such wave beats a second, partial
    wave of equally long programs, and more splits only add partial outputs to merge
    (measured on an H200). Static: depends on shapes only, so it is safe under CUDA graphs.
    Each slice keeps at least ``min_rows`` rows (default two blocks of ``block_n``, so that its loads overlap its
    arithmetic); gathered rows want smaller slices: at 512 indexed rows per KV head (a 512-row budget at batch 1)
    16 slices of 32 rows took 7.8 us per call against 10.6 us for 4 of 128 (H200, 2026-11-30, docs/benchmarks.md).
    """
    per_group = max(1, per_sm * _sm_count(device) // n_groups)
    return max(1, min(per_group, triton.cdiv(n_rows, min_rows or 2 * block_n)))


def dot_precision(dtype: torch.dtype) -> str:
    """Return the ``tl.dot`` input precision: exact for float32 inputs (no TF32 rounding)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def split_range(n, split, n_splits, BLOCK_N: tl.constexpr):
    """Return ``[lo, hi)``: the ``split``-th of ``n_splits`` block-aligned slices of ``0 .. n - 1``."""
    chunk = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(lo + chunk, n)


@triton.jit
def load_rows(base, rows, stride, ok, d):
    """Return the cache rows ``base[rows[i]]`` as a ``[len(rows), D]`` tile (zeros where not ``ok``)."""
    return tl.load(base + rows[:, None] * stride + d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def program_head(n_kv_heads):
    """Return this program's (sequence x KV head) number along grid axis 0, its sequence and its KV head (int64)."""
    bh = tl.program_id(0)
    return bh, (bh // n_kv_heads).to(tl.int64), (bh % n_kv_heads).to(tl.int64)


@triton.jit
def load_queries(
    q_ptr, b, h, stride_qb, stride_qh, stride_qt, d,
    GROUP: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Return the ``[D, BLOCK_M]`` transposed query tile of KV head ``h``'s group, its row numbers and real rows.

    Row ``r = g * T + t`` holds query head ``h * GROUP + g`` at new token ``t``; rows past
    ``GROUP * T`` are zeros.
    """
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * T
    q_rows = q_ptr + b * stride_qb + (h * GROUP + rows // T) * stride_qh + (rows % T) * stride_qt
    return tl.load(q_rows[None, :] + d[:, None], mask=row_ok[None, :], other=0.0), rows, row_ok


@triton.jit
def _logits(q_t, k, mask, qk_scale, PRECISION: tl.constexpr):
    """Return the masked base-2 logits ``[keys, rows]`` of one key tile.

    Everything is transposed (keys x query rows): the long key axis is the matrix-unit M side,
    so on Hopper both products run as wgmma with operands in shared memory instead of
    replicating the query tile in every warp's registers.
    """
    s = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _accumulate(s, v, m_i, l_i, acc_t, PRECISION: tl.constexpr):
    """Return the online-softmax state ``(m, l, acc^T)`` after adding one tile's logits ``s`` and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 0))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[None, :])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=PRECISION)
    return m_new, l_i, acc_t


@triton.jit
def _merge_own_parts(
    o_part_ptr, lse_part_ptr, out_ptr, bh, b, h, rows, row_ok, d, n_splits,
    stride_ob, stride_oh, stride_ot,
    GROUP: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Write the merged output of every query row of (sequence ``b``, KV head ``h``) from its ``n_splits`` partials,
    which other programs wrote (read past the L1, which is not coherent across SMs)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([HEAD_DIM, BLOCK_M], tl.float32)
    for split in tl.range(0, n_splits):
        part = (bh * n_splits + split) * (GROUP * T) + rows
        lse = tl.load(lse_part_ptr + part, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        o_t = tl.load(o_part_ptr + part[None, :] * HEAD_DIM + d[:, None], mask=row_ok[None, :], other=0.0,
                      cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale, w = tl.exp2(m - m_safe), tl.exp2(lse - m_safe)
        denom = denom * scale + w
        acc_t = acc_t * scale[None, :] + o_t * w[None, :]
        m = m_new
    out_t = (acc_t / tl.where(denom > 0.0, denom, 1.0)[None, :]).to(out_ptr.dtype.element_ty)
    heads = h * GROUP + rows // T
    tl.store(out_ptr + b * stride_ob + heads[None, :] * stride_oh + (rows % T)[None, :] * stride_ot + d[:, None],
             out_t, mask=row_ok[None, :])


@triton.jit
def _verify_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, start_ptr, o_part_ptr, lse_part_ptr, logit_ptr, count_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ih, stride_ob, stride_oh, stride_ot,
    n_kv_heads, seq_len, n_idx, qk_scale, n_splits,
    GROUP: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
    HAS_INDICES: tl.constexpr, STORE_LOGITS: tl.constexpr, PRECISION: tl.constexpr, FUSED_MERGE: tl.constexpr,
):  # fmt: skip
    bh, b, h = program_head(n_kv_heads)
    split = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    q_t, rows, row_ok = load_queries(q_ptr, b, h, stride_qb, stride_qh, stride_qt, d, GROUP, T, BLOCK_M)
    t = rows % T
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    start = tl.load(start_ptr + b).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([HEAD_DIM, BLOCK_M], tl.float32)
    lo, hi = split_range(n_idx if HAS_INDICES else start, split, n_splits, BLOCK_N)
    n_ctx = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    if HAS_INDICES:
        # The split's whole index list, loaded up front: each tile's rows then follow from the
        # loop counter by arithmetic, not from a load in the loop, so the compiler's pipeliner
        # can issue the K/V gathers several tiles ahead (it cannot for loop-carried indirection).
        idx_base = idx_ptr + b * stride_ib + h * stride_ih
        tiles = tl.arange(0, TILES)
        slots = lo + tiles[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        all_keys = tl.load(idx_base + slots, mask=slots < hi, other=0).to(tl.int32)
    # The last split takes one more tile: the T new rows, causally. Folding them into the same
    # loop keeps one program per (split, head) and a single code path for the matrix products
    # (a separate branch with its own products read shared memory out of bounds on sm_90 with
    # Triton 3.6, per compute-sanitizer).
    for i in tl.range(0, n_ctx + (split == n_splits - 1)):
        is_new = i == n_ctx
        offs = lo + i * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = offs < hi
        j = tl.arange(0, BLOCK_N)  # new row j sits at start + j
        if HAS_INDICES:
            keys = tl.sum(tl.where(tiles[:, None] == i, all_keys, 0), 0)
            # Invalid (padding) entries are masked out of the loads too: they cost no bandwidth.
            ok = in_range & (keys < start)
            # New rows past the cache are clamped to its last row, as the reference does.
            new_pos = tl.minimum(start + j, seq_len - 1)
            new_ok = j < T
        else:
            keys = offs
            ok = in_range
            new_pos = start + j
            new_ok = (j < T) & (new_pos < seq_len)
        keys = tl.where(is_new, new_pos, keys)
        ok = tl.where(is_new, new_ok, ok)
        k = load_rows(k_base, keys, stride_ks, ok, d)
        v = load_rows(v_base, keys, stride_vs, ok, d)
        visible = ok[:, None] & ((j[:, None] <= t[None, :]) | (i < n_ctx))
        s = _logits(q_t, k, visible, qk_scale, PRECISION)
        m_i, l_i, acc_t = _accumulate(s, v, m_i, l_i, acc_t, PRECISION)
        if STORE_LOGITS:
            logit_rows = logit_ptr + (bh * (GROUP * T) + rows) * n_idx
            store_ok = in_range[:, None] & row_ok[None, :] & (i < n_ctx)
            tl.store(logit_rows[None, :] + offs[:, None], s, mask=store_ok)

    has_mass = l_i > 0.0
    lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
    out_t = acc_t / tl.where(has_mass, l_i, 1.0)[None, :]
    part = (bh * n_splits + split) * (GROUP * T) + rows
    tl.store(o_part_ptr + part[None, :] * HEAD_DIM + d[:, None], out_t, mask=row_ok[None, :])
    tl.store(lse_part_ptr + part, lse, mask=row_ok)
    if FUSED_MERGE:
        # Every thread's partial stores precede the arrival, whose release makes them visible GPU-wide (the barrier
        # then one releasing atomic, as CUTLASS's split-K semaphore does); the last program to arrive acquires them
        # all, merges, and leaves the counter at zero for the next launch.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            _merge_own_parts(o_part_ptr, lse_part_ptr, out_ptr, bh, b, h, rows, row_ok, d, n_splits,
                             stride_ob, stride_oh, stride_ot, GROUP, T, HEAD_DIM, BLOCK_M)
            tl.atomic_xchg(count_ptr + bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _verify_merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
    stride_ob, stride_oh, stride_ot, n_kv_heads, n_parts,
    GROUP: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # one query row of one (sequence, KV head)
    bh = pid // (GROUP * T)
    r = pid % (GROUP * T)
    # Partial s of this row: lse at part0 + s * GROUP * T, output row there times HEAD_DIM.
    part0 = bh * n_parts * (GROUP * T) + r
    p = tl.arange(0, BLOCK_P)
    lse_all = tl.load(lse_part_ptr + part0 + p * (GROUP * T), mask=p < n_parts, other=float("-inf"))
    lse_max = tl.max(lse_all, 0)
    denom = tl.sum(tl.exp2(lse_all - lse_max), 0)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    # The [n_parts, D] partial outputs are summed in slices to keep the tile in registers.
    for s0 in tl.range(0, n_parts, BLOCK_S):
        ok = s0 + s < n_parts
        part = part0 + (s0 + s) * (GROUP * T)
        w = tl.exp2(tl.load(lse_part_ptr + part, mask=ok, other=float("-inf")) - lse_max)
        o = tl.load(o_part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    b = (bh // n_kv_heads).to(tl.int64)
    head = (bh % n_kv_heads) * GROUP + r // T
    out = (acc / denom).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + (r % T) * stride_ot + d, out)
    if STORE_LSE:
        tl.store(lse_ptr + pid, lse_max + tl.log2(denom))


@triton.jit
def _importance_kernel(
    logit_ptr, lse_ptr, imp_ptr, n_idx,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    lse = tl.load(lse_ptr + bh * ROWS + r, mask=r < ROWS, other=0.0)
    ok = (r < ROWS)[:, None] & (k < n_idx)[None, :]
    logits = tl.load(logit_ptr + (bh * ROWS + r)[:, None] * n_idx + k[None, :], mask=ok, other=float("-inf"))
    tl.store(imp_ptr + bh * n_idx + k, tl.max(tl.exp2(logits - lse[:, None]), 0), mask=k < n_idx)


def _check_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> None:
    b, hq, _, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or hq % k_cache.shape[1]:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if k_cache.shape[-1] != d or d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {d} unsupported (16..256, a power of two, same for q and cache)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q's and the caches' last dimension must be contiguous")
    if start_pos.shape != (b,):
        raise ValueError(f"start_pos must be [B], got {tuple(start_pos.shape)}")


def sparse_verify_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start_pos: Tensor,
    indices: Tensor | None = None,
    *,
    return_importance: bool = False,
    config: KernelConfig | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Return ``[B, Hq, T, D]`` attention over the selected context rows plus, causally, the new rows.

    ``q`` ``[B, Hq, T, D]``; ``k_cache`` / ``v_cache`` ``[B, Hkv, S, D]`` with the new rows
    already written at ``start_pos[b] + t``; ``indices`` ``[B, Hkv, K]`` (int32 or int64; an
    entry is valid iff ``< start_pos[b]``), or ``None`` for every context row (dense). No host
    synchronisation: safe to capture in a CUDA graph.

    With ``return_importance`` (sparse path only) also returns ``[B, Hkv, K]`` float32: for
    each selected row the largest attention probability it got from any query of the group
    (any of the G query heads and T tokens); 0 for invalid entries. It costs one float32 write
    and read of the ``G * T * K`` logits, about 30% more traffic for G*T = 20 at D = 128.

    Up to :data:`FUSED_MERGE_SPLITS` slices (and without ``return_importance``) the kernel's last
    program per (sequence, KV head) merges them, counting arrivals in a per-device buffer
    (:func:`split_counters`): two calls on one device must not run at the same time on different
    streams.
    """
    _check_inputs(q, k_cache, v_cache, start_pos)
    if return_importance and indices is None:
        raise ValueError("return_importance needs indices")
    cfg = config or KernelConfig()
    b, hq, t, d = q.shape
    if t > cfg.block_n:
        raise ValueError(f"{t} new tokens do not fit one tile of block_n={cfg.block_n} rows")
    hkv, seq_len = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    rows = group * t
    has_indices = indices is not None
    if has_indices:
        if indices.shape[:2] != (b, hkv) or indices.stride(-1) != 1:
            raise ValueError(f"indices must be [B, Hkv, K] with a contiguous last dim, got {tuple(indices.shape)}")
        n_idx = indices.shape[2]
        idx_strides = indices.stride()[:2]
    else:
        n_idx, indices, idx_strides = seq_len, start_pos, (0, 0)
    # Gathered rows at head dim 128: slices of half a block (see split_count). At head dim <= 64 (a 1B draft) a
    # program's K/V stages take a quarter of an SM's shared memory, so four run at once: twice the slices, of at least
    # two blocks (4096 rows of 16 sequences: 4 slices 43.5 us against 2 slices 50.2; of 4 sequences 16 slices 15.7
    # against 8 slices 17.2; H200, docs/benchmarks.md). The dense path's contiguous rows keep two blocks.
    if not has_indices:
        per_sm, min_rows = 2, None
    elif d <= 64:
        per_sm, min_rows = 4, 2 * cfg.block_n
    else:
        per_sm, min_rows = 2, cfg.block_n // 2
    n_splits = cfg.num_splits or split_count(n_idx, b * hkv, q.device, cfg.block_n, per_sm=per_sm, min_rows=min_rows)
    tiles = 1  # the dense path reads its rows in order and needs no index tile
    if has_indices:
        n_splits = max(n_splits, triton.cdiv(n_idx, _MAX_TILES * cfg.block_n))
        tiles = triton.next_power_of_2(triton.cdiv(triton.cdiv(n_idx, n_splits), cfg.block_n))

    f32 = dict(device=q.device, dtype=torch.float32)
    o_part = torch.empty(b * hkv * n_splits * rows * d, **f32)
    lse_part = torch.empty(b * hkv * n_splits * rows, **f32)
    logits = torch.empty(b * hkv * rows * n_idx if return_importance else 1, **f32)
    out = torch.empty_like(q)
    # The importance output needs each row's merged log-sum-exp too: the second kernel keeps that path. So do many
    # slices: the last program merges them one after another, which at 16-32 slices (batch 1) made rounds slower than
    # a second launch (H200, two runs: 11.59 against 11.07 ms a round at 128K batch 1; faster at 32K batch 16, 2-4
    # slices; docs/benchmarks.md).
    fused = cfg.fused_merge and not return_importance and n_splits <= FUSED_MERGE_SPLITS
    counters = split_counters(q.device, b * hkv) if fused else None

    _verify_split_kernel[(b * hkv, n_splits)](
        q, k_cache, v_cache, indices, start_pos, o_part, lse_part, logits, o_part if counters is None else counters,
        out,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        idx_strides[0], idx_strides[1], out.stride(0), out.stride(1), out.stride(2),
        hkv, seq_len, n_idx, LOG2E / math.sqrt(d), n_splits,
        GROUP=group, T=t, HEAD_DIM=d,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=cfg.block_n, TILES=tiles,
        HAS_INDICES=has_indices, STORE_LOGITS=return_importance, PRECISION=dot_precision(q.dtype),
        FUSED_MERGE=counters is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if counters is not None:
        return out
    lse = torch.empty(b * hkv * rows if return_importance else 1, **f32)
    _verify_merge_kernel[(b * hkv * rows,)](
        o_part, lse_part, out, lse,
        out.stride(0), out.stride(1), out.stride(2), hkv, n_splits,
        GROUP=group, T=t, HEAD_DIM=d,
        BLOCK_P=triton.next_power_of_2(n_splits), BLOCK_S=min(16, triton.next_power_of_2(n_splits)),
        STORE_LSE=return_importance,
        num_warps=4 if d >= 128 else 2,
    )  # fmt: skip
    if not return_importance:
        return out
    importance = torch.empty(b, hkv, n_idx, **f32)
    block_k = 128
    _importance_kernel[(b * hkv, triton.cdiv(n_idx, block_k))](
        logits, lse, importance, n_idx,
        ROWS=rows, BLOCK_R=triton.next_power_of_2(rows), BLOCK_K=block_k,
    )  # fmt: skip
    return out, importance
