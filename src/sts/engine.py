"""The decode engine: one round for every method, run eagerly on the CPU and in CUDA graphs on the GPU.

Every caller (``sts generate``, the Python API, ``sts eval``, the server and ``sts bench``)
decodes through :class:`Engine`. Its batch is a fixed number of **slots**: each holds one
sequence with its own length, is filled by :meth:`Engine.prefill` and freed by
:meth:`Engine.release` between rounds, so sequences can finish and be replaced (continuous
batching). The per-slot state lives on the device in static buffers:

* ``ctx[s]``: rows of the target's cache that hold the sequence (everything but its last token);
* ``last[s]``: the latest token, not yet in any cache; ``prev[s]``: the token before it;
* ``active[s]``: whether the slot decodes. A free slot attends to nothing (its context is
  treated as empty), so finished sequences cost no KV reads.

One round (:meth:`Engine.step`) is, for speculative methods (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; with a selection policy, STS):

1. **draft**: the draft reads ``prev, last`` at rows ``ctx - 1, ctx`` (re-writing row ``ctx - 1``
   makes up for the draft never having read the last draft token of a fully accepted round,
   with one static shape), then proposes ``gamma`` tokens; the mapped draft layers' queries are
   recorded for the policy;
2. **select**: the policy scores the context and picks rows for this round's ``budget``, the largest
   of the decoding slots' own budgets (each a token count, or a fraction resolved against that
   slot's context; :meth:`Engine.prefill` may give a slot its own); a ranked policy's rows past a
   slot's own budget are dropped, so each slot reads what it would read decoded alone;
3. **verify**: the target reads ``last`` and the drafts over the selected rows; acceptance runs
   on the device (exact match for greedy, rejection sampling otherwise) and updates the state.

Below a break-even context the selection (and a sparse draft's lower acceptance) costs more than
the KV reads it saves (the weights, read either way, dominate the round), so by default
(``verify="auto"``) each round first asks the bandwidth model of :mod:`sts.costmodel`, on the host,
whether a sparse round costs less per accepted token for the slots' contexts; when it does not, the
round skips the select phase and drafts and verifies densely (budget 0): it then decodes exactly
what dense speculative decoding decodes.

Rolling back rejected tokens is free: rows past ``ctx`` are scratch. On CUDA each phase is
captured once per budget size in a CUDA graph (static shapes: the cache length, the slot count,
``gamma`` and the budget in rows), and the only host synchronisation of a round is the copy
of its new tokens. The CPU path runs the same functions eagerly: it is the reference the graph
path is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Generator, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor

from sts.attention.dispatch import kernel_head_dim
from sts.attention.backend import AttentionFn, QueryRecorder, chunk_attention, dense_attention
from sts.costmodel import DraftSteps, Hardware, RoundModel, selection_reads
from sts.decoding import (
    GenerationResult, GenerationStats, PrefixCache, StopState, StreamCallback, context_capacity, synchronize,
)
from sts.errors import STSError
from sts.models.transformer import Transformer
from sts.sampling import SamplingConfig, SamplingRows, accept, check_seed, draw, probabilities
from sts.selection.attend import SelectiveAttention, ShadowAttention
from sts.selection.base import RoundContext, SelectionConfig, SelectionPolicy
from sts.prefill import PrefillConfig, sparse_prefill
from sts.selection.mapping import HeadMapping
from sts.selection.draft import DraftSelection, ScoredDraftAttention, SparseDraftAttention, check_draft
from sts.selection.sts import STSPolicy

#: Prompt tokens per prefill chunk on CUDA: large enough for the matrix units, small enough that
#: a chunk's activations stay a small share of memory at 128K contexts.
CUDA_PREFILL_CHUNK = 8192


@dataclass
class EngineConfig:
    """How the engine decodes; the defaults decode greedily with dense speculative rounds of 4 drafts."""

    gamma: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    #: Rows the draft's steps after a round's first read; None: dense. With a selection policy only in its sparse
    #: rounds: the rounds it verifies densely (``verify="auto"`` below the break-even context) draft densely too.
    draft_budget: int | None = None
    #: Which rows those are (:mod:`sts.selection.draft`): "recent", sinks and the latest rows; "scored" (STS only),
    #: sinks, the policy's window and the rows each draft layer scored best in the last sparse round. With "-all"
    #: ("recent-all", "scored-all") the round's first draft step reads them too, not every row.
    draft_selection: DraftSelection = "recent"
    #: Token ids at and past this are never proposed nor emitted (the tokenizer's size when a
    #: pair pads its embedding tables differently); None: the target's vocabulary.
    vocab: int | None = None
    #: Prompt tokens per prefill chunk; None: 512 on the CPU, :data:`CUDA_PREFILL_CHUNK` on CUDA.
    prefill_chunk: int | None = None
    #: Capture rounds in CUDA graphs when the device and the policy allow it.
    cuda_graphs: bool = True
    #: Also measure recall against the target's dense attention (evaluation only; eager).
    measure_recall: bool = False
    #: Sparse target prefill (draft-chosen key blocks, :mod:`sts.prefill`); CPU only for now.
    sparse_prefill: PrefillConfig | None = None
    seed: int = 0
    #: How a selection policy's rounds verify: "auto" densely in the rounds where, by :mod:`sts.costmodel`,
    #: the selection costs more than the KV reads it saves (short contexts), else over the policy's rows;
    #: "sparse": always over the policy's rows. Recall measurement and teacher-forced rounds are always sparse.
    verify: Literal["auto", "sparse"] = "auto"
    #: The bandwidth and overheads the "auto" decision is modelled with (default: an H200's; a parameter, not a probe).
    hardware: Hardware = field(default_factory=Hardware)

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise STSError(f"gamma must be >= 1, got {self.gamma}")
        check_seed(self.seed)
        if self.verify not in ("auto", "sparse"):
            raise STSError(f"verify must be 'auto' or 'sparse', got {self.verify!r}")
        check_draft(self.draft_budget, self.draft_selection)
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise STSError(f"prefill chunk must be >= 1, got {self.prefill_chunk}")


class _PhaseClock:
    """Times a round's phases: CUDA events on the GPU (read after the round's one sync), host clock on the CPU."""

    def __init__(self, device: torch.device, n_marks: int) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = [None] * n_marks

    def mark(self, i: int) -> None:
        """Record phase boundary ``i``."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[i] = event
        else:
            self.marks[i] = time.perf_counter()

    def seconds(self, i: int) -> float:
        """Return the seconds between boundaries ``i`` and ``i + 1`` (after the round has synchronised)."""
        a, b = self.marks[i], self.marks[i + 1]
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class Engine:
    """Decodes up to ``slots`` sequences at once with one target, and optionally a draft and a selection policy.

    Without a draft it decodes autoregressively (one target forward per token); with a draft,
    speculatively; with a ``policy`` too, the target verifies over the policy's rows (STS and
    the baselines). ``max_len`` is every slot's cache length in rows: a sequence needs its
    prompt, its new tokens and ``gamma + 1`` scratch rows.

    Raises :class:`~sts.errors.STSError` for impossible settings (see :class:`EngineConfig`).
    """

    def __init__(
        self, target: Transformer, draft: Transformer | None = None, policy: SelectionPolicy | None = None,
        *, slots: int = 1, max_len: int, config: EngineConfig | None = None, prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        if policy is not None and draft is None:
            raise STSError("a selection policy verifies a draft's tokens: give a draft model")
        if slots < 1:
            raise STSError(f"slots must be >= 1, got {slots}")
        if self.config.sparse_prefill is not None and draft is None:
            raise STSError("--sparse-prefill needs a draft: use a speculative method")
        if self.config.sparse_prefill is not None and target.embed_tokens.weight.is_cuda:
            raise STSError("--sparse-prefill runs on the CPU only for now (its block scoring does not fit GPU shared "
                           "memory at long prompts); use the dense prefill on CUDA")
        self.target, self.draft, self.policy = target, draft, policy
        self.slots, self.max_len = slots, max_len
        self.prefix_cache = prefix_cache
        self.device = target.embed_tokens.weight.device
        cuda = self.device.type == "cuda"
        self.chunk = self.config.prefill_chunk or (CUDA_PREFILL_CHUNK if cuda else 512)
        self.vocab = self.config.vocab or target.config.vocab_size
        self.gamma = self.config.gamma if draft is not None else 0
        for model in (target, draft):
            if model is not None:
                model.setup_cache(slots, max_len)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.seed)
        if policy is not None:
            policy.reset()
        layers = policy.draft_layers(draft) if policy is not None and policy.uses_draft else ()
        if draft is not None:  # STS's key_bits=8: an 8-bit copy of the scored layers' keys (else none, even if an
            # earlier engine over this draft kept one)
            eight = isinstance(policy, STSPolicy) and policy.key_bits == 8
            for i, block in enumerate(draft.layers):
                assert block.self_attn.cache is not None
                block.self_attn.cache.keep_score_keys(eight and i in layers)
        self.recorder = QueryRecorder(layers, last_only=True)
        self.verify_attention: AttentionFn = (
            SelectiveAttention(policy, self.config.measure_recall) if policy is not None else dense_attention)
        #: Whether each round asks the cost model if sparse verification pays (else every round of a policy is sparse).
        budget = self.config.draft_budget
        if budget is not None and budget >= max_len:  # a budget past the cache's rows reads every row: dense kernels
            budget = None
        self.crossover = policy is not None and self.config.verify == "auto" and not self.config.measure_recall
        if self.crossover:  # the cost model's constants for this pair, once: each round adds only the contexts
            assert policy is not None and draft is not None
            steps = DraftSteps.of(self.gamma, budget, self.config.draft_selection)
            self.round_model = RoundModel.build(target.config, draft.config, selection_reads(policy, target, draft),
                                                target.embed_tokens.weight.element_size(), self.config.hardware, steps)
        #: STS scores the context during the draft's last step, each draft layer as soon as its queries of the round
        #: are complete (:meth:`_score_early`; on CUDA on a second stream, so the score passes overlap the draft's later
        #: layers); False: in the select phase, after the draft.
        self.early_scoring = isinstance(policy, STSPolicy)
        self._side = torch.cuda.Stream(self.device) if cuda and self.early_scoring else None
        self._early: dict[int, list[Tensor]] = {}  # draft layer -> score rows, from the draft phase to the select phase
        self._early_inputs: list[Tensor] = []  # the side stream's queries, kept alive until the streams join
        self.later_draft_attention: AttentionFn = SparseDraftAttention(budget) if budget is not None else dense_attention
        #: The draft's later steps in sparse rounds, over the rows the select phase scored (None: as in dense rounds).
        self.scored_draft: ScoredDraftAttention | None = None
        if self.config.draft_selection.startswith("scored"):
            if not isinstance(policy, STSPolicy) or draft is None:
                raise STSError("a scored draft selection reuses STS's draft scores: use --method sts with --draft-budget")
            if budget is not None:
                self.scored_draft = ScoredDraftAttention(draft.config.n_layers, slots, draft.config.n_kv_heads, budget,
                                                         policy.config.sink, policy.config.window, max_len, self.device)
                self.scored_layers = torch.tensor(policy.draft_layers(draft), device=self.device)

        def buffer(dtype: torch.dtype, *shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        long = torch.long
        self.ctx, self.last, self.prev = buffer(long, slots), buffer(long, slots), buffer(long, slots)
        self.active = buffer(torch.bool, slots)
        self.out_tokens, self.out_count = buffer(long, slots, self.gamma + 1), buffer(long, slots)
        self.round_sparsity = buffer(torch.float32, 1)
        self.sampling_rows = SamplingRows.filled(self.config.sampling, slots, self.device)
        self.host_sampling = [self.config.sampling] * slots
        self.round_mode = "greedy"
        self.host_ctx = [0] * slots
        self.host_active = [False] * slots
        # Per-slot budgets: each slot's selection settings (None: the policy's) and its rows this round, on the host
        # and in a device buffer the select phase reads (copied only when they change).
        self.slot_selection: list[SelectionConfig | None] = [None] * slots
        self.host_budgets = [0] * slots
        self.slot_budgets = buffer(long, slots)
        self.stats = GenerationStats()
        # The PyTorch reference paths (heads the kernels do not take) size their work on the host.
        kernels = all(kernel_head_dim(m.config.head_dim) for m in (target, draft) if m is not None)
        self.graphs_enabled = (
            cuda and kernels and self.config.cuda_graphs and not self.config.measure_recall
            and (policy is None or policy.graph_safe))
        self._graphs: dict[tuple[int, str], list[torch.cuda.CUDAGraph]] = {}  # (budget, mode); budget 0: dense
        self._hold: dict[str, Tensor] = {}
        self.round_budget = 0
        self._prefill_logits: dict[int, Tensor] = {}
        self._forced: Tensor | None = None
        if cuda:
            self._host_tokens = torch.zeros(slots, self.gamma + 1, dtype=long).pin_memory()
            self._host_count = torch.zeros(slots, dtype=long).pin_memory()
            self._host_sparsity = torch.zeros(1).pin_memory()

    # ------------------------------------------------------------------ slots

    def free_slots(self) -> list[int]:
        """Return the slots that hold no decoding sequence (one whose prefill is under way counts as free:
        its caller knows it)."""
        return [s for s in range(self.slots) if not self.host_active[s]]

    def room(self, slot: int) -> int:
        """Return how many more tokens slot ``slot`` can take before its cache is full."""
        return self.max_len - self.host_ctx[slot] - (self.gamma + 1)

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int] = (),
        on_tokens: StreamCallback | None = None, cached: bool = False,
    ) -> GenerationResult:
        """Return the continuations of up to ``slots`` prompts (prompt excluded), decoded to EOS or ``max_new_tokens``.

        ``cached``: slot ``b``'s rows of both models already hold prompt ``b`` but its last token (an
        earlier run over the same models read it: decoding never changes a prompt's rows), so
        prefill only reads each prompt's last token.

        ``on_tokens(b, ids)`` receives each sequence's tokens as soon as they are final. A
        sequence stops at an id in ``eos_ids`` (kept), at ``max_new_tokens``, or when its slot's
        cache is full; its slot is then freed, so it costs nothing in later rounds.
        """
        if not prompts or len(prompts) > self.slots:
            raise STSError(f"give 1 to {self.slots} prompts, got {len(prompts)}")
        stop = StopState(len(prompts), max_new_tokens, eos_ids, on_tokens)
        self.stats = stats = GenerationStats()
        if self.policy is not None:
            self.policy.reset()
        for s in range(self.slots):
            self.release(s)
        start = time.perf_counter()
        first_slot: dict[tuple[int, ...], int] = {}
        for b, prompt in enumerate(prompts):
            # A prompt given several times (n samples of one prompt) is read once and copied.
            src = first_slot.setdefault(tuple(prompt), b)
            stop.emit(b, [self.prefill(b, prompt, copy_from=None if src == b else src, cached=cached)])
        synchronize(self.device)
        stats.prefill_s = time.perf_counter() - start
        self._release_finished(stop)
        while not stop.finished:
            for b, tokens in enumerate(self.step()):
                if tokens:
                    stop.emit(b, tokens)
            self._release_finished(stop)
        stats.time_s = time.perf_counter() - start - stats.compile_s
        stats.new_tokens = sum(len(e) for e in stop.emitted)
        stats.prefill_tokens = len(prompts)
        return GenerationResult(stop.emitted, stats)

    def _release_finished(self, stop: StopState) -> None:
        """Free the slots of sequences that stopped, and stop those whose cache cannot take another round."""
        for b in range(len(stop.done)):
            if not stop.done[b] and self.room(b) < 0:
                stop.done[b] = True
            if stop.done[b] and self.host_active[b]:
                self.release(b)

    def prefill(
        self, slot: int, prompt: Sequence[int], sampling: SamplingConfig | None = None,
        copy_from: int | None = None, cached: bool = False, budget: float | None = None,
    ) -> int:
        """Read ``prompt`` into slot ``slot`` of both caches and return the first new token (the slot then decodes).

        ``sampling``: this sequence's settings (default: the engine's). ``copy_from``: a slot
        already prefilled with the same prompt, whose rows are copied instead. ``cached``: the
        slot's rows already hold the prompt but its last token (an earlier run over the same
        models read it: decoding never changes a prompt's rows); only the last token is read.
        ``budget``: this sequence's rows per (sequence, KV head), a token count or a fraction of
        its context as :class:`SelectionConfig`'s (default: the policy's); it then reads what a
        run at that budget alone would (see :meth:`_rows`).

        Raises :class:`~sts.errors.STSError` when the slot does not exist or decodes, the prompt
        is empty, holds ids outside the vocabulary, or leaves no room for a round in the cache;
        and for a budget without a ranked selection policy or one :class:`SelectionConfig` refuses
        (e.g. below sink + window).
        """
        first = None
        for first in self.prefill_steps(slot, prompt, sampling, copy_from, cached, budget):
            pass
        assert first is not None
        return first

    def prefill_steps(
        self, slot: int, prompt: Sequence[int], sampling: SamplingConfig | None = None,
        copy_from: int | None = None, cached: bool = False, budget: float | None = None,
    ) -> Iterator[int | None]:
        """Like :meth:`prefill`, one chunk per ``next()``: yields None after each chunk, then the first new token.

        Decode rounds may run between chunks (continuous batching): the slot is not decoding yet, and its
        context is the prompt's length from the first chunk on, so the rounds write only scratch rows past
        the prompt and the draft's last prompt row, which the slot's first round writes again. The draft
        is prefilled before the target.
        """
        n = self._check_prompt(slot, prompt)
        selection = self.slot_settings(budget)
        self.ctx[slot] = n  # for the rounds between chunks (docstring)
        if copy_from is not None:
            logits = self._copy_slot(copy_from, slot, n)
            self._centre_draft_keys(slot, n)
        elif cached:
            self._centre_draft_keys(slot, n)
            logits = yield from self._prefill_chunks(self.target, slot, prompt, first=n - 1)
        elif self.config.sparse_prefill is not None:
            assert self.draft is not None
            scorer = self.policy if isinstance(self.policy, STSPolicy) else STSPolicy(
                self.policy.config if self.policy else SelectionConfig(), HeadMapping.default(self.target.config, self.draft.config))
            logits = sparse_prefill(self.target, self.draft, slot, prompt, scorer, self.config.sparse_prefill, scorer.config, self.chunk)
            self._centre_draft_keys(slot, n)
        else:  # the draft first: the centring of its 8-bit keys (STS's key_bits=8) is eager, and eager kernels right
            # before the graphed rounds slowed every replay ~4% on an H200 (docs/benchmarks.md); a forward after them not
            if self.draft is not None:
                yield from self._prefill_chunks(self.draft, slot, prompt)
                self._centre_draft_keys(slot, n)
            logits = yield from self._prefill_chunks(self.target, slot, prompt)
        self._prefill_logits[slot] = logits
        config = sampling or self.config.sampling
        self.sampling_rows.set(slot, config)
        self.host_sampling[slot] = config
        first = int(self._pick_first(logits[:, : self.vocab], config))
        self.ctx[slot], self.last[slot], self.prev[slot], self.active[slot] = n, first, prompt[-1], True
        self.host_ctx[slot], self.host_active[slot] = n, True
        self.slot_selection[slot] = selection
        if self.scored_draft is not None:
            self.scored_draft.start(slot, n)
        yield first

    def _centre_draft_keys(self, slot: int, n: int) -> None:
        """Centre the 8-bit copy of the draft's K in slot ``slot`` on its ``n``-token prompt (STS's ``key_bits=8``; a
        no-op for caches without the copy, :meth:`~sts.models.transformer.KVCache.centre`).

        The mean is over the prompt's rows but the last, which a decode round between prefill chunks may have written
        (see :meth:`prefill_steps`): so a request's mean, hence its 8-bit keys, do not depend on what else decodes."""
        if self.draft is not None:
            for block in self.draft.layers:
                assert block.self_attn.cache is not None
                block.self_attn.cache.centre(slot, n - 1)

    def slot_settings(self, budget: float | None) -> SelectionConfig | None:
        """Return the selection settings of a sequence with its own ``budget`` (None: the policy's, returned as None).

        Raises :class:`~sts.errors.STSError` without a selection policy, for a policy that selects for the round's
        budget only (not :attr:`~sts.selection.base.SelectionPolicy.ranked`), or for a budget that
        :class:`SelectionConfig` refuses with the policy's sink and window.
        """
        if budget is None:
            return None
        if self.policy is None:
            raise STSError("a budget applies to selection methods; this engine verifies densely")
        if not self.policy.ranked:
            raise STSError(f"{self.policy.name} with these settings (feedback or per-head budgets) selects rows for a "
                           "whole round's budget: a sequence cannot have a budget of its own")
        return replace(self.policy.config, budget=budget)

    def _check_prompt(self, slot: int, prompt: Sequence[int]) -> int:
        """Return the prompt's length after checking that slot ``slot`` can take it."""
        if not 0 <= slot < self.slots:
            raise STSError(f"slot {slot} does not exist (the engine has {self.slots})")
        if self.host_active[slot]:
            raise STSError(f"slot {slot} is decoding: release it first")
        n = len(prompt)
        if n == 0:
            raise STSError("every prompt needs at least one token")
        if n + self.gamma + 2 > self.max_len:
            raise STSError(f"a prompt of {n} tokens leaves no room in a cache of {self.max_len} rows")
        if any(not 0 <= t < self.target.config.vocab_size for t in prompt):
            raise STSError(f"prompt token ids must be in [0, {self.target.config.vocab_size})")
        return n

    def _copy_slot(self, src: int, dst: int, rows: int) -> Tensor:
        """Copy the first ``rows`` cache rows of slot ``src`` into slot ``dst`` (both models); return src's prefill logits."""
        for model in (self.target, self.draft):
            if model is not None:
                for blk in model.layers:
                    for a, b in zip(blk.self_attn.cache.rows(src), blk.self_attn.cache.rows(dst)):
                        b[:, :, :rows].copy_(a[:, :, :rows])
        return self._prefill_logits[src]

    def release(self, slot: int) -> None:
        """Stop decoding slot ``slot`` (its rows become scratch for the next sequence; it reads nothing any more)."""
        self._prefill_logits.pop(slot, None)
        self.active[slot] = False
        self.ctx[slot] = 0
        self.host_active[slot] = False
        self.host_ctx[slot] = 0
        self.slot_selection[slot] = None

    def _prefill_chunks(self, model: Transformer, slot: int, prompt: Sequence[int], first: int = 0) -> Generator[None, None, Tensor]:
        """Write ``prompt`` from token ``first`` into slot ``slot`` chunk by chunk (yielding after each); return the ``[1, V]``
        float32 logits after it."""
        if self.prefix_cache is not None and not first:
            logits = self.prefix_cache.restore(model, prompt, slot)
            if logits is not None:
                return logits
        ids = torch.tensor(prompt, device=self.device).view(1, -1)
        for start in range(first, len(prompt), self.chunk):
            chunk = ids[:, start : start + self.chunk]
            pos = torch.full((1,), start, device=self.device)
            hidden = model.hidden(chunk, pos, chunk_attention(start), slot=slot)
            yield None
        logits = model.lm_head(hidden[:, -1]).float()
        if self.prefix_cache is not None and not first:
            self.prefix_cache.store(model, prompt, slot, logits)
        return logits

    def _pick_first(self, logits: Tensor, config: SamplingConfig) -> int:
        """Return the first new token from the prefill's logits ``[1, V]`` under ``config``."""
        if config.greedy:
            return int(logits.argmax(-1))
        return int(draw(probabilities(logits, config), self.generator))

    # ------------------------------------------------------------------ the round

    def step(self) -> list[list[int]]:
        """Run one round for every decoding slot; return each slot's new tokens (empty for free slots).

        A slot whose cache cannot take another round must be released first (see :meth:`room`).
        """
        if not any(self.host_active):
            raise STSError("no slot is decoding: prefill one first")
        if any(a and self.room(s) < 0 for s, a in enumerate(self.host_active)):
            raise STSError("a slot's cache is full: release it before the next round")
        budget, mode = self._budget(), self._mode()
        phases = self._phases(budget)
        clock = _PhaseClock(self.device, len(phases) + 1)
        if self.graphs_enabled:
            graphs = self._graphs.get((budget, mode)) or self._capture(budget, mode, phases)
            clock.mark(0)
            for i, graph in enumerate(graphs):
                graph.replay()
                clock.mark(i + 1)
        else:
            self.round_budget, self.round_mode = budget, mode
            clock.mark(0)
            for i, phase in enumerate(phases):
                phase()
                clock.mark(i + 1)
        tokens, counts, sparsity = self._fetch()
        self._account(clock, counts, sparsity, dense=budget == 0)
        out: list[list[int]] = []
        for s in range(self.slots):
            self.host_ctx[s] += counts[s]
            out.append(tokens[s][: counts[s]])
        return out

    def forced_step(self, blocks: Sequence[Sequence[int]], observers: Mapping[str, SelectiveAttention] | None = None) -> Tensor:
        """Run one teacher-forced round over known text; return the target's float32 logits ``[S, gamma + 1, V]``.

        ``blocks[s]`` holds slot ``s``'s next ``gamma + 2`` tokens, from its context on. The draft reads
        the first ``gamma`` of them (as a draft that guessed right would; its mapped queries are
        recorded), the policy selects rows for this round, and the target verifies the first
        ``gamma + 1`` over them: the logits predict tokens ``1 .. gamma + 1``. Every decoding slot then
        moves ``gamma + 1`` tokens on. With ``observers`` the target attends densely and each
        observer's policy chooses rows for those same queries (:class:`ShadowAttention`), so recall
        differences come from the selections alone. Eager: evaluation only (perplexity, recall).
        """
        if self.draft is None:
            raise STSError("teacher-forced verification needs a draft model")
        block = torch.tensor(blocks, device=self.device)
        if block.shape != (self.slots, self.gamma + 2):
            raise STSError(f"forced_step takes {self.gamma + 2} tokens for each of {self.slots} slots")
        if observers:
            self.recorder.watch(layer for o in observers.values() if o.policy.uses_draft for layer in o.policy.draft_layers(self.draft))
        self.round_budget, self.round_mode = self._rows() if self.policy is not None else 0, "greedy"
        self.last.copy_(torch.where(self.active, block[:, 0], self.last))
        self._forced = block[:, 1 : self.gamma + 1]
        try:
            self._draft_phase()
        finally:
            self._forced = None
        ctx = self._context()
        attention: AttentionFn = self.verify_attention
        if observers:
            queries = self.recorder.take()
            longest = max(c for c, a in zip(self.host_ctx, self.host_active) if a)
            for observer in observers.values():
                observer.policy.prepare(RoundContext(ctx, self.target, observer.policy.config.tokens(longest), self.draft, queries))
            attention = ShadowAttention(dict(observers))
        elif self.policy is not None:
            self._select_phase()
        logits = self.target(block[:, : self.gamma + 1], ctx, attention)[..., : self.vocab]
        count = (self.gamma + 1) * self.active.long()
        self._advance(block[:, 1:], count, block[:, self.gamma], block[:, self.gamma + 1])
        self.stats.target_forwards += 1
        self._record_selection(attention, float(attention.round_sparsity()) if isinstance(attention, SelectiveAttention) else None)
        self.host_ctx = [c + self.gamma + 1 if a else c for c, a in zip(self.host_ctx, self.host_active)]
        return logits

    def _rows(self) -> int:
        """Set each slot's rows per (sequence, KV head) for this round and return the round's: their max (one static
        number, the graphs' key).

        A decoding slot's rows are its own budget (:meth:`prefill`'s, else the policy's) resolved against its own
        context (never past the cache length), so it reads what it would alone; a policy that is not ranked gives
        every slot the longest's. The device buffer ``slot_budgets`` is copied from pinned memory, without a sync,
        only when they change.
        """
        assert self.policy is not None
        rows = [min((self.slot_selection[s] or self.policy.config).tokens(c), self.max_len) if a else 0
                for s, (c, a) in enumerate(zip(self.host_ctx, self.host_active))]
        if not self.policy.ranked:
            rows = [max(rows) if a else 0 for a in self.host_active]
        if rows != self.host_budgets:
            self.host_budgets = rows
            host = torch.tensor(rows)
            self.slot_budgets.copy_(host.pin_memory() if self.device.type == "cuda" else host, non_blocking=True)
        return max(rows)

    def _budget(self) -> int:
        """Return this round's rows per (sequence, KV head), or 0 when it verifies densely: without a policy, or when
        sparse verification does not pay for the decoding slots' contexts (:mod:`sts.costmodel`; host only, no sync)."""
        if self.policy is None:
            return 0
        rows = self._rows()
        if self.crossover:
            contexts = [c for c, a in zip(self.host_ctx, self.host_active) if a]
            budgets = [r for r, a in zip(self.host_budgets, self.host_active) if a]
            if not self.round_model.cost(contexts, budgets).sparse_pays:
                return 0
        return rows

    def _mode(self) -> str:
        """Return how this round draws tokens: "greedy" (every decoding slot), "filtered" (some slot uses top-k or
        top-p), else "sample"."""
        configs = [c for c, a in zip(self.host_sampling, self.host_active) if a]
        if all(c.greedy for c in configs):
            return "greedy"
        return "filtered" if any(c.top_k or c.top_p < 1.0 for c in configs if not c.greedy) else "sample"

    def _phases(self, budget: int) -> list[Callable[[], None]]:
        """Return the phases of a round of ``budget`` rows (0: dense) in order (timed separately; each one CUDA graph)."""
        if self.draft is None:
            return [self._decode_phase]
        if budget == 0:
            return [self._draft_phase, self._verify_phase]
        return [self._draft_phase, self._select_phase, self._verify_phase]

    def _context(self) -> Tensor:
        """Return ``[S]`` context rows per slot for this round: free slots have none (they read nothing), a slot
        being prefilled has what its chunks wrote (the round's scratch rows then fall past them)."""
        return self.ctx.clone()

    def _distributions(self, logits: Tensor) -> Tensor:
        """Return each slot's distributions ``[S, ..., V]`` under its own sampling settings (this round's mode)."""
        return probabilities(logits, self.sampling_rows, filtered=self.round_mode == "filtered")

    def _pick(self, logits: Tensor) -> Tensor:
        """Return one token per slot from ``logits`` ``[S, V]`` under each slot's sampling settings."""
        if self.round_mode == "greedy":
            return logits.argmax(-1)
        return draw(self._distributions(logits), self.generator)

    def _decode_phase(self) -> None:
        """Autoregressive round: one target step per slot."""
        ctx = self._context()
        logits = self.target(self.last.view(-1, 1), ctx)[:, -1, : self.vocab]
        nxt = self._pick(logits)
        self._advance(nxt.view(-1, 1), self.active.long(), self.last, nxt)

    def _draft_phase(self) -> None:
        """Propose ``gamma`` tokens per slot (and their distributions when sampling); record the mapped queries."""
        assert self.draft is not None
        ctx = self._context()
        scored_round = self.scored_draft is not None and self.round_budget > 0
        sparse_draft = self.scored_draft if scored_round else self.later_draft_attention
        if self.policy is not None and not self.round_budget:
            # A dense round (below the break-even context): reading fewer draft rows saves less than the target's
            # sparse rows would have and costs acceptance (docs/results.md), so the draft reads every row too.
            sparse_draft = dense_attention
        # "-all": the first step reads the sparse rows too; scored ones exist in sparse rounds only (a dense round of
        # "scored-all", below the break-even, keeps its first step dense rather than fall back to the latest rows).
        selection = self.config.draft_selection
        first_sparse = selection == "recent-all" or (selection == "scored-all" and scored_round)
        self.recorder.inner = sparse_draft if first_sparse else dense_attention
        early = self.early_scoring and self.round_budget > 0 and self._forced is None
        self._arm_early(early and self.gamma == 1, ctx)
        tokens = torch.stack([self.prev, self.last], dim=1)
        hidden = self.draft.hidden(tokens, (ctx - 1).clamp_min(0), self.recorder)[:, -1]
        logits = self.draft.lm_head(hidden).float()[:, : self.vocab]  # the LM head for the last position only
        drafted, dists = [], []
        for i in range(self.gamma):
            if i:
                self.recorder.inner = sparse_draft
                self._arm_early(early and i == self.gamma - 1, ctx)
                logits = self.draft(drafted[-1].view(-1, 1), ctx + i, self.recorder)[:, -1, : self.vocab]
            if self._forced is not None:  # teacher forcing: the draft reads the known text
                drafted.append(self._forced[:, i])
            elif self.round_mode == "greedy":
                drafted.append(logits.argmax(-1))
            else:
                dists.append(self._distributions(logits))
                drafted.append(draw(dists[-1], self.generator))
        self._join_early()
        self._hold["drafted"] = torch.stack(drafted, dim=1)
        if dists:
            self._hold["draft_probs"] = torch.stack(dists, dim=1)
        if self.policy is not None and self.round_budget and not early:
            self._hold["queries"] = self.recorder.take()  # type: ignore[assignment]
        elif self.policy is not None:  # scored already, or a dense round: no copies of the queries in its graph
            self.recorder.clear()

    def _arm_early(self, last_step: bool, start_pos: Tensor) -> None:
        """Score the context during the coming draft forward when it is the round's last (:meth:`_score_early`)."""
        def score(layer: int, queries: Tensor, k_cache: Tensor) -> None:
            cache = self.draft.layers[layer].self_attn.cache  # type: ignore[union-attr]
            self._score_early(layer, queries, cache.scoring_keys() if cache is not None else k_cache, start_pos)

        self.recorder.on_complete = score if last_step else None

    def _score_early(self, layer: int, queries: Tensor, k_cache: Tensor, start_pos: Tensor) -> None:
        """Score the context rows ``< start_pos`` for draft layer ``layer`` (its ``queries`` ``[B, Hq, gamma, D]`` of
        the round, its keys ``k_cache``) while the draft's last step goes on. On CUDA the score pass runs on a second
        stream that joins the draft's at the end of the draft phase (:meth:`_join_early`), reading the draft's K of the
        whole context (at 128K, batch 1, about 58 us a layer) beside the draft's later layers: both are near their
        bandwidth, so this hides 0.1-0.4 ms a round on the H200 (docs/benchmarks.md). The select phase then ranks the
        rows (:attr:`RoundContext.early_scores`)."""
        assert isinstance(self.policy, STSPolicy)
        if self._side is None:
            self._early[layer] = self.policy.score_sources(layer, queries, k_cache, start_pos)
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            self._early[layer] = self.policy.score_sources(layer, queries, k_cache, start_pos)
        self._early_inputs += [queries, start_pos]  # not freed (nor reused) before the side stream is done with them

    def _join_early(self) -> None:
        """End the draft phase's early scoring: stop scoring, and make the draft's stream wait for the side stream."""
        self.recorder.on_complete = None
        if self._side is not None and self._early_inputs:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._early_inputs.clear()

    def _select_phase(self) -> None:
        """Let the policy score the context for this round's budget."""
        assert self.policy is not None
        queries = self._hold.pop("queries", {})
        draft_rows = self.scored_draft.width if self.scored_draft is not None else 0
        ctx = RoundContext(self._context(), self.target, self.round_budget, self.draft, queries,  # type: ignore[arg-type]
                           slot_budgets=self.slot_budgets, draft_rows=draft_rows, early_scores=self._early)
        self._early = {}
        self.policy.prepare(ctx)
        if self.scored_draft is not None:  # the draft's own rows for the next round, from the same scores
            assert isinstance(self.policy, STSPolicy)
            self.scored_draft.keep(self.scored_layers, *self.policy.draft_layer_ranking(ctx.start_pos, draft_rows))

    def _verify_phase(self) -> None:
        """Verify the drafts with the target (over the selected rows; budget 0: every row) and accept on the device."""
        ctx = self._context()
        drafted = self._hold["drafted"]
        attention = self.verify_attention if self.round_budget else dense_attention
        logits = self.target(torch.cat([self.last.view(-1, 1), drafted], dim=1), ctx, attention)
        logits = logits[..., : self.vocab]
        if self.round_mode == "greedy":
            choice = logits.argmax(-1)
            n = (choice[:, :-1] == drafted).long().cumprod(dim=1).sum(dim=1)
            nxt = choice.gather(1, n.view(-1, 1)).view(-1)
        else:
            n, nxt = accept(drafted, self._hold["draft_probs"], self._distributions(logits), self.generator)
        tokens = torch.cat([drafted, nxt.view(-1, 1)], dim=1).scatter(1, n.view(-1, 1), nxt.view(-1, 1))
        prev = torch.where(n > 0, drafted.gather(1, (n - 1).clamp_min(0).view(-1, 1)).view(-1), self.last)
        self._advance(tokens, (n + 1) * self.active.long(), prev, nxt)
        if isinstance(attention, SelectiveAttention):
            self.round_sparsity.copy_(attention.round_sparsity())
        else:
            self.round_sparsity.zero_()  # a dense round reads every row

    def _advance(self, tokens: Tensor, count: Tensor, prev: Tensor, nxt: Tensor) -> None:
        """Write the round's results into the static buffers and move every decoding slot forward."""
        self.out_tokens.copy_(tokens)
        self.out_count.copy_(count)
        self.ctx.add_(count)
        self.prev.copy_(torch.where(self.active, prev, self.prev))
        self.last.copy_(torch.where(self.active, nxt, self.last))

    def _fetch(self) -> tuple[list[list[int]], list[int], float | None]:
        """Return (tokens, counts, sparsity) of the round: the round's one host synchronisation."""
        measured = isinstance(self.verify_attention, SelectiveAttention)
        if self.device.type != "cuda":
            sparsity = float(self.round_sparsity) if measured else None
            return self.out_tokens.tolist(), self.out_count.tolist(), sparsity
        self._host_tokens.copy_(self.out_tokens, non_blocking=True)
        self._host_count.copy_(self.out_count, non_blocking=True)
        self._host_sparsity.copy_(self.round_sparsity, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return self._host_tokens.tolist(), self._host_count.tolist(), float(self._host_sparsity) if measured else None

    def _account(self, clock: _PhaseClock, counts: list[int], sparsity: float | None, dense: bool) -> None:
        """Add the round to the stats: acceptance per decoding slot, phase times, sparsity (0 for a policy's dense
        round: it reads every row), recall, and whether a policy's round verified densely."""
        stats = self.stats
        stats.target_forwards += 1
        stats.accepted_per_round += [c for c, a in zip(counts, self.host_active) if a]
        if self.draft is None:
            stats.verify_s += clock.seconds(0)
            return
        stats.draft_s += clock.seconds(0)
        if not dense:
            stats.select_s += clock.seconds(1)
        stats.verify_s += clock.seconds(1 if dense else 2)
        if self.policy is not None and dense:
            stats.dense_rounds += 1
        self._record_selection(self.verify_attention, sparsity)

    def _record_selection(self, attention: AttentionFn, sparsity: float | None) -> None:
        """Add a verify step's sparsity, or with ``measure_recall`` its sparsity and recall, to the stats (dense: nothing)."""
        if not isinstance(attention, SelectiveAttention):
            return
        if self.config.measure_recall:
            attention.end_step(self.stats)
        elif sparsity is not None:
            self.stats.sparsity.append(sparsity)

    # ------------------------------------------------------------------ CUDA graphs

    def _capture(self, budget: int, mode: str, phases: list[Callable[[], None]]) -> list[torch.cuda.CUDAGraph]:
        """Return the round's phases captured in CUDA graphs for ``budget`` rows and sampling ``mode`` (after warm-up
        runs that compile).

        Warm-up runs decode for real, so the slot state is saved before and restored after them.
        """
        began = time.perf_counter()
        live_state = [self.ctx, self.last, self.prev, self.out_tokens, self.out_count]
        if self.scored_draft is not None:  # the warm-up's select phases write the next round's draft rows
            live_state.append(self.scored_draft.rows)
        state = [t.clone() for t in live_state]
        self.round_budget, self.round_mode = budget, mode
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                for phase in phases:
                    phase()
                for saved, live in zip(state, live_state):
                    live.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        # Tensor parallelism (sts.parallel): the target's forwards hold NCCL all-reduces, capturable since
        # NCCL 2.9.6 once their communicator exists, which the warm-up made. Its collectives are finished
        # here, and the capture is thread-local: the process group's watchdog thread, polling them from
        # another thread, must not invalidate it (a global capture forbids other threads' CUDA calls).
        torch.cuda.synchronize(self.device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        capture_mode = "thread_local" if distributed else "global"
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for phase in phases:
            graph = torch.cuda.CUDAGraph()
            if mode != "greedy":
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_mode):
                phase()
            graphs.append(graph)
        self._graphs[budget, mode] = graphs
        torch.cuda.synchronize(self.device)
        self.stats.compile_s += time.perf_counter() - began
        return graphs


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    on_tokens: StreamCallback | None = None,
    seed: int = 0,
    prefix_cache: PrefixCache | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Return plain autoregressive continuations of a batch of prompts (one target forward per token).

    ``prompts``: lists of token ids; ``max_new_tokens`` per sequence; a sequence stops after an id
    in ``eos_ids``. Raises :class:`STSError` when a prompt does not fit the model's context.
    """
    capacity = context_capacity((model.config,), prompts, max_new_tokens, lookahead=1)
    config = EngineConfig(sampling=sampling, seed=seed, prefill_chunk=prefill_chunk)
    engine = Engine(model, slots=len(prompts), max_len=capacity, config=config, prefix_cache=prefix_cache)
    return engine.generate(prompts, max_new_tokens, eos_ids, on_tokens)
