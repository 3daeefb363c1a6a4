"""The verify step's attention: ask the policy for rows per layer, attend to them, account for it."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from sts.attention import dispatch
from sts.attention.reference import attention_probs
from sts.selection.base import SelectionPolicy


class SelectiveAttention:
    """An :class:`~sts.attention.backend.AttentionFn` that verifies with a policy's selected rows.

    It records, per layer, the share of context rows skipped (sparsity) and, when
    ``measure_recall`` is set, the share of the target's dense attention mass that falls on
    the selected rows (computed from the dense probabilities: evaluation only).
    """

    def __init__(self, policy: SelectionPolicy, measure_recall: bool = False) -> None:
        self.policy = policy
        self.measure_recall = measure_recall
        self.sparsity: dict[int, float] = {}
        self.recall: dict[int, float] = {}
        self.recall_context: dict[int, float] = {}

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the verify queries' attention output for one target layer."""
        dense = layer < self.policy.config.dense_layers
        idx = None if dense else self.policy.select(layer, q, k_cache, start_pos)
        ctx = start_pos.float().clamp_min(1)
        if idx is None:
            self.sparsity[layer] = 0.0
        else:
            valid = (idx < start_pos.view(-1, 1, 1)).sum(-1).float()
            self.sparsity[layer] = float((1 - valid / ctx.view(-1, 1)).mean())
        if self.measure_recall:
            self._measure(layer, q, k_cache, start_pos, idx)
        return dispatch.verify_attention(q, k_cache, v_cache, start_pos, idx)

    def _measure(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor, idx: Tensor | None) -> None:
        """Record mass recall of the selection against the dense attention of the same queries."""
        probs = attention_probs(q, k_cache, start_pos)  # [B, Hq, T, N]
        b, hq, t, n = probs.shape
        in_context = torch.arange(n, device=q.device).view(1, 1, 1, n) < start_pos.view(b, 1, 1, 1)
        context_mass = (probs * in_context).sum(-1)
        if idx is None:
            selected_mass = context_mass
        else:
            hkv = idx.shape[1]
            grouped = probs.reshape(b, hkv, (hq // hkv) * t, n)
            valid = (idx < start_pos.view(b, 1, 1)).float()
            gathered = grouped.gather(-1, idx.clamp_max(n - 1).unsqueeze(2).expand(b, hkv, grouped.shape[2], idx.shape[-1]))
            selected_mass = (gathered * valid.unsqueeze(2)).sum(-1).reshape(b, hq, t)
        self.recall[layer] = float(selected_mass.mean())
        self.recall_context[layer] = float((selected_mass / context_mass.clamp_min(1e-12)).mean())

    def step_summary(self) -> tuple[float, float | None, float | None]:
        """Return (sparsity, recall, recall over context mass) averaged over the step's layers."""
        mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
        return mean(self.sparsity) or 0.0, mean(self.recall), mean(self.recall_context)


def per_layer_mean(steps: list[dict[int, float]]) -> dict[int, float]:
    """Return the mean of per-layer values over steps."""
    acc: dict[int, list[float]] = defaultdict(list)
    for step in steps:
        for layer, value in step.items():
            acc[layer].append(value)
    return {layer: sum(v) / len(v) for layer, v in sorted(acc.items())}
