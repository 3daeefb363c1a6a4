"""The attention interface the model calls per layer, and the default dense implementation.

Like vLLM's attention backends, "which rows to read" is decided outside the model: the model
writes the new keys/values into its cache and hands ``(layer, q, k_cache, v_cache, start_pos)``
to an :data:`AttentionFn`. Dense decoding, sparse verification, query recording and recall
measurement are all such functions; the model code never changes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sts.attention import dispatch
from sts.attention.reference import dense_mask


class AttentionFn(Protocol):
    """Attention over a layer's static cache; see :mod:`sts.attention.reference` for the shapes."""

    def __call__(
        self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor
    ) -> Tensor: ...


def dense_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
    """Return causal attention over every cached row, through PyTorch's fused SDPA.

    The query heads of a GQA group are folded into the query axis (``[B, Hkv, G*T, D]``) so
    that each KV row is read once per group and no expanded copy of K/V is made.
    """
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    n_keys = min(int(start_pos.max()) + t, k_cache.shape[2])
    mask = dense_mask(start_pos, t, n_keys, hq // hkv)
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv, (hq // hkv) * t, d),
        k_cache[:, :, :n_keys],
        v_cache[:, :, :n_keys],
        attn_mask=mask,
    )
    return out.reshape(b, hq, t, d)


#: Up to this many new tokens per sequence (decode, verification), CUDA uses the split-KV Triton kernel.
KERNEL_MAX_TOKENS = 16


def dense_attention(layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
    """Return dense causal attention for any layer: the model's default :data:`AttentionFn`.

    Decode and verification steps on the GPU go through our split-KV kernel (no host sync, so
    they can be captured in a CUDA graph; stock SDPA has no split-KV path for several queries);
    prefill chunks and CPU runs use PyTorch's fused SDPA.
    """
    if q.shape[2] <= KERNEL_MAX_TOKENS and q.is_cuda and dispatch.use_triton(q):
        return dispatch.verify_attention(q, k_cache, v_cache, start_pos, None)
    return dense_sdpa(q, k_cache, v_cache, start_pos)


def chunk_attention(offset: int) -> AttentionFn:
    """Return causal attention for one sequence's prefill chunk whose first token sits at row ``offset``.

    Keys are rows ``0 .. offset + T - 1``; the causal diagonal is aligned to the last key
    (PyTorch's lower-right causal bias), so SDPA runs its flash / memory-efficient kernels with
    no ``[T, N]`` mask in memory, reading each KV head once for its query group (``enable_gqa``;
    expanding the heads cost 8.7 against 6.1 ms for 1024 tokens after 128K, H200, 2026-11-30).
    A chunk of up to :data:`KERNEL_MAX_TOKENS` tokens on CUDA (a cached prompt's last token, a
    short turn after a long prefix) goes through the decode kernel: flash's one-query path took
    0.5 ms per layer at 128K rows, the split-KV kernel 0.12 ms.
    """
    from torch.nn.attention.bias import causal_lower_right

    def attend(layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        b, hq, t, _ = q.shape
        if b != 1:
            raise ValueError("chunk_attention serves one sequence at a time")
        if t <= KERNEL_MAX_TOKENS and q.is_cuda:
            return dense_attention(layer, q, k_cache, v_cache, start_pos)
        n = offset + t
        return F.scaled_dot_product_attention(
            q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=causal_lower_right(t, n), enable_gqa=True)

    return attend


class QueryRecorder:
    """Attention (dense unless ``inner`` says otherwise) that also keeps the queries of chosen layers
    (the draft's scoring input). ``last_only`` keeps only each call's last query (a decode step
    that also re-reads an earlier token).

    ``on_complete``, when set (for a round's last draft step), is called with ``(layer, queries, k_cache)`` as soon
    as a chosen layer's query is recorded, before its attention runs: ``queries`` ``[B, Hq, steps, D]`` are all that
    layer's recorded queries, ``k_cache`` ``[B, Hkv, S, D]`` its keys, this step's rows written. The engine scores
    the context there, while the draft's later layers run (:meth:`sts.engine.Engine._score_early`).
    """

    def __init__(self, layers: Sequence[int], inner: AttentionFn = dense_attention, last_only: bool = False) -> None:
        self.layers = set(layers)
        self.inner = inner
        self.last_only = last_only
        self.queries: dict[int, list[Tensor]] = {layer: [] for layer in self.layers}
        self.on_complete: Callable[[int, Tensor, Tensor], None] | None = None

    def watch(self, layers: Iterable[int]) -> None:
        """Also record the queries of ``layers`` from now on."""
        for layer in layers:
            self.layers.add(layer)
            self.queries.setdefault(layer, [])

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return ``inner``'s attention, recording ``q`` when ``layer`` is one of the chosen layers."""
        if layer in self.layers:
            self.queries[layer].append(q[:, :, -1:] if self.last_only else q)
            if self.on_complete is not None:
                self.on_complete(layer, torch.cat(self.queries[layer], dim=2), k_cache)
        return self.inner(layer, q, k_cache, v_cache, start_pos)

    def take(self) -> dict[int, Tensor]:
        """Return and clear the recorded queries, ``[B, Hq, steps, D]`` per layer."""
        out = {layer: torch.cat(qs, dim=2) for layer, qs in self.queries.items() if qs}
        self.clear()
        return out

    def clear(self) -> None:
        """Drop the recorded queries (a round that scores nothing: no copies)."""
        self.queries = {layer: [] for layer in self.layers}
