"""Pick the Triton kernels for CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``), else the PyTorch references."""

from __future__ import annotations

import os
from importlib.util import find_spec

import torch.nn.functional as F
from torch import Tensor

from sts.attention import reference, rerank, scores
from sts.attention.scores import Aggregate


def kernel_head_dim(head_dim: int) -> bool:
    """Return whether the Triton kernels take this head dimension (a power of two from 16 to 256)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def use_triton(q: Tensor) -> bool:
    """Return whether the Triton kernels serve queries ``q`` ``[..., D]`` on their device (else the PyTorch references)."""
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and find_spec("triton") is not None and kernel_head_dim(q.shape[-1])


def verify_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor, indices: Tensor | None = None
) -> Tensor:
    """Return ``[B, Hq, T, D]`` attention over the selected context rows and, causally, the new rows.

    ``indices=None`` selects every context row (dense verification).
    """
    if use_triton(q):
        from sts.attention.triton_verify import sparse_verify_attention

        return sparse_verify_attention(q, k_cache, v_cache, start_pos, indices)
    if indices is None:
        return reference.dense_attention(q, k_cache, v_cache, start_pos)
    return reference.sparse_attention(q, k_cache, v_cache, start_pos, indices)


def score_context(
    q: Tensor, k_cache: Tensor, start_pos: Tensor, aggregate: Aggregate = "max", max_heads: bool = False
) -> Tensor:
    """Return ``[B, Hq, S]`` float32 context scores, ``-inf`` at and past ``start_pos[b]`` (``max_heads``: ``[B, S]``,
    their max over the query heads).

    The width is the cache length S on every path (the reference's ``max(start_pos)`` columns
    padded with ``-inf``), so callers see one static shape.
    """
    if use_triton(q):
        from sts.attention.triton_scores import context_scores_triton

        return context_scores_triton(q, k_cache, start_pos, aggregate, max_heads=max_heads)
    ref = scores.context_scores(q, k_cache, start_pos, aggregate)
    ref = ref.amax(1) if max_heads else ref
    return F.pad(ref, (0, k_cache.shape[2] - ref.shape[-1]), value=float("-inf"))


def rerank_rows(
    q: Tensor, k_cache: Tensor, cand: Tensor, usable: Tensor, start_pos: Tensor,
    sink: int, window: int, budget: int, prob: bool, budgets: Tensor | None = None,
) -> Tensor:
    """Return ``[B, Hkv, budget]`` rows: sinks, window and the candidates the target's queries rank best
    (``budgets``: ``[B]`` each sequence's own, at most ``budget``; contract in :mod:`sts.attention.rerank`).

    The fused kernels take any number of candidates (past ``MAX_CANDIDATES``, budgets of thousands
    of rows, by radix select over chunks) and at most ``MAX_QUERY_ROWS`` query rows (``G * T``) per KV
    head; past that the exact PyTorch path serves, which is also free of host synchronisation.
    """
    if use_triton(q):
        from sts.attention.triton_rerank import MAX_QUERY_ROWS, rerank_rows_triton

        rows = (q.shape[1] // k_cache.shape[1]) * q.shape[2]
        if rows <= MAX_QUERY_ROWS:
            return rerank_rows_triton(q, k_cache, cand, usable, start_pos, sink, window, budget, prob, budgets)
    return rerank.rerank_rows(q, k_cache, cand, usable, start_pos, sink, window, budget, prob, budgets)
