"""Whether sparse verification pays: a bandwidth model of one round, dense against sparse, per accepted token.

Decoding is bound by memory bandwidth (DESIGN.md, "Where the time goes"), so a round is modelled as
the bytes its forwards read over the bandwidth, plus measured overheads. **Densely**, the draft's
``gamma`` steps read its weights and every context row of every decoding slot, and the target's
verify step its weights and every context row (K and V, every layer and KV head). **Sparsely**, the
target reads its weights and ``budget`` rows per (slot, layer, KV head) (every row in the layers the
policy keeps dense), and the selection reads what it scores with (:class:`SelectionReads`): the
draft's K rows of the scored draft layers over each slot's context, the score rows top-k ranks, the
target's K rows of STS's re-rank candidates (or of the whole context, for policies that score with
the target's own queries); a sparse draft (:class:`DraftSteps`) reads a few thousand rows per step
instead of the context, and accepts fewer tokens per round. A sparse round also costs time no byte
count shows: the select phase's launches and top-k, the re-rank kernel per layer, the gather
kernels' lower efficiency (:class:`Hardware`). Sparse verification pays when its modelled seconds
per accepted token are below the dense round's; below the break-even context they are not,
because the weights, read either way, dominate the round.

The model knows the shapes, not the device: bandwidth and overheads are parameters (default: an
H200's, fitted from ``sts bench e2e`` records), so it answers the same on any machine and in tests.
Its byte counts of a forward's weights (:func:`weight_bytes`) and of cache rows (:func:`kv_bytes`)
are also those of ``sts bench e2e``'s roofline bound; :class:`RoundModel` works out a pair's
constants once for the engine, which asks every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sts.attention.rerank import ONE_PROGRAM_CANDIDATES
from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer
from sts.selection.base import SelectionConfig, SelectionPolicy
from sts.selection.oracle import OraclePolicy
from sts.selection.quest import QuestPolicy
from sts.selection.sts import STSPolicy
from sts.selection.tidal import TidalPolicy, default_select_layers

#: Bytes per score that top-k ranks (float32).
SCORE_BYTES = 4

# The H200 constants below come from `sts bench e2e` on one H200. H200_RERANK_LAYER_S: docs/bench/e2e-h200.jsonl
# (2026-11-29: batch 1 and 4 at 8K, 32K and 128K, batch 16 at 32K; Llama-3.1-8B / 3.2-1B shapes, bf16, budget 512,
# default mapping), the measured select + verify time minus the dense speculative verify time, minus this module's
# byte difference over the bandwidth (residuals <= 0.3 ms). H200_ROUND_S, H200_FORWARD_S and H200_SCORE_S: refitted
# with the whole round (draft steps included) by least squares over 12 rounds once the select phase read the draft's
# K once (2026-11-30, gamma 4, dense speculative decoding and `sts+sd-scored-all`: batch 1 at 32K, 48K and 64K,
# docs/bench/e2e-scan-onepass-h200.jsonl; batch 1 and 4 at 128K, docs/bench/e2e-onepass-h200.jsonl; batch 16 at
# 32K, docs/bench/e2e-onepass-b16-h200.jsonl); residuals -2.1 to +0.8 ms on rounds of 10.6-43 ms.

#: Bytes per second the H200 reads weights at in a GEMV (DESIGN.md; also the roofline of ``sts bench e2e``).
H200_BANDWIDTH = 4.07e12
#: Seconds a sparse round costs beyond its bytes, whatever the context: the select phase's launches
#: and the sparse verify kernels' lower efficiency than the dense split-KV kernel (H200 fit).
H200_ROUND_S = 0.71e-3
#: Seconds every forward of a round (each draft step, the verify step) costs beyond its bytes, dense or
#: sparse (launches, sampling, the acceptance test; H200 fit). It weighs in the comparison only through a sparse
#: draft's lower acceptance, which spreads a round's fixed seconds over fewer tokens.
H200_FORWARD_S = 0.50e-3
#: Seconds per target layer that STS re-ranks (one fused kernel launch and its top-k each; H200 fit).
H200_RERANK_LAYER_S = 22.5e-6
#: Seconds per score that top-k ranks (per score row, context row and slot; H200 fit).
H200_SCORE_S = 0.344e-9
#: Re-rank candidates per (slot, KV head) past which the kernel selects them by radix select over chunks of
#: candidates: budgets of thousands of rows.
RADIX_CANDIDATES = ONE_PROGRAM_CANDIDATES
#: The radix path's seconds per sparse target layer, and per candidate of each (slot, KV head, sparse layer), beyond
#: its bytes and :data:`H200_RERANK_LAYER_S`: fitted on `sts bench kernels --rerank` (2026-12-01, one H200: 100.3 us
#: at batch 1 and 316.1 us at batch 4 for 52156 candidates of 8 KV heads; docs/bench/kernels-rerank-digits-h200.jsonl).
H200_RADIX_LAYER_S = 5.9e-6
H200_RADIX_CANDIDATE_S = 0.109e-9
#: Tokens per round of a round whose draft reads sparse rows, over a dense round's, on the demo pair on an H200 at
#: 32000 tokens (docs/results.md; sparse verification alone costs none: within 0.06 tokens at 4K-32K). The rows STS
#: scored, at least 4096 of them (the default): 4.13 against dense speculative decoding's 4.35.
SCORED_DRAFT_ACCEPTANCE = 0.95
#: Fewer scored rows: 512-2048 of them kept 0.77-0.88 of the dense draft's tokens (window 16).
FEW_SCORED_DRAFT_ACCEPTANCE = 0.8
#: Sinks and the latest rows ("recent", StreamingLLM's rule), 512 or 2048 of them: 3.35 against 4.35.
RECENT_DRAFT_ACCEPTANCE = 0.77
#: Scored rows from this many on keep :data:`SCORED_DRAFT_ACCEPTANCE`.
MANY_SCORED_ROWS = 4096


@dataclass(frozen=True)
class Hardware:
    """The device a round is modelled on: memory bandwidth (B/s) and what rounds cost beyond their bytes (s)."""

    bandwidth: float = H200_BANDWIDTH
    #: Fixed seconds per sparse round.
    round_s: float = H200_ROUND_S
    #: Seconds per target layer whose rows STS re-ranks with the verify queries.
    rerank_layer_s: float = H200_RERANK_LAYER_S
    #: Seconds per score top-k ranks.
    score_s: float = H200_SCORE_S
    #: Seconds per forward (draft step or verify step) of any round.
    forward_s: float = H200_FORWARD_S
    #: The re-rank's radix path (more than :data:`RADIX_CANDIDATES` candidates): seconds per sparse layer, and per
    #: candidate of each (slot, KV head, sparse layer).
    radix_layer_s: float = H200_RADIX_LAYER_S
    radix_candidate_s: float = H200_RADIX_CANDIDATE_S

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise STSError(f"bandwidth must be > 0 B/s, got {self.bandwidth}")
        if min(self.round_s, self.rerank_layer_s, self.score_s, self.forward_s, self.radix_layer_s,
               self.radix_candidate_s) < 0:
            raise STSError("the rounds' overheads must be >= 0 s")


@dataclass(frozen=True)
class DraftSteps:
    """The draft's forwards in one round, and what they read in a sparse round (the engine's draft settings).

    A dense round's ``steps`` forwards read every context row. In a sparse round a sparse draft (``rows`` set) reads
    ``rows`` rows per (slot, KV head) in its later steps, and in its first too with ``first`` (the ``-all`` draft
    selections); such a round accepts ``acceptance`` times a dense round's tokens (its draft predicts worse).
    ``steps`` 0: the verify step alone is modelled.
    """

    steps: int = 0
    rows: int | None = None
    first: bool = False
    acceptance: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise STSError(f"draft steps must be >= 0, got {self.steps}")
        if self.rows is not None and self.rows < 1:
            raise STSError(f"the sparse draft's rows must be >= 1, got {self.rows}")
        if not 0 < self.acceptance <= 1:
            raise STSError(f"a sparse round's acceptance relative to a dense one must be in (0, 1], got {self.acceptance}")

    @classmethod
    def of(cls, gamma: int, draft_budget: int | None, draft_selection: str) -> DraftSteps:
        """Return the steps of an engine drafting ``gamma`` tokens per round with these draft settings
        (:class:`~sts.engine.EngineConfig`'s), a sparse draft's acceptance as measured for its rule and rows
        (:data:`SCORED_DRAFT_ACCEPTANCE`, :data:`FEW_SCORED_DRAFT_ACCEPTANCE`, :data:`RECENT_DRAFT_ACCEPTANCE`)."""
        if draft_budget is None:
            return cls(gamma)
        if draft_selection.startswith("scored"):
            many = draft_budget >= MANY_SCORED_ROWS
            acceptance = SCORED_DRAFT_ACCEPTANCE if many else FEW_SCORED_DRAFT_ACCEPTANCE
        else:
            acceptance = RECENT_DRAFT_ACCEPTANCE
        return cls(gamma, draft_budget, draft_selection.endswith("-all"), acceptance)

    def sparse_steps(self) -> int:
        """Return the steps of a sparse round that read ``rows`` rows rather than the context."""
        if self.rows is None:
            return 0
        return self.steps if self.first else max(self.steps - 1, 0)


@dataclass(frozen=True)
class SelectionReads:
    """What a policy's selection reads in a round besides the rows it selects (per decoding slot)."""

    #: Rows every layer always keeps (sinks + window); the rest of the budget is the free rows.
    forced: int = 0
    #: Target layers verified over every row even in a sparse round.
    dense_layers: int = 0
    #: Draft layers whose K rows the selection reads over the context (scoring with the draft's queries).
    draft_layers: int = 0
    #: Score rows top-k ranks over the context.
    score_rows: int = 0
    #: STS re-ranking: the target's K rows of ``rerank`` x the free rows are read per sparse (layer, KV head).
    rerank: int = 0
    #: The selection reads every K row of each sparse target layer (it scores with the target's own queries).
    key_scan: bool = False
    #: Bytes per element of the draft keys the score pass reads (0: the cache's dtype; 1: STS's ``key_bits = 8``).
    key_bytes: int = 0


@dataclass(frozen=True)
class RoundCost:
    """One round's modelled time in seconds (draft steps, select phase and verify step), dense and sparse, and the
    tokens a sparse round accepts relative to a dense one."""

    dense_s: float
    sparse_s: float
    acceptance: float = 1.0

    @property
    def sparse_pays(self) -> bool:
        """Return whether a sparse round costs fewer seconds per accepted token than a dense one."""
        return self.sparse_s < self.dense_s * self.acceptance


def selection_reads(policy: SelectionPolicy, target: Transformer, draft: Transformer) -> SelectionReads:
    """Return what ``policy``'s selection reads per round for this pair (see :class:`SelectionReads`)."""
    config = policy.config
    n_layers = target.config.n_layers
    dense = min(config.dense_layers, n_layers)
    drafted = len(policy.draft_layers(draft)) if policy.uses_draft else 0
    forced = config.sink + config.window
    if isinstance(policy, STSPolicy):
        return SelectionReads(forced, dense, drafted, len(policy.combo_sources), policy.rerank,
                              key_bytes=1 if policy.key_bits == 8 else 0)
    if isinstance(policy, (QuestPolicy, OraclePolicy)):
        return SelectionReads(forced, dense, drafted, (n_layers - dense) * target.config.n_kv_heads, key_scan=True)
    if isinstance(policy, TidalPolicy):
        chosen = policy.select_layers or default_select_layers(n_layers)
        # Layers before the first selection layer and the selection layers attend densely (and score there).
        tidal_dense = set(range(max(dense, min(chosen)))) | set(chosen)
        return SelectionReads(forced, len(tidal_dense), drafted, len(chosen) * target.config.n_kv_heads)
    return SelectionReads(forced, dense, drafted, 1 if drafted else 0)


def weight_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Return the bytes of the weights one forward of a ``config`` model reads, at ``dtype_bytes`` bytes per element.

    Counted: every layer's q/k/v/o projections, MLP (gate, up, down), biases and two norms, the
    final norm and the LM head. Of the embedding table a step reads only its tokens' rows, counted
    as none, so a table tied to the LM head counts once (as the head). This is every parameter of
    the model less an untied embedding table. Under tensor parallelism (``config.shard``) it is one
    rank's: its part of the split matrices and biases, and the norms, the LM head and the
    row-parallel (o, down) biases whole.
    """
    d, hd, ffn = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    attention = d * 2 * (q + kv) + config.qkv_bias * (q + 2 * kv) + config.o_bias * d  # q and o; k and v
    mlp = 3 * d * ffn + config.mlp_bias * (2 * ffn + d)
    layer = attention + mlp + 2 * d  # and the two norms
    return dtype_bytes * (config.n_layers * layer + d + config.vocab_size * d)


def kv_bytes(config: ModelConfig, rows: int, dtype_bytes: int, layers: int | None = None, k_only: bool = False) -> int:
    """Return the bytes of ``rows`` cache rows (summed over sequences) of every KV head of a ``config`` model.

    ``layers``: how many layers' rows (default: all); ``k_only``: K rows alone (else K and V);
    ``dtype_bytes``: bytes per cache element. Raises STSError for rows < 0 or layers outside
    ``[0, config.n_layers]``.
    """
    if rows < 0:
        raise STSError(f"rows must be >= 0, got {rows}")
    n_layers = config.n_layers if layers is None else layers
    if not 0 <= n_layers <= config.n_layers:
        raise STSError(f"layers must be in [0, {config.n_layers}], got {n_layers}")
    return n_layers * (1 if k_only else 2) * config.n_kv_heads * config.head_dim * rows * dtype_bytes


@dataclass(frozen=True)
class RoundModel:
    """:func:`round_cost` for one (target, draft, selection reads, draft steps, dtype, hardware), its constants worked
    out once.

    The engine asks it every round; only the slots' contexts and budgets change, so :meth:`cost`
    is a sum over the slots. Bytes are per round (``weights``), or per context, selected or key row
    of one slot; seconds are per round (``round_s``, ``rerank_s``, ``fixed_s``) or per context row
    of a slot (``score_s``).
    """

    reads: SelectionReads
    draft: DraftSteps
    bandwidth: float
    #: The weights every round reads, dense or sparse: the target's once, the draft's once per step.
    weights: int
    #: Dense verification: K and V of every target layer.
    dense_row: int
    #: Sparse verification, per context row: K and V of the dense layers, the draft K rows scored, the scores ranked.
    context_row: int
    #: Sparse verification, per selected row: K and V of the sparse layers.
    selected_row: int
    #: Sparse verification, per re-rank candidate (or scanned key): K of the sparse layers.
    key_row: int
    #: One draft step, per row it reads: K and V of every draft layer.
    draft_row: int
    #: Seconds every sparse round costs beyond its bytes.
    round_s: float
    #: The re-rank kernels' seconds over the sparse layers (paid when there are candidates).
    rerank_s: float
    #: The radix path's seconds over the sparse layers, and per candidate of a slot (over its KV heads and the
    #: sparse layers): paid past :data:`RADIX_CANDIDATES` candidates.
    radix_s: float
    radix_candidate_s: float
    #: Top-k's seconds per context row of a slot (over every score row).
    score_s: float
    #: Seconds every round's forwards cost beyond their bytes, dense or sparse.
    fixed_s: float

    @classmethod
    def build(cls, target: ModelConfig, draft: ModelConfig, reads: SelectionReads, dtype_bytes: int,
              hardware: Hardware = Hardware(), steps: DraftSteps = DraftSteps()) -> RoundModel:
        """Return the model of ``target`` verifying ``steps``' drafts with ``draft``'s selection ``reads``
        (see :func:`round_cost`)."""
        sparse_layers = target.n_layers - reads.dense_layers
        return cls(
            reads, steps, hardware.bandwidth,
            weights=weight_bytes(target, dtype_bytes) + steps.steps * weight_bytes(draft, dtype_bytes),
            dense_row=kv_bytes(target, 1, dtype_bytes),
            context_row=(kv_bytes(target, 1, dtype_bytes, layers=reads.dense_layers)
                         + kv_bytes(draft, 1, reads.key_bytes or dtype_bytes, layers=reads.draft_layers, k_only=True)
                         + SCORE_BYTES * reads.score_rows),
            selected_row=kv_bytes(target, 1, dtype_bytes, layers=sparse_layers),
            key_row=kv_bytes(target, 1, dtype_bytes, layers=sparse_layers, k_only=True),
            draft_row=kv_bytes(draft, 1, dtype_bytes),
            round_s=hardware.round_s, rerank_s=hardware.rerank_layer_s * sparse_layers,
            radix_s=hardware.radix_layer_s * sparse_layers,
            radix_candidate_s=hardware.radix_candidate_s * sparse_layers * target.n_kv_heads,
            score_s=hardware.score_s * reads.score_rows, fixed_s=hardware.forward_s * (steps.steps + 1),
        )

    def cost(self, contexts: Sequence[int], budget: int | Sequence[int]) -> RoundCost:
        """Return the modelled time of one round, dense and sparse (arguments as :func:`round_cost`'s)."""
        budgets = [budget] * len(contexts) if isinstance(budget, int) else budget
        if len(budgets) != len(contexts):
            raise STSError(f"{len(budgets)} budgets for {len(contexts)} contexts: give one budget, or one per context")
        candidates = self.reads.rerank * max(max(budgets, default=0) - self.reads.forced, 0)
        steps, sparse_steps = self.draft.steps, self.draft.sparse_steps()
        sparse = 0
        for n, rows in zip(contexts, budgets):
            keys = n if self.reads.key_scan else min(candidates, n)
            sparse += self.context_row * n + self.selected_row * min(rows, n) + self.key_row * keys
            drafted = sparse_steps * min(self.draft.rows or n, n) + (steps - sparse_steps) * n
            sparse += self.draft_row * drafted
        total = sum(contexts)
        overhead = self.round_s + self.rerank_s * (candidates > 0) + self.score_s * total
        if candidates > RADIX_CANDIDATES:
            overhead += self.radix_s + self.radix_candidate_s * sum(min(candidates, n) for n in contexts)
        dense = (self.dense_row + steps * self.draft_row) * total
        return RoundCost((self.weights + dense) / self.bandwidth + self.fixed_s,
                         (self.weights + sparse) / self.bandwidth + overhead + self.fixed_s, self.draft.acceptance)


def round_cost(
    target: ModelConfig, draft: ModelConfig, reads: SelectionReads, contexts: Sequence[int], budget: int | Sequence[int],
    dtype_bytes: int, hardware: Hardware = Hardware(), steps: DraftSteps = DraftSteps(),
) -> RoundCost:
    """Return the modelled time of one round, dense and sparse, with ``steps``' draft forwards.

    ``contexts``: each decoding slot's context rows (free slots left out); ``budget``: rows per
    (slot, KV head) this round, one number for every slot or one per slot of ``contexts`` (the
    re-rank candidates are the largest's); ``dtype_bytes``: bytes per cache and weight element (2 for bf16).
    Raises STSError when ``budget`` is a sequence of another length than ``contexts``.
    """
    return RoundModel.build(target, draft, reads, dtype_bytes, hardware, steps).cost(contexts, budget)


def break_even(
    target: ModelConfig, draft: ModelConfig, reads: SelectionReads, selection: SelectionConfig, batch: int,
    dtype_bytes: int, hardware: Hardware = Hardware(), limit: int = 1 << 24, steps: DraftSteps = DraftSteps(),
) -> int | None:
    """Return the shortest context (rows per slot, every one of ``batch`` slots alike) at which sparse verification
    pays, or None when it does not pay even at ``limit`` rows.

    Found by bisection, which assumes that once sparse verification pays it keeps paying at longer
    contexts: true for a whole-number budget, since past the budget every row saves more than its
    selection costs (else it never pays). A fractional budget grows with the context in buckets
    (:meth:`SelectionConfig.tokens`), and near the break-even a bucket's step can flip the comparison
    back for a while: the context returned pays, the one before it does not.
    """
    if batch < 1:
        raise STSError(f"batch must be >= 1, got {batch}")

    model = RoundModel.build(target, draft, reads, dtype_bytes, hardware, steps)

    def pays(n: int) -> bool:
        return model.cost([n] * batch, selection.tokens(n)).sparse_pays

    if not pays(limit):
        return None
    lo, hi = 0, limit  # lo does not pay (an empty context saves nothing), hi pays
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pays(mid) else (mid, hi)
    return hi
