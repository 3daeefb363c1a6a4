"""PyTorch reference attention over a static KV cache: dense, sparse (selected rows) and probabilities.

Conventions shared by every attention path in sts (the Triton kernels are tested against these):

- ``q``: ``[B, Hq, T, D]``, already rotated; ``T`` new tokens per sequence (1 for decode,
  ``gamma + 1`` for verification, a chunk for prefill).
- ``k_cache`` / ``v_cache``: ``[B, Hkv, S, D]``; the new tokens' keys and values are already
  written at rows ``start_pos[b] + t``.
- ``start_pos``: ``[B]`` int, the context length of each sequence before the new tokens.
- Query ``t`` of sequence ``b`` sees context rows ``< start_pos[b]`` (all of them, or the
  selected ones) and, causally, the new rows ``start_pos[b] .. start_pos[b] + t``.
- ``indices``: ``[B, Hkv, K]`` int, selected context rows per KV head; an entry is valid iff it
  is ``< start_pos[b]``; valid entries are distinct. Query heads of one GQA group share them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _group(q: Tensor, n_kv_heads: int) -> Tensor:
    """Return q as ``[B, Hkv, G * T, D]`` so that each KV head serves its query group at once."""
    b, hq, t, d = q.shape
    return q.reshape(b, n_kv_heads, (hq // n_kv_heads) * t, d)


def _softmax_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Return softmax(q k^T / sqrt(D), masked) v in float32, cast back to q's dtype.

    ``q`` is ``[B, Hkv, G*T, D]``, ``k``/``v`` ``[B, Hkv, N, D]``, ``mask`` broadcastable to
    ``[B, Hkv, G*T, N]`` (True = attend).
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), v.float()).to(q.dtype)


def new_rows(cache: Tensor, start_pos: Tensor, n_new: int) -> Tensor:
    """Return the rows ``start_pos[b] .. start_pos[b] + n_new - 1`` of a cache: ``[B, Hkv, n_new, D]``."""
    b, h, s, d = cache.shape
    rows = (start_pos.view(b, 1) + torch.arange(n_new, device=cache.device)).clamp_max(s - 1)
    return cache.gather(2, rows.view(b, 1, n_new, 1).expand(b, h, n_new, d))


def dense_mask(start_pos: Tensor, n_new: int, n_keys: int, group: int) -> Tensor:
    """Return the causal mask ``[B, 1, G*T, n_keys]`` for queries at ``start_pos + t`` over rows ``0..n_keys-1``."""
    pos = start_pos.view(-1, 1, 1) + torch.arange(n_new, device=start_pos.device).view(1, n_new, 1)
    mask = torch.arange(n_keys, device=start_pos.device).view(1, 1, n_keys) <= pos
    return mask.repeat(1, group, 1).unsqueeze(1)


def dense_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
    """Return causal attention of the new queries over every cached row: ``[B, Hq, T, D]``."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    n_keys = min(int(start_pos.max()) + t, k_cache.shape[2])
    mask = dense_mask(start_pos, t, n_keys, hq // hkv)
    out = _softmax_attend(_group(q, hkv), k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], mask)
    return out.reshape(b, hq, t, d)


def sparse_mask(indices: Tensor, start_pos: Tensor, n_new: int, group: int) -> Tensor:
    """Return the mask ``[B, Hkv, G*T, K + T]`` over (selected rows, new rows)."""
    b, hkv, k = indices.shape
    selected = (indices < start_pos.view(b, 1, 1)).unsqueeze(2).expand(b, hkv, group * n_new, k)
    ar = torch.arange(n_new, device=indices.device)
    causal = (ar.view(1, n_new) <= ar.view(n_new, 1)).repeat(group, 1)
    return torch.cat([selected, causal.view(1, 1, group * n_new, n_new).expand(b, hkv, -1, -1)], dim=-1)


def gather_rows(cache: Tensor, indices: Tensor) -> Tensor:
    """Return ``cache[b, h, indices[b, h, k]]`` as ``[B, Hkv, K, D]`` (invalid indices clamped)."""
    d = cache.shape[-1]
    idx = indices.clamp(0, cache.shape[2] - 1).long()
    return cache.gather(2, idx.unsqueeze(-1).expand(*idx.shape, d))


def sparse_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor, indices: Tensor
) -> Tensor:
    """Return attention of the new queries over the selected context rows plus, causally, the new rows."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    k = torch.cat([gather_rows(k_cache, indices), new_rows(k_cache, start_pos, t)], dim=2)
    v = torch.cat([gather_rows(v_cache, indices), new_rows(v_cache, start_pos, t)], dim=2)
    mask = sparse_mask(indices, start_pos, t, hq // hkv)
    return _softmax_attend(_group(q, hkv), k, v, mask).reshape(b, hq, t, d)


def selected_importance(q: Tensor, k_cache: Tensor, start_pos: Tensor, indices: Tensor) -> Tensor:
    """Return ``[B, Hkv, K]``: each selected row's attention probability in the sparse verify step,
    maxed over the group's query heads and the new queries (0 for invalid entries)."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    k = torch.cat([gather_rows(k_cache, indices), new_rows(k_cache, start_pos, t)], dim=2)
    logits = torch.matmul(_group(q, hkv).float(), k.float().transpose(-1, -2)) / math.sqrt(d)
    mask = sparse_mask(indices, start_pos, t, hq // hkv)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return probs[..., : indices.shape[-1]].amax(dim=2).masked_fill(indices >= start_pos.view(b, 1, 1), 0.0)


def attention_probs(q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
    """Return the dense causal attention probabilities ``[B, Hq, T, N]`` (float32), ``N = max start_pos + T``.

    Used only in evaluation (oracle selection, recall): it materialises the full rows.
    """
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    n_keys = min(int(start_pos.max()) + t, k_cache.shape[2])
    mask = dense_mask(start_pos, t, n_keys, hq // hkv)
    logits = torch.matmul(_group(q, hkv).float(), k_cache[:, :, :n_keys].float().transpose(-1, -2))
    logits = (logits / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(b, hq, t, n_keys)
