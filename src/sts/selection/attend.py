"""The verify step's attention: ask the policy for rows per layer, attend to them, account for it."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.attention import dispatch
from sts.attention.reference import attention_probs, selected_importance
from sts.decoding import GenerationStats
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
        # Each layer's rows (None: dense) stay on the device until the step's sparsity is counted, all layers at
        # once (a few kernels per step, not a dozen per layer), so a step runs without host syncs.
        self.selected: dict[int, Tensor | None] = {}
        self.recall: dict[int, float] = {}
        self.recall_context: dict[int, float] = {}
        self.set_recall: dict[str, dict[int, float]] = {}

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the verify queries' attention output for one target layer."""
        idx = self.observe(layer, q, k_cache, start_pos)
        return dispatch.verify_attention(q, k_cache, v_cache, start_pos, idx)

    def observe(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor, probs: Tensor | None = None) -> Tensor | None:
        """Return the policy's rows for this layer (None: dense), recording sparsity and recall.

        ``probs`` are the dense attention probabilities of ``q`` when the caller already has them.
        """
        self._device = start_pos.device
        dense = layer < self.policy.config.dense_layers
        idx = None if dense else self.policy.slot_rows(layer, q, k_cache, start_pos)
        self.selected[layer] = idx
        self._start_pos = start_pos
        if self.measure_recall:
            self._measure(layer, q, k_cache, start_pos, idx, probs)
        if idx is not None and self.policy.wants_feedback:
            self.policy.feedback(layer, idx, selected_importance(q, k_cache, start_pos, idx))
        return idx

    def _measure(
        self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor, idx: Tensor | None, probs: Tensor | None = None,
    ) -> None:
        """Record mass and set recall of the selection against the dense attention of the same queries."""
        if probs is None:
            probs = attention_probs(q, k_cache, start_pos)  # [B, Hq, T, N]
        b, hq, t, n = probs.shape
        hkv = k_cache.shape[1]
        in_context = torch.arange(n, device=q.device) < start_pos.view(b, 1)  # [B, N]
        grouped = probs.reshape(b, hkv, (hq // hkv) * t, n) * in_context.view(b, 1, 1, n)
        if idx is None:
            chosen = in_context.view(b, 1, n).expand(b, hkv, n)
        else:
            valid = idx < start_pos.view(b, 1, 1)
            chosen = torch.zeros(b, hkv, n + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(-1, torch.where(valid, idx, n).long(), True)
            chosen = chosen[..., :n]
        selected_mass = (grouped * chosen.unsqueeze(2)).sum(-1)
        context_mass = grouped.sum(-1)
        self.recall[layer] = float(selected_mass.mean())
        self.recall_context[layer] = float((selected_mass / context_mass.clamp_min(1e-12)).mean())
        # Set recall: which of the oracle's top-k rows (by mean probability per KV head) were kept.
        importance = grouped.mean(2).masked_fill(~in_context.view(b, 1, n), -1.0)
        budget = idx.shape[-1] if idx is not None else n
        for name, k in (("32", 32), ("64", 64), ("budget", budget)):
            k = min(k, n)
            top = torch.topk(importance, k, dim=-1).indices
            real = importance.gather(-1, top) >= 0  # sequences shorter than k: ignore padding rows
            kept = chosen.gather(-1, top) & real
            self.set_recall.setdefault(name, {})[layer] = float(kept.sum() / real.sum().clamp_min(1))

    def layer_sparsity(self) -> dict[int, Tensor]:
        """Return each layer's share of context rows this step did not read (``[]`` tensors on the device, no host
        sync): averaged over the sequences that have a context (a free engine slot has none) and the KV heads; a
        dense layer skips none. Counted for all sparse layers at once (a few kernels per step, not a dozen per layer)."""
        sparse = [layer for layer, idx in self.selected.items() if idx is not None]
        out = {layer: torch.zeros((), device=self._device) for layer in self.selected if layer not in sparse}
        if not sparse:
            return out
        start_pos, rows = self._start_pos, [self.selected[layer] for layer in sparse]
        if len({idx.shape for idx in rows}) == 1:  # type: ignore[union-attr]
            valid = (torch.stack(rows) < start_pos.view(1, -1, 1, 1)).sum(-1)  # type: ignore[arg-type]  # [layers, B, Hkv]
        else:  # a policy whose layers read different widths
            valid = torch.stack([(idx < start_pos.view(-1, 1, 1)).sum(-1) for idx in rows])  # type: ignore[operator]
        decoding = (start_pos > 0).float().view(1, -1, 1)
        skipped = (1 - valid.float() / start_pos.float().clamp_min(1).view(1, -1, 1)) * decoding
        per_layer = skipped.sum((1, 2)) / (decoding.sum() * valid.shape[2]).clamp_min(1)
        return {**out, **dict(zip(sparse, per_layer.unbind()))}

    def round_sparsity(self) -> Tensor:
        """Return ``[1]``: this step's :meth:`layer_sparsity` averaged over the layers, on the device (no host sync)."""
        per_layer = self.layer_sparsity()
        return (torch.stack(list(per_layer.values())).mean() if per_layer else torch.zeros((), device=self._device)).view(1)

    def end_step(self, stats: GenerationStats) -> None:
        """Add this verification step's layer means to ``stats`` and start the next step afresh."""
        mean = lambda d: sum(float(v) for v in d.values()) / len(d)  # noqa: E731
        stats.sparsity.append(float(self.round_sparsity()))
        if self.recall:
            stats.recall.append(mean(self.recall))
            stats.recall_context.append(mean(self.recall_context))
            stats.recall_layers.append(dict(self.recall_context))
            for name, per_layer in self.set_recall.items():
                stats.set_recall.setdefault(name, []).append(mean(per_layer))
        self.selected, self.recall, self.recall_context, self.set_recall = {}, {}, {}, {}


class ShadowAttention:
    """Dense attention that lets several policies choose rows on the same queries, for a fair comparison.

    Every policy sees exactly the queries of the dense target (no policy's errors feed into
    the next layer), so recall differences come from the selections alone.
    """

    def __init__(self, observers: dict[str, SelectiveAttention]) -> None:
        self.observers = observers

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return dense attention after every observer has selected and measured its rows."""
        # The dense probabilities every observer measures against are the same: compute them once.
        measuring = any(o.measure_recall for o in self.observers.values())
        probs = attention_probs(q, k_cache, start_pos) if measuring else None
        for observer in self.observers.values():
            observer.observe(layer, q, k_cache, start_pos, probs)
        return dispatch.verify_attention(q, k_cache, v_cache, start_pos, None)
