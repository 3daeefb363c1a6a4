"""STS (Speculative Token Sparsity, arXiv 2605.15508): the draft's attention, mapped head by head,
ranks the context rows each target KV head reads while verifying."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.attention import dispatch
from sts.attention.scores import Aggregate
from sts.models.transformer import Transformer
from sts.errors import STSError
from sts.selection.base import (
    RoundContext, SelectionConfig, SelectionPolicy, competing_rows, ranked_free_rows, register, topk_rows,
)
from sts.selection.budgets import allocate, limit_rows
from sts.selection.mapping import ALL_HEADS, HeadMapping


def check_sts_options(rerank: float = 4, feedback: float = 0.0, decay: float = 0.5, head_budgets: float = 0,
                      key_bits: float = 16, **_: float) -> None:
    """Raise :class:`~sts.errors.STSError` for :class:`STSPolicy` option values it refuses whatever the models and
    the mapping (callers check them before loading any model); other options pass through unchecked."""
    if rerank < 0 or rerank != int(rerank):
        raise STSError(f"rerank must be a whole number >= 0, got {rerank:g}")
    if not 0.0 <= feedback <= 1.0:
        raise STSError(f"feedback must be in [0, 1], got {feedback:g}")
    if not 0.0 <= decay <= 1.0:
        raise STSError(f"the feedback decay must be in [0, 1], got {decay}")
    if head_budgets < 0 or 0 < head_budgets < 1:
        raise STSError(f"per-head budget cap must be >= 1 (x the mean), got {head_budgets}")
    if key_bits not in (8, 16):
        raise STSError(f"key_bits must be 8 or 16, got {key_bits:g}")
    if head_budgets and (rerank or feedback):
        raise STSError("head_budgets works with the plain rule (rerank 0), not with re-ranking or feedback")


@register
class STSPolicy(SelectionPolicy):
    """Scores each target (layer, KV head) by its mapped draft heads' attention of this round's drafts.

    Draft scores are computed once per round from the recorded draft queries and the draft's
    keys (K only) of the mapped layers, aggregated over the gamma queries (``aggregate``).

    Settings that close the gap to the oracle (docs/results.md, "Closing the gap to the oracle"):

    * ``rerank = m`` (default 4): the draft proposes ``m`` times as many candidates as the budget
      has free rows, and the target's own verify queries rank them exactly over the candidates'
      keys (with ``rerank_prob``, the default, by each query's softmax over the candidates,
      averaged over the group and queries; otherwise by the max logit): the draft narrows, the
      target decides. On CUDA this is one fused kernel per layer. ``rerank = 0`` is the paper's
      plain rule: the draft's top-scored rows are read as they are.
    * ``feedback = f``: a share ``f`` of the free rows goes to rows the target itself attended
      to most in earlier steps (per layer and KV head, decayed by ``decay`` each step).

    ``head_budgets = c`` spreads the same total over target KV heads by their calibrated
    difficulty (the mapping's mass curves, :mod:`sts.selection.budgets`), each head between a
    quarter and ``c`` times the uniform share; the rows read per head are padded to the largest
    (padding is invalid and costs no bandwidth in the kernels).

    ``key_bits = 8`` scores with an 8-bit copy of the draft's keys, centred on each prompt's mean key
    (:meth:`~sts.models.transformer.KVCache.keep_score_keys`, which the engine keeps for :meth:`draft_layers`): the
    score pass reads half the bytes (0.71x its time on the H200; rounds 0.95-0.98x, docs/benchmarks.md); the copy
    costs half the scored layers' K in memory again. Experimental: its ranking is slightly below the 16-bit one
    (docs/results.md) and its accuracy on the evaluation tasks is not measured. The mean is over the prompt's rows
    but the last, which decode rounds between prefill chunks may write, so a request prefilled beside decoding
    ones decodes as alone (tested on the CPU).
    """

    name = "sts"
    uses_draft = True

    def __init__(
        self, config: SelectionConfig, mapping: HeadMapping, aggregate: Aggregate = "max",
        rerank: float = 4, feedback: float = 0.0, decay: float = 0.5, rerank_prob: float = 1, head_budgets: float = 0,
        key_bits: float = 16,
    ) -> None:
        super().__init__(config)
        check_sts_options(rerank, feedback, decay, head_budgets, key_bits)
        self.key_bits = int(key_bits)
        if head_budgets and mapping.mass_curve is None:
            raise STSError("head_budgets needs a calibrated mapping with mass curves (from `sts calibrate`)")
        self.head_budgets = head_budgets
        self.curve = torch.tensor(mapping.mass_curve) if head_budgets else None
        self.widths: tuple[int, Tensor] | None = None  # (budget, [L, Hkv] rows per head) when head_budgets
        self.mapping = mapping
        self.aggregate = aggregate
        self.rerank = int(rerank)
        self.rerank_prob = bool(rerank_prob)
        self.feedback_share = feedback
        self.decay = decay
        self.wants_feedback = feedback > 0
        # The feedback memory is rebuilt every step from host-side state: not capturable.
        self.graph_safe = not self.wants_feedback
        # Feedback's promoted rows and per-head widths depend on the round's budget (re-ranking takes each sequence's).
        self.ranked = not (self.wants_feedback or head_budgets)
        #: This round's ranking of the source rows ([B, sources, K] values and rows) when one top-k serves both the
        #: candidates and the scored draft (:meth:`prepare`), else None.
        self.source_top: tuple[Tensor, Tensor] | None = None
        self.reset()
        # Only the (draft layer, head) pairs some target head reads are scored, and target heads
        # with the same sources share one score row and one top-k (the default map has one per
        # draft layer: every KV head of the target layers it serves).
        used = sorted({(dl, dh) for layer in mapping.sources for head in layer for dl, dh, _ in head})
        source_id = {src: i for i, src in enumerate(used)}
        self.heads_of = {dl: [dh for layer, dh in used if layer == dl] for dl, _ in used}
        combos = sorted({head for layer in mapping.sources for head in layer})
        combo_id = {c: i for i, c in enumerate(combos)}
        self.combo_of = torch.tensor([[combo_id[head] for head in layer] for layer in mapping.sources])
        width = max(len(c) for c in combos)
        # Pad by repeating a combo's first source with weight 0: neutral for both max and sum.
        padded = [list(c) + [(c[0][0], c[0][1], 0.0)] * (width - len(c)) for c in combos]
        self.combo_sources = torch.tensor([[source_id[s[0], s[1]] for s in c] for c in padded])
        self.combo_weights = torch.tensor([[s[2] for s in c] for c in padded], dtype=torch.float32)

    def reset(self) -> None:
        """Forget the target's attention remembered from earlier steps (feedback)."""
        self.importance: dict[int, Tensor] = {}

    def draft_layers(self, draft: Transformer) -> tuple[int, ...]:
        """Return the draft layers the mapping reads."""
        return tuple(self.heads_of)

    def prepare(self, ctx: RoundContext) -> None:
        """Score the context once per round: one row ``[B, N]`` per distinct set of draft sources.

        Source head -1 (:data:`~sts.selection.mapping.ALL_HEADS`) is the max over the layer's heads.
        """
        super().prepare(ctx)
        assert ctx.draft is not None
        device = ctx.start_pos.device
        if self.combo_of.device != device:  # moved once, before any CUDA-graph capture
            self.combo_of, self.combo_sources, self.combo_weights = (
                t.to(device) for t in (self.combo_of, self.combo_sources, self.combo_weights))
        rows = []
        for dl in self.heads_of:
            early = ctx.early_scores.get(dl)
            rows += early if early is not None else self.score_sources(
                dl, ctx.draft_queries[dl], ctx.score_keys(dl), ctx.start_pos)
        self.source_scores = torch.stack(rows)  # [sources, B, N], grouped by draft layer in heads_of's order
        picked = self.source_scores[self.combo_sources]  # [U, M, B, N]
        if self.mapping.combine == "max":
            combined = picked.amax(1)
        else:
            combined = (picked.clamp_min(0) * self.combo_weights.view(*self.combo_weights.shape, 1, 1)).sum(1)
        self.combined = combined.transpose(0, 1)  # [B, U, N]
        self.rows = self.candidates = self.source_top = None
        if self.rerank and not self.wants_feedback:
            # The draft's candidates do not depend on the target's queries: one batched top-k, and one gather of
            # every target layer's heads' candidates ([B, L, Hkv, C]: a layer takes a view, launching nothing).
            if self.combo_sources.shape[1] == 1 and self.mapping.combine == "max":
                # Each target head reads one source row as it is: the scored draft's rows and the candidates are
                # prefixes of one ranking of the source rows ([B, sources, K]), one top-k for both.
                width = max(self._candidate_count(), ctx.draft_rows)
                self.source_top = ranked_free_rows(self.source_scores.transpose(0, 1), ctx.start_pos,
                                                   self.config.sink, self.config.window, width)
                top = self._candidates(*(t[:, self.combo_sources[:, 0]] for t in self.source_top))
            else:
                top = self._top_candidates(self.combined, ctx.start_pos)
            self.candidates = tuple(t[:, self.combo_of] for t in top)
        if not (self.rerank or self.wants_feedback):
            # Without per-layer refinements every layer's rows are known now: one batched top-k
            # over the distinct score rows is far cheaper on the GPU than one per target layer.
            width = self.budget if not self.head_budgets else int(self._head_widths(device).max())
            self.rows = topk_rows(
                self.combined, ctx.start_pos, width, self.config.sink, self.config.window, ranked=True)

    def score_sources(self, layer: int, queries: Tensor, k_cache: Tensor, start_pos: Tensor) -> list[Tensor]:
        """Return draft layer ``layer``'s score rows, ``[B, N]`` float32 each (``-inf`` at and past ``start_pos``), one
        per scored head in :attr:`heads_of` order: its ``queries`` ``[B, Hq_draft, gamma, D]`` of this round against
        its keys ``k_cache`` ``[B, Hkv_draft, N, D]`` (16-bit, or the 8-bit copy of ``key_bits = 8``), aggregated over
        the queries (``aggregate``)."""
        heads = self.heads_of[layer]
        only_max = heads == [ALL_HEADS]  # the default map: the kernel takes the max over the heads itself
        scores = dispatch.score_context(queries, k_cache, start_pos, self.aggregate, max_heads=only_max)
        return [scores] if only_max else [scores.amax(1) if dh == ALL_HEADS else scores[:, dh] for dh in heads]

    def draft_layer_ranking(self, start_pos: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Return ``(values, rows)`` ``[L, B, <= width]``: each draft layer's best free rows this round, best first, as
        :func:`~sts.selection.base.ranked_free_rows` ranks :meth:`draft_layer_scores` (from :meth:`prepare`'s own
        top-k when it ranked the source rows at least this far). Call after :meth:`prepare`."""
        counts = [len(heads) for heads in self.heads_of.values()]
        if self.source_top is not None and max(counts) == 1 and self.source_top[0].shape[-1] >= width:
            values, rows = (t[..., :width].transpose(0, 1) for t in self.source_top)
            return values, rows
        values, rows = ranked_free_rows(self.draft_layer_scores().unsqueeze(2), start_pos, self.config.sink,
                                        self.config.window, width)
        return values.squeeze(2), rows.squeeze(2)

    def draft_layer_scores(self) -> Tensor:
        """Return ``[L, B, N]``: this round's scores of the context rows for each draft layer of :meth:`draft_layers`
        (in that order): the max over its scored heads' rows (-inf at and past a sequence's context). Call after
        :meth:`prepare`; the scored sparse draft (:class:`~sts.selection.draft.ScoredDraftAttention`) reads them.
        With one scored head per layer (the default map) these are :meth:`prepare`'s source rows themselves."""
        counts = [len(heads) for heads in self.heads_of.values()]
        if max(counts) == 1:
            return self.source_scores
        return torch.stack([part.amax(0) for part in self.source_scores.split(counts)])

    def select(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor | None:
        """Return this layer's rows: precomputed for all layers at once, or refined with the target's queries."""
        if self.rows is not None:
            rows = self.rows[:, self.combo_of[layer]]
            if self.head_budgets:
                rows = limit_rows(rows, self._head_widths(rows.device)[layer], self.combined.shape[-1])
            return rows
        if self.rerank and q is not None and k_cache is not None and self.budget > self.config.sink + self.config.window:
            return self._rerank_select(layer, q, k_cache, start_pos)
        return super().select(layer, q, k_cache, start_pos)

    def scores(self, layer: int, q: Tensor | None, k_cache: Tensor | None, start_pos: Tensor) -> Tensor:
        """Return ``[B, Hkv, N]``: the mapped draft heads' scores per target KV head, refined by the settings."""
        scores = self.combined[:, self.combo_of[layer]]
        free = max(self.budget - self.config.sink - self.config.window, 0)
        if self.feedback_share > 0 and layer in self.importance:
            scores = self._promote(scores, self.importance[layer][..., : scores.shape[-1]], int(self.feedback_share * free), start_pos)
        return scores

    def _head_widths(self, device: torch.device) -> Tensor:
        """Return ``[L, Hkv]`` rows per head (sinks and window included) for the current budget."""
        if self.widths is None or self.widths[0] != self.budget:
            sink, window, dense = self.config.sink, self.config.window, self.config.dense_layers
            assert self.curve is not None
            free = allocate(self.curve[dense:], self.mapping.curve_step, self.budget - sink - window, self.head_budgets)
            free = torch.cat([free.new_full((dense, free.shape[1]), self.budget - sink - window), free])
            self.widths = (self.budget, (free + sink + window).to(device))
        return self.widths[1]

    def _competing(self, scores: Tensor, start_pos: Tensor) -> Tensor:
        """Return scores with forced (sink/window) and invalid rows pushed to ``-inf``: what the free rows compete on."""
        forced, valid = competing_rows(scores.shape[-1], start_pos, self.config.sink, self.config.window)
        return scores.masked_fill(forced | ~valid, float("-inf"))

    def _promote(self, scores: Tensor, importance: Tensor, count: int, start_pos: Tensor) -> Tensor:
        """Return scores where the ``count`` rows the target found most important outrank every other free row."""
        if count < 1:
            return scores
        top = torch.topk(self._competing(importance, start_pos), min(count, scores.shape[-1]), dim=-1).indices
        return scores.scatter(-1, top, float("inf"))

    def _top_candidates(self, scores: Tensor, start_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Return (rows, usable) ``[B, H, C]``: the draft's ``rerank`` x free best free rows of ``scores``
        ``[B, H, N]``, in rank order (see :meth:`_candidates`)."""
        return self._candidates(*ranked_free_rows(scores, start_pos, self.config.sink, self.config.window,
                                                  self._candidate_count()))

    def _candidate_count(self) -> int:
        """Return ``C``: ``rerank`` x the free rows of the round's budget (at least one)."""
        return self.rerank * max(self.budget - self.config.sink - self.config.window, 1)

    def _candidates(self, values: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Return (rows, usable) ``[B, H, C]``: the first ``C = rerank`` x free of ranked free ``rows`` (best first,
        with their ``values``), and which are usable: real rows (not ``-inf``) and, with per-sequence budgets, within
        a sequence's own ``rerank`` x free (the candidates it has alone)."""
        sink, window, count = self.config.sink, self.config.window, self._candidate_count()
        usable = ~torch.isinf(values[..., :count])  # -inf: forced or past the context
        if self.slot_budgets is not None:
            own = self.rerank * (self.slot_budgets - sink - window).clamp_min(1)
            usable &= torch.arange(usable.shape[-1], device=usable.device).view(1, 1, -1) < own.view(-1, 1, 1)
        return rows[..., :count], usable

    def _rerank_select(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return ``[B, Hkv, budget]`` rows: sinks, window, and the candidates this layer's verify queries rank best."""
        if self.candidates is not None:
            cand, usable = (t[:, layer] for t in self.candidates)
        else:
            cand, usable = self._top_candidates(self.scores(layer, q, k_cache, start_pos), start_pos)
        return dispatch.rerank_rows(
            q, k_cache, cand, usable, start_pos, self.config.sink, self.config.window, self.budget, self.rerank_prob,
            self.slot_budgets)

    def feedback(self, layer: int, rows: Tensor, importance: Tensor) -> None:
        """Decay this layer's remembered importance and fold in the target's attention on the rows it read."""
        memory = self.importance.get(layer)
        if memory is None or memory.shape[0] != rows.shape[0]:
            memory = torch.zeros(*rows.shape[:2], self.ctx.target.max_len, device=rows.device)
        memory = memory * self.decay
        idx = rows.long().clamp_max(memory.shape[-1] - 1)
        self.importance[layer] = memory.scatter_reduce(-1, idx, importance.float(), reduce="amax")
