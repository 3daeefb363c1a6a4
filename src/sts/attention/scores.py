"""Reference context scores: what a set of queries attends to among the context rows, aggregated over queries."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Aggregate = Literal["max", "mean"]


def context_scores(
    q: Tensor, k_cache: Tensor, start_pos: Tensor, aggregate: Aggregate = "max"
) -> Tensor:
    """Return ``[B, Hq, N]`` float32 scores of the context rows, ``N = max(start_pos)`` (float64 when ``q`` and
    ``k_cache`` both are: the kernel tests' reference).

    ``q`` is ``[B, Hq, G, D]`` (G queries per head, e.g. a round's draft queries), ``k_cache``
    ``[B, Hkv, S, D]``. Each query's softmax is taken over the context rows ``< start_pos[b]``
    only; the probabilities are then aggregated over the G queries (max or mean). Rows at or
    past ``start_pos[b]`` score ``-inf`` so that no top-k picks them. With 8-bit keys (float8 e4m3, STS's
    ``key_bits=8``) the queries are rounded to that format too, as the Triton kernel's float8 product does.
    """
    if k_cache.dtype == torch.float8_e4m3fn:
        q = q.to(k_cache.dtype)
    b, hq, g, d = q.shape
    hkv = k_cache.shape[1]
    n = int(start_pos.max())
    wide = torch.float64 if q.dtype == k_cache.dtype == torch.float64 else torch.float32
    k = k_cache[:, :, :n].to(wide)
    logits = torch.matmul(q.to(wide).reshape(b, hkv, (hq // hkv) * g, d), k.transpose(-1, -2))
    logits = (logits / math.sqrt(d)).reshape(b, hq, g, n)
    valid = torch.arange(n, device=q.device).view(1, 1, 1, n) < start_pos.view(b, 1, 1, 1)
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    agg = probs.amax(dim=2) if aggregate == "max" else probs.mean(dim=2)
    return agg.masked_fill(~valid[:, :, 0], float("-inf"))
