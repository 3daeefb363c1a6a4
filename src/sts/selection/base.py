"""The selection-policy interface: which context rows each target KV head reads while verifying.

Each method (STS, StreamingLLM, Quest, TidalDecode, SpecPC, oracle) is one small class with one
job: turn what it knows (draft scores, target queries, keys) into ``[B, Hkv, K]`` row indices.
Budget accounting, sinks, the local window, dense layers and recall measurement are shared here,
so every method is compared on exactly the same terms.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from sts.attention.reference import attention_probs
from sts.errors import STSError
from sts.models.transformer import Transformer

#: Rows per target KV head when none is given: the paper's headline budget (2.88x at 100K, DESIGN.md), the budget
#: every speed figure of docs/benchmarks.md uses. 256 lost 30 points of QA at 32K on the demo pair
#: (docs/results.md, "On the GPU").
DEFAULT_BUDGET = 512


@dataclass(frozen=True)
class SelectionConfig:
    """A token budget per (sequence, target KV head): sinks + window + top-scored rows, all counted.

    ``budget`` is a number of context rows, or a fraction of the context when < 1 (0.1 = 90%
    sparsity). The gamma+1 rows being verified are always attended (causally) and not counted.
    The first ``dense_layers`` target layers attend to the whole context.
    """

    budget: float = DEFAULT_BUDGET
    sink: int = 4
    window: int = 64
    dense_layers: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.budget < math.inf:
            raise STSError(f"budget must be finite and > 0, got {self.budget}")
        if self.budget >= 1 and self.budget != int(self.budget):
            raise STSError(f"a budget >= 1 is a token count and must be whole, got {self.budget}")
        if self.sink < 0 or self.window < 0 or self.dense_layers < 0:
            raise STSError("sink, window and dense layers must be >= 0")
        if self.budget >= 1 and self.sink + self.window > self.budget:
            raise STSError(
                f"sink ({self.sink}) + window ({self.window}) exceed the budget ({int(self.budget)})"
            )

    def tokens(self, context: int) -> int:
        """Return the budget in rows for a context of ``context`` rows (at least sink + window).

        A fraction is rounded up to the next of eight sizes per octave (at most 12.5% more rows),
        so that a growing context changes the kernels' static shapes (a recompilation and a new
        CUDA graph) only a few times per doubling instead of every few tokens.
        """
        if self.budget >= 1:
            return int(self.budget)
        return max(bucket_up(math.ceil(self.budget * context)), self.sink + self.window)


def bucket_up(n: int, per_octave: int = 8, smallest: int = 64) -> int:
    """Return the smallest of ``smallest`` and ``2**e * (1 + i / per_octave)`` (whole numbers) that is >= ``n``."""
    if n <= smallest:
        return smallest
    step = max(1, (1 << (n.bit_length() - 1)) // per_octave)
    return -(-n // step) * step


@dataclass
class RoundContext:
    """What a policy may use to choose rows for one verification step."""

    #: ``[B]`` context rows per sequence (rows before the gamma+1 verified tokens).
    start_pos: Tensor
    target: Transformer
    #: Rows each (sequence, target KV head) reads this round, sinks and window included
    #: (a static number: the engine resolves fractional budgets, see :meth:`SelectionConfig.rows`).
    budget: int
    draft: Transformer | None = None
    #: Draft layer -> that layer's queries of this round's draft steps, ``[B, Hq_draft, gamma, D]``.
    draft_queries: dict[int, Tensor] = field(default_factory=dict)
    #: The one batch slot the round serves (a prefill), or None for the whole batch.
    slot: int | None = None
    #: ``[B]`` rows each sequence reads (its own budget, at most ``budget``): a ranked policy's rows at
    #: rank ``>= slot_budgets[b]`` are dropped (:meth:`SelectionPolicy.slot_rows`). None: ``budget`` for every sequence.
    slot_budgets: Tensor | None = None
    #: Scored rows the sparse draft keeps per draft layer past its sinks and window
    #: (:class:`~sts.selection.draft.ScoredDraftAttention`; 0: none): STS ranks that many for it in the same top-k.
    draft_rows: int = 0
    #: Draft layer -> its score rows (:meth:`~sts.selection.sts.STSPolicy.score_sources`), computed while the draft's
    #: last step ran (the engine's early scoring); a policy scores the layers missing here itself.
    early_scores: dict[int, list[Tensor]] = field(default_factory=dict)

    def draft_keys(self, layer: int) -> Tensor:
        """Return the draft's key cache ``[B, Hkv_draft, S, D]`` of ``layer`` for this round's sequences."""
        assert self.draft is not None
        cache = self.draft.layers[layer].self_attn.cache
        assert cache is not None
        return cache.rows(self.slot)[0]

    def score_keys(self, layer: int) -> Tensor:
        """Return the draft keys ``layer`` scores with, ``[B, Hkv_draft, S, D]``: its 8-bit copy when the cache keeps
        one (:meth:`~sts.models.transformer.KVCache.keep_score_keys`), else :meth:`draft_keys`."""
        assert self.draft is not None
        cache = self.draft.layers[layer].self_attn.cache
        assert cache is not None
        return cache.scoring_keys(self.slot)


class SelectionPolicy(ABC):
    """Chooses the context rows each target KV head reads during verification."""

    #: The name used on the command line (``--method``).
    name: ClassVar[str]
    #: Whether the policy reads the draft's queries (then the decode loop records them).
    uses_draft: ClassVar[bool] = False
    #: Whether a round never synchronises with the host (then the engine captures it in a CUDA graph).
    graph_safe: bool = False
    #: Whether :meth:`select` gives each (sequence, KV head) its rows in rank order (sinks and window first), so that
    #: a prefix is a smaller budget's selection: then sequences of one round can each read their own budget. A policy
    #: that is not ranked selects the round's budget for every sequence (and refuses per-sequence budgets).
    ranked: bool = True

    def __init__(self, config: SelectionConfig) -> None:
        self.config = config
        self.budget = 0
        self.slot_budgets: Tensor | None = None
        #: Whether :meth:`feedback` wants the target's attention on the rows it selected.
        self.wants_feedback = False

    def draft_layers(self, draft: Transformer) -> tuple[int, ...]:
        """Return the draft layers whose queries this policy needs recorded."""
        return ()

    def reset(self) -> None:
        """Forget state carried from earlier steps (called when a new generation or text starts)."""

    def prepare(self, ctx: RoundContext) -> None:
        """Take this round's budget and precompute what :meth:`select` needs (e.g. scores from draft queries)."""
        self.ctx = ctx
        self.budget = ctx.budget
        self.slot_budgets = ctx.slot_budgets if self.ranked else None
        self._kept: dict[int, Tensor] = {}  # per width: which ranks each sequence keeps this round

    def feedback(self, layer: int, rows: Tensor, importance: Tensor) -> None:
        """Receive the target's attention ``[B, Hkv, K]`` on the ``rows`` it read at ``layer`` (max over group and queries)."""

    @abstractmethod
    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor | None:
        """Return ``[B, Hkv, N]`` scores of context rows for a target layer (None: attend densely).

        ``N >= max(start_pos)``; only rows ``< start_pos[b]`` are read. Sinks and the window are
        added on top by :func:`topk_rows`, so scores only need to rank the other rows.
        """

    def select(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor | None:
        """Return ``[B, Hkv, K]`` selected rows for a target layer, or None to attend densely."""
        scores = self.scores(layer, q, k_cache, start_pos)
        if scores is None:
            return None
        return topk_rows(scores, start_pos, self.budget, self.config.sink, self.config.window, ranked=True)

    def slot_rows(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor | None:
        """Return :meth:`select`'s ``[B, Hkv, K]`` rows with each sequence's cut to its own budget (rows at rank
        ``>= slot_budgets[b]`` made invalid: ``S``, the cache length), or None to attend densely."""
        idx = self.select(layer, q, k_cache, start_pos)
        if idx is None or self.slot_budgets is None:
            return idx
        width = idx.shape[-1]
        if width not in self._kept:  # once per round and width, not per layer
            self._kept[width] = kept_ranks(width, self.slot_budgets)
        return torch.where(self._kept[width], idx, k_cache.shape[2])


def kept_ranks(width: int, budgets: Tensor) -> Tensor:
    """Return ``[B, 1, width]`` bool: which ranks of a ranked selection sequence ``b`` keeps at its budget ``budgets[b]``
    (``[B]``); the others are made invalid (the cache length)."""
    return torch.arange(width, device=budgets.device).view(1, 1, -1) < budgets.view(-1, 1, 1)


def competing_rows(n: int, start_pos: Tensor, sink: int, window: int) -> tuple[Tensor, Tensor]:
    """Return (forced, valid) masks ``[B, 1, n]``: sink/window rows always kept, and rows inside the context."""
    pos = torch.arange(n, device=start_pos.device).view(1, 1, n)
    ctx = start_pos.view(-1, 1, 1)
    return (pos < sink) | (pos >= ctx - window), pos < ctx


def ranked_free_rows(scores: Tensor, start_pos: Tensor, sink: int, window: int, k: int) -> tuple[Tensor, Tensor]:
    """Return ``(values, rows)`` ``[..., B, H, min(k, N)]``: the ``k`` best-scored rows of ``scores`` ``[..., B, H, N]``
    that are neither sinks nor the latest ``window`` rows of contexts ``start_pos`` ``[B]``, best first (values
    ``-inf`` where fewer such rows exist). Every prefix is the best rows of its length, so one call serves several
    widths (the scored draft's rows and the re-rank's candidates share it)."""
    forced, valid = competing_rows(scores.shape[-1], start_pos, sink, window)
    return torch.topk(scores.masked_fill(forced | ~valid, float("-inf")), min(k, scores.shape[-1]), dim=-1)


def topk_rows(scores: Tensor, start_pos: Tensor, budget: int, sink: int, window: int, ranked: bool = False) -> Tensor:
    """Return ``[B, H, budget]`` rows: the first ``sink``, the last ``window`` and the best-scored rest.

    Rows at or past ``start_pos[b]`` are never chosen before valid ones; when a sequence has no
    more than ``budget`` context rows, all of them are selected (and the padding is invalid).
    ``ranked``: in rank order (sinks and window first), so any prefix is a smaller budget's choice.
    """
    b, h, n = scores.shape
    forced, valid = competing_rows(n, start_pos, sink, window)
    order = scores.float().masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    k = min(budget, n)
    idx = torch.topk(order, k, dim=-1, sorted=ranked).indices
    if k < budget:
        # Fewer rows than the budget exist: pad with an invalid row index (>= start_pos).
        pad = torch.full((b, h, budget - k), n, dtype=idx.dtype, device=idx.device)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def group_max(x: Tensor, n_kv_heads: int) -> Tensor:
    """Return ``[B, Hkv, N]``: the max of per-query-head scores ``[B, Hq, ..., N]`` over each GQA group and query."""
    b, hq = x.shape[:2]
    return x.reshape(b, n_kv_heads, -1, x.shape[-1]).amax(dim=2)


def dense_scores(q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
    """Return ``[B, Hkv, N]``: each context row's dense attention probability, averaged over group and queries.

    The mean (not the max) makes top-k of it the selection with the highest mass recall, which
    is the metric the oracle bounds.
    """
    b, hq, t, _ = q.shape
    n = int(start_pos.max())
    probs = attention_probs(q, k_cache, start_pos)[..., :n]
    return probs.reshape(b, k_cache.shape[1], -1, n).mean(2)


REGISTRY: dict[str, type[SelectionPolicy]] = {}


def register(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Class decorator: make a policy available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls
