"""The draft's own sparse attention for a round's steps after the first (``--draft-budget``).

A round's first draft step reads the whole context (it re-reads the last accepted tokens and
its queries feed the selection); the later steps can read a few hundred rows, so that a draft
step costs about its weights at any context length. With "-all" (``recent-all``, ``scored-all``)
the first step reads those rows too and no draft step reads the whole context: MagicDec's
self-speculation (Chen et al. 2024) drafts that way with StreamingLLM rows. (``scored-all``, the default
of ``--method sts``, does so in sparse rounds; a round verified densely, below the break-even, has no scores
and drafts densely.) Which rows:

* ``recent`` (:class:`SparseDraftAttention`): the first ``sink`` rows and the latest ones
  (StreamingLLM's rule, Xiao et al. 2023). Free, but blind to anything the text refers back to.
* ``scored`` (:class:`ScoredDraftAttention`): sinks, the latest ``window`` rows, and per draft
  layer the rows that layer's attention scored best in the last sparse round. STS computes
  those scores anyway (the select phase scores the context with the draft's queries and keys);
  the draft reuses them for itself, as the target does for its verify rows.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from sts.attention import dispatch
from sts.errors import STSError
from sts.selection.streaming import streaming_rows

#: How the sparse draft picks its rows, and whether the round's first step reads only them too ("-all").
DraftSelection = Literal["recent", "scored", "recent-all", "scored-all"]
DRAFT_SELECTIONS: tuple[str, ...] = get_args(DraftSelection)


def check_draft(budget: int | None, selection: str) -> None:
    """Raise :class:`~sts.errors.STSError` for a selection that is not one of :data:`DRAFT_SELECTIONS`, one other
    than "recent" without a draft ``budget`` (rows; None: a dense draft), or a budget with no row past the sinks."""
    if selection not in DRAFT_SELECTIONS:
        raise STSError(f"draft selection must be one of {', '.join(DRAFT_SELECTIONS)}, got {selection!r}")
    if selection != "recent" and budget is None:
        raise STSError(f"draft selection {selection} needs a draft budget (--draft-budget)")
    if budget is not None:
        SparseDraftAttention(budget)  # refuses a budget with no row past the sinks


class SparseDraftAttention:
    """The draft's attention for the steps after a round's first: the first ``sink`` rows and the latest rows,
    ``budget`` in all (StreamingLLM's selection, Xiao et al. 2023).

    The rows depend only on the step's positions, so they are computed once per step (the first
    layer's call) and shared by every layer: a step adds one small kernel, not a few per layer.
    """

    def __init__(self, budget: int, sink: int = 4) -> None:
        if budget <= sink:
            raise STSError(f"draft budget must exceed the {sink} sink rows, got {budget}")
        self.budget, self.sink = budget, sink
        self._positions: Tensor | None = None
        self._rows: Tensor | None = None

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the attention of ``q`` over the sink and latest rows (and, causally, the new rows)."""
        if start_pos is not self._positions:
            self._positions = start_pos
            self._rows = streaming_rows(start_pos, self.budget, self.sink, k_cache.shape[1])
        return dispatch.verify_attention(q, k_cache, v_cache, start_pos, self._rows)


class ScoredDraftAttention:
    """The draft's attention in a sparse round's steps after the first (every step with "scored-all") over ``budget``
    rows per (sequence, KV head): the first ``sink`` rows, the latest ``window`` rows and, per draft layer, the
    best-scored rows of the last :meth:`keep`.

    Rows live in one static buffer ``[draft layers, slots, Hkv, budget]`` (CUDA-graph safe): each step writes its
    sink and window columns for every layer at once; :meth:`keep` writes the scored columns from the select phase's
    ranking. Scored rows never repeat a sink or window row: they were chosen among rows older than the window
    of their round, and a later step's window only moves forward. Until its first sparse round a new sequence
    reads, in their place, the rows just before its window at its prompt's end (:meth:`start`): the recent rule's
    choice, not nothing. Invalid entries (the cache length) cost no bandwidth.

    Raises :class:`~sts.errors.STSError` when ``budget`` leaves no row past ``sink + window``.
    """

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, budget: int, sink: int, window: int,
                 invalid: int, device: torch.device) -> None:
        if budget <= sink + window:
            raise STSError(f"a scored draft budget must exceed sink + window ({sink} + {window}), got {budget}")
        self.sink, self.window, self.recent, self.invalid = sink, window, sink + window, invalid
        self.rows = torch.full((n_layers, slots, n_kv_heads, budget), invalid, dtype=torch.long, device=device)
        self._positions: Tensor | None = None

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the attention of ``q`` over this layer's rows (and, causally, the new rows)."""
        if start_pos is not self._positions:  # a new step: its sinks and window, for every layer in one write
            self._positions = start_pos
            self.rows[..., : self.recent] = streaming_rows(start_pos, self.recent, self.sink, self.rows.shape[2])
        return dispatch.verify_attention(q, k_cache, v_cache, start_pos, self.rows[layer])

    @property
    def width(self) -> int:
        """Scored rows per (draft layer, sequence) past the sinks and the window."""
        return self.rows.shape[-1] - self.recent

    def keep(self, layers: Tensor, values: Tensor, rows: Tensor) -> None:
        """Keep, for draft layers ``layers`` (``[L]``), the first :attr:`width` of ``rows`` ``[L, B, K]``: free rows
        best first, as :func:`~sts.selection.base.ranked_free_rows` gives them with their ``values`` (``-inf``: none;
        STS's :meth:`~sts.selection.sts.STSPolicy.draft_layer_ranking`); no host synchronisation."""
        width = self.width
        best = torch.where(torch.isinf(values[..., :width]), self.invalid, rows[..., :width])
        if best.shape[-1] < width:  # a cache shorter than the budget: no row may stay from before
            best = F.pad(best, (0, width - best.shape[-1]), value=self.invalid)
        self.rows[layers, :, :, self.recent :] = best.unsqueeze(2)

    def start(self, slot: int, context: int) -> None:
        """Give slot ``slot``, whose new sequence has ``context`` rows, the rows just before its window in place of
        scored ones (those past the sinks; the rest invalid)."""
        # The rows are made on the host and copied: run eagerly on the GPU before the rounds, the comparison and
        # `where` kernels left every later CUDA-graph replay ~0.4 us slower per kernel boundary until the next
        # eager forward (measured on an H200, 2026-11-30: dense rounds 5% slower; docs/benchmarks.md).
        free = self.rows.shape[-1] - self.recent
        first = context - self.window - free
        rows = torch.arange(first, first + free)
        self.rows[:, slot, :, self.recent :] = torch.where(rows >= self.sink, rows, self.invalid).to(self.rows.device)
