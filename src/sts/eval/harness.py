"""``sts eval``: every method x budget x task x context length on one pair, resumable, with a report.

Every finished (sample, method, budget) is appended to ``results.jsonl`` at once, so an
interrupted run continues where it stopped; a run resumes only with the settings the records
already there were made with (:mod:`sts.eval.results`), and a run that fails before its first
record leaves no output folder behind. Dense greedy decoding is the reference for token
agreement and accuracy differences, and teacher-forced dense verification the reference for
perplexity.

**One engine per (method, budget), one prefill per sample.** Samples run outermost, methods and
budgets inside. Each (method, budget) gets one :class:`~sts.engine.Engine` on first use
(:func:`sts.runner.build_engine`: one slot, rows for the grid's longest prompt), which then
decodes every sample, so on CUDA its graphs are captured once per budget size, not once per
run. The engines need not take turns in memory: a model holds one KV cache, which
:meth:`~sts.models.transformer.Transformer.setup_cache` reallocates only for more slots or rows,
so all engines (and the teacher-forced perplexity runs, which need fewer rows) share the same
cache tensors, and only one of them decodes at a time. A sample's first run stores its prompt's
rows and logits in the evaluator's :class:`~sts.decoding.PrefixCache`; every other run of the
sample restores them (a copy, not a forward). The prefix cache holds one sample at a time, so the
grid needs the caches of one longest prompt plus one stored prefill (about 1.3 GB at 32K tokens
for the demo pair in bf16), whatever the number of methods. Should a cache ever be reallocated,
the engines built over the old one are rebuilt (their graphs point at freed memory).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import numpy as np
from tqdm import tqdm

from sts.decoding import PrefixCache, context_capacity
from sts.engine import Engine
from sts.selection.draft import DraftSelection, SparseDraftAttention
from sts.errors import STSError
from sts.eval.output import run_output_dir
from sts.eval.report import write_report
from sts.eval.results import (RESULTS_FILE, Record, ResultSettings, ResultsLog, file_digest, model_dtype,
                              model_identity, resume)
from sts.eval.scoring import score
from sts.eval.tasks import ANSWER_TOKENS, TASKS, Sample, make_prompt, needle_grid, token_counter
from sts.eval.teacher import TeacherForced, teacher_forced
from sts.prefill import PrefillConfig
from sts.runner import DENSE_METHODS, LoadedModel, build_engine, eos_ids
from sts.selection import REGISTRY, HeadMapping, SelectionConfig, check_options, make_policy, split_options

#: Every method ``sts eval`` knows, in report order; ``sts-cal`` (calibrated STS) needs a mapping file.
DEFAULT_METHODS = ("autoregressive", "speculative", "sts", "sts-cal", "streaming", "quest", "tidal", "specpc", "oracle")


def default_methods(mapping: str | None) -> tuple[str, ...]:
    """Return the methods evaluated when none are named: all of them, ``sts-cal`` only given a mapping."""
    return DEFAULT_METHODS if mapping is not None else tuple(m for m in DEFAULT_METHODS if m != "sts-cal")


@dataclass(frozen=True)
class MethodSpec:
    """A named evaluation method: a decoding method, plus a mapping file for calibrated STS."""

    name: str
    method: str
    mapping: str | None = None
    #: Sparse target prefill too (names ending in ``+sp``); perplexity samples keep a dense prefill.
    sparse_prefill: bool = False
    #: Policy options from the name, e.g. ``sts-cal/rerank=4/feedback=0.25``.
    options: tuple[tuple[str, float], ...] = ()
    #: Rows the draft's steps after a round's first read (``/draft_budget=256``); None: a dense draft.
    draft_budget: int | None = None
    #: Which rows (``/scored_draft=1``: by STS's draft scores; ``/draft_all_steps=1``: the round's first draft step
    #: too): :mod:`sts.selection.draft`.
    draft_selection: DraftSelection = "recent"
    #: Draft tokens per round (``/gamma=6``); None: the grid's ``--gamma``.
    gamma: int | None = None
    #: The method's own selection settings over the grid's (``/window=256``, ``/dense_layers=2``, ``/sink=8``).
    selection_settings: tuple[tuple[str, int], ...] = ()

    def engine_draft_selection(self) -> DraftSelection | None:
        """Return the draft selection to build the method's engine with: None for autoregressive decoding (no draft)."""
        return self.draft_selection if self.method != "autoregressive" else None

    def policy_options(self) -> dict[str, float]:
        """Return the options as keyword arguments for the policy."""
        return dict(self.options)

    @property
    def sparse(self) -> bool:
        """Return whether the method verifies with a budget."""
        return self.method not in DENSE_METHODS


REFERENCE = MethodSpec("autoregressive", "autoregressive")


def parse_methods(names: Sequence[str], mapping: str | None) -> list[MethodSpec]:
    """Return method specs for names like ``sts``, ``sts-cal`` (STS with ``--mapping``), ``sts+sp``
    (sparse prefill), ``sts-cal/rerank=4`` (policy options) or ``sts/draft_budget=256`` (a sparse draft:
    its steps after a round's first read 256 rows; any speculative method; ``/scored_draft=1`` picks them by
    STS's draft scores, ``/draft_all_steps=1`` makes the first step read them too, :mod:`sts.selection.draft`;
    ``/gamma=6`` drafts 6 tokens per round instead of the grid's gamma; ``/window=256``, ``/sink=8`` and
    ``/dense_layers=2`` replace the grid's selection settings for the method, as ``--window``, ``--sink`` and
    ``--dense-layers`` do in ``sts generate``)."""
    specs = []
    for name in names:
        head, sparse_prefill = (name[:-3], True) if name.endswith("+sp") else (name, False)
        base, options = split_options(head)
        draft_budget = _draft_budget(name, dict(options).get("draft_budget"))
        scored, all_steps = (dict(options).get(key, 0) for key in ("scored_draft", "draft_all_steps"))
        if scored not in (0, 1) or (scored and (draft_budget is None or base not in ("sts", "sts-cal"))):
            raise STSError(f"method {name!r}: /scored_draft=1 applies to sts with a /draft_budget")
        if all_steps not in (0, 1) or (all_steps and draft_budget is None):
            raise STSError(f"method {name!r}: /draft_all_steps=1 applies to a /draft_budget")
        selection = cast(DraftSelection, ("scored" if scored else "recent") + ("-all" if all_steps else ""))
        gamma = _gamma(name, dict(options).get("gamma"))
        rows = tuple((k, _whole(name, k, v, "a whole number >= 0", minimum=0))
                     for k, v in options if k in SELECTION_KEYS)
        options = tuple((k, v) for k, v in options
                        if k not in ("draft_budget", "scored_draft", "draft_all_steps", "gamma", *SELECTION_KEYS))
        if base == "sts-cal":
            if mapping is None:
                raise STSError("method sts-cal needs --mapping (a file from `sts calibrate`)")
            spec = MethodSpec(name, "sts", mapping, sparse_prefill, options, draft_budget, selection, gamma, rows)
        elif base in DENSE_METHODS or base in REGISTRY:
            spec = MethodSpec(name, base, None, sparse_prefill, options, draft_budget, selection, gamma, rows)
        else:
            raise STSError(f"unknown method {name!r} (choose from {', '.join(DEFAULT_METHODS)}, each optionally +sp)")
        if sparse_prefill and not spec.sparse:
            raise STSError(f"{name}: sparse prefill (+sp) applies to sparse methods only")
        if (options or rows) and not spec.sparse:
            raise STSError(f"{name}: options apply to selection methods only")
        if (draft_budget is not None or gamma is not None) and spec.method == "autoregressive":
            raise STSError(f"{name}: /draft_budget and /gamma apply to methods with a draft")
        if options:
            try:
                check_options(spec.method, dict(options))
            except STSError as exc:
                raise STSError(f"method {name!r}: {exc}") from None
        specs.append(spec)
    if not specs:
        raise STSError("name at least one method")
    return specs


#: Selection settings a method name may set for itself (``/window=256``): :class:`~sts.selection.SelectionConfig`'s.
SELECTION_KEYS = ("sink", "window", "dense_layers")


def _draft_budget(name: str, value: float | None) -> int | None:
    """Return a method name's ``/draft_budget`` as rows, refusing fractions and budgets without room past the sinks."""
    rows = _whole(name, "draft_budget", value, "a whole number of rows")
    if rows is not None:
        SparseDraftAttention(rows)  # refuses a budget that leaves no row past the sinks
    return rows


def _gamma(name: str, value: float | None) -> int | None:
    """Return a method name's ``/gamma`` (draft tokens per round), refusing fractions and values below 1."""
    return _whole(name, "gamma", value, "a whole number >= 1", minimum=1)


def _whole(name: str, key: str, value: float | None, expected: str, minimum: float = float("-inf")) -> int | None:
    """Return option ``key`` of method ``name`` as an int (None: unset); raise STSError saying it must be
    ``expected`` for a fraction or a value below ``minimum``."""
    if value is None:
        return None
    if value != int(value) or value < minimum:
        raise STSError(f"method {name!r}: {key} must be {expected}, got {value:g}")
    return int(value)


@dataclass(frozen=True)
class GridSettings:
    """Methods x budgets, and the selection settings they share: what ``sts eval`` and ``sts recall`` compare."""

    #: Method names (see :func:`parse_methods`); None: :func:`default_methods`.
    methods: tuple[str, ...] | None = None
    #: Token counts, or fractions of the context below 1.
    budgets: tuple[float, ...] = (64, 128, 256, 512)
    gamma: int = 4
    sink: int = 4
    #: Last rows always kept; small, so that sink + window fit the smallest default budget.
    window: int = 16
    #: Calibrated mapping file, for method ``sts-cal``.
    mapping: str | None = None

    def method_specs(self) -> list[MethodSpec]:
        """Return the methods to run, after refusing impossible settings (call it before loading models)."""
        specs = parse_methods(self.methods if self.methods is not None else default_methods(self.mapping), self.mapping)
        if self.mapping is not None and any(s.mapping for s in specs):
            HeadMapping.load(self.mapping)  # a missing or broken file fails now, not after the first runs
        if self.gamma < 1:
            raise STSError(f"gamma must be >= 1, got {self.gamma}")
        if any(s.sparse for s in specs) and not self.budgets:
            raise STSError("name at least one budget")
        for budget in self.budgets:
            for spec in specs:
                self.selection(budget, spec)
        return specs

    def selection(self, budget: float, spec: MethodSpec | None = None) -> SelectionConfig:
        """Return the selection settings of a budget: the grid's, with ``spec``'s own ones over them.

        Raises:
            STSError: settings :class:`~sts.selection.SelectionConfig` refuses (no room past sink + window).
        """
        own = dict(spec.selection_settings) if spec is not None else {}
        return SelectionConfig(budget=budget, **({"sink": self.sink, "window": self.window} | own))


@dataclass(frozen=True)
class EvalSettings(GridSettings):
    """What ``sts eval`` runs: tasks x context lengths x methods x budgets, and how each run decodes."""

    tasks: tuple[str, ...] = tuple(TASKS)
    #: Context lengths in tokens.
    lengths: tuple[int, ...] = (2048,)
    #: Needle depths (needle task only).
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    #: Samples per task and length.
    limit: int = 1
    #: New tokens per answer; None: each task's own (:data:`~sts.eval.tasks.ANSWER_TOKENS`).
    max_new_tokens: int | None = None
    #: Teacher-forced tokens scored per perplexity sample.
    ppl_tokens: int = 64
    #: Rows per KV head, and rows per block, of the ``+sp`` methods' sparse prefill.
    prefill_budget: int = 1024
    prefill_block: int = 64
    #: Measure recall (it computes dense attention).
    measure_recall: bool = True
    seed: int = 0

    def method_specs(self) -> list[MethodSpec]:
        """Return the methods to run, after refusing impossible settings (call it before loading models)."""
        specs = super().method_specs()
        check_tasks(self.tasks)
        if not self.lengths:
            raise STSError("name at least one context length")
        if min(self.lengths) < 1:
            raise STSError(f"--lengths must be >= 1 tokens, got {min(self.lengths)}")
        for name, value in (("--limit", self.limit), ("--max-new-tokens", self.max_new_tokens),
                            ("--ppl-tokens", self.ppl_tokens)):
            if value is not None and value < 1:
                raise STSError(f"{name} must be >= 1, got {value}")
        if any(s.sparse_prefill for s in specs):
            PrefillConfig(self.prefill_budget, self.prefill_block)
        return specs

    def answer_tokens(self, task: str) -> int:
        """Return the new tokens a sample of ``task`` is generated with: ``max_new_tokens``, else the task's own."""
        return self.max_new_tokens if self.max_new_tokens is not None else ANSWER_TOKENS[task]


def check_tasks(tasks: Sequence[str]) -> None:
    """Refuse an empty or unknown task list (STSError)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        what = f"unknown task {unknown[0]!r}" if unknown else "no task named"
        raise STSError(f"{what} (choose from {', '.join(TASKS)})")


def build_samples(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], limit: int,
                  tokenizer: Any, seed: int) -> list[Sample]:
    """Return the evaluation samples: for the needle task the length x depth grid, else ``limit`` per length."""
    check_tasks(tasks)
    count = token_counter(tokenizer)
    samples: list[Sample] = []
    for task in tasks:
        if task == "needle":
            samples += needle_grid(lengths, depths, count, seed, n_samples=limit)
            continue
        for length in lengths:
            samples += TASKS[task](limit, length, count, seed)
    return samples


#: The progress bar: runs done, elapsed < remaining, and always runs per second (never seconds per run).
_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def _budgets(spec: MethodSpec, budgets: Sequence[float]) -> list[float | None]:
    return list(budgets) if spec.sparse else [None]


def _key(sample: Sample, spec: MethodSpec, budget: float | None) -> str:
    return f"{sample.sample_id}|{spec.name}|{budget}"


def _append(log: ResultsLog, done: dict[str, Record], record: Record) -> None:
    """Store a finished record durably (an interrupted run keeps it) and remember it."""
    log.append(record)
    done[record["key"]] = record


def _caches(engine: Engine) -> tuple:
    """Return the KV cache modules of the engine's models as they are now (compared by identity)."""
    return tuple(m.layers[0].self_attn.cache for m in (engine.target, engine.draft) if m is not None)


def _agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Return the share of the reference's positions where ``tokens`` holds the same token."""
    if not reference:
        return 1.0
    return sum(1 for a, b in zip(tokens, reference) if a == b) / len(reference)


class Evaluator:
    """Runs the grid for one pair and appends records as they finish (see the module docstring for the engines)."""

    def __init__(self, settings: EvalSettings, target: LoadedModel, draft: LoadedModel, out: Path) -> None:
        self.settings = settings
        self.target, self.draft = target, draft
        self.tokenizer = target.tokenizer
        self.eos = eos_ids(target)
        self.out = out
        self.results = self.out / RESULTS_FILE
        #: Per perplexity sample: its dense teacher-forced run, the reference of every method.
        self.dense_runs: dict[str, TeacherForced] = {}
        #: The current sample's prefill, restored by every run of it.
        self.prefix_cache = PrefixCache()
        #: (method name, budget) -> the engine, and the cache tensors its graphs were captured over.
        self.engines: dict[tuple[str, float | None], tuple[Engine, tuple]] = {}
        #: Cache rows of every engine: the grid's longest prompt, new tokens and a round's scratch rows.
        self.max_len = 0

    def gamma(self, spec: MethodSpec) -> int:
        """Return the draft tokens per round of a method: its ``/gamma``, else the grid's."""
        return spec.gamma if spec.gamma is not None else self.settings.gamma

    def runs(self, samples: Sequence[Sample], specs: Sequence[MethodSpec]) -> Iterator[tuple[Sample, MethodSpec, float | None]]:
        """Yield every (sample, method, budget) of the grid, samples outermost (one prefill each)."""
        for sample in samples:
            for spec in specs:
                for budget in _budgets(spec, self.settings.budgets):
                    yield sample, spec, budget

    def result_settings(self, samples: Sequence[Sample], specs: Sequence[MethodSpec]) -> ResultSettings:
        """Return the settings the grid's records depend on beyond their key (sample, method, budget), by name.

        These are the models (:func:`~sts.eval.results.model_identity`) and their dtype, and the settings
        the grid's methods and tasks use: the grid's gamma (methods with a draft and no ``/gamma`` of their own,
        and the perplexity task's dense reference), sink, window and recall measurement (sparse methods),
        the sparse prefill's sizes (``+sp`` methods), the mapping file's contents (``sts-cal``), each
        generation task's answer length and the perplexity task's scored tokens. Not the seed, which every
        sample id holds, nor the device.
        """
        a, tasks = self.settings, {sample.task for sample in samples}
        settings: ResultSettings = {"target": model_identity(self.target.model),
                                    "draft": model_identity(self.draft.model), "dtype": model_dtype(self.target.model)}
        if "perplexity" in tasks or any(s.method != "autoregressive" and s.gamma is None for s in specs):
            settings["gamma"] = a.gamma
        if any(s.sparse for s in specs):
            settings.update(sink=a.sink, window=a.window, measure_recall=a.measure_recall)
        if any(s.sparse_prefill for s in specs):
            settings.update(prefill_budget=a.prefill_budget, prefill_block=a.prefill_block)
        if a.mapping is not None and any(s.mapping for s in specs):
            settings["mapping"] = file_digest(a.mapping)
        if "perplexity" in tasks:
            settings["ppl_tokens"] = a.ppl_tokens
        settings.update({f"max_new_tokens.{task}": a.answer_tokens(task) for task in sorted(tasks - {"perplexity"})})
        return settings

    def run(self, samples: Sequence[Sample], specs: Sequence[MethodSpec]) -> None:
        """Run the grid, skipping what ``results.jsonl`` already holds.

        Raises :class:`STSError`, before any work, for an output folder that cannot be made or whose records
        were made with other settings (:func:`~sts.eval.results.resume`); and, removing the output folder again
        when it made it and wrote nothing there, for a run that fails (a prompt past the context, say).
        """
        with run_output_dir(self.out):
            self._run(samples, specs)

    def _run(self, samples: Sequence[Sample], specs: Sequence[MethodSpec]) -> None:
        done, log = resume(self.out, self.result_settings(samples, specs))
        todo = [r for r in self.runs(samples, specs) if _key(*r) not in done]
        prompts = self.prompt_ids(list({r[0].sample_id: r[0] for r in todo}.values()))
        if prompts:
            longest = max(prompts.values(), key=len).tolist()
            lookahead = max(self.gamma(spec) for spec in specs) + 1
            answer = max(self.settings.answer_tokens(r[0].task) for r in todo)
            configs = (self.target.model.config, self.draft.model.config)
            self.max_len = context_capacity(configs, [longest], answer, lookahead)
        current: str | None = None
        # Token agreement needs dense greedy output first, whatever the method order: the reference runs of samples
        # whose grid leaves autoregressive decoding out come on top of the grid's runs, and the bar counts them.
        keys = {_key(*r) for r in todo}
        extra = {_key(r[0], REFERENCE, None) for r in todo if r[0].metric != "perplexity"} - keys - done.keys()
        # The bar is closed (its line ended) even when a run fails, so an error prints on a line of its own.
        with log, tqdm(total=len(todo) + len(extra), desc="eval", unit="run", file=sys.stderr, bar_format=_BAR) as bar:
            for sample, spec, budget in todo:
                if sample.sample_id != current:  # one prefill per sample, shared by its runs
                    self.prefix_cache.entries.clear()  # the last sample's rows: device memory
                    current, prompt = sample.sample_id, prompts[sample.sample_id].tolist()
                reference = _key(sample, REFERENCE, None)
                if sample.metric != "perplexity" and reference not in done:
                    bar.set_postfix_str(f"{sample.task}@{sample.context_tokens} {REFERENCE.name} (reference)")
                    _append(log, done, self.evaluate(sample, REFERENCE, None, prompt, done))
                    bar.update(int(reference in extra))
                if _key(sample, spec, budget) not in done:
                    bar.set_postfix_str(f"{sample.task}@{sample.context_tokens} {spec.name} {budget}")
                    _append(log, done, self.evaluate(sample, spec, budget, prompt, done))
                bar.update()

    def prompt_ids(self, samples: Sequence[Sample]) -> dict[str, np.ndarray]:
        """Return each sample's prompt token ids by sample id (tokenized once per sample, kept compact)."""
        # Like the eval bar, this one ends its line when closed, so an error after it prints on a line of its own.
        with tqdm(samples, desc="tokenize", unit="sample", file=sys.stderr, disable=not samples) as bar:
            return {
                s.sample_id: np.asarray(self.tokenizer(make_prompt(s, self.tokenizer), add_special_tokens=False)["input_ids"],
                                        dtype=np.int64)
                for s in bar
            }

    def engine(self, spec: MethodSpec, budget: float | None) -> Engine:
        """Return the engine of (method, budget), built on first use and reused for every sample."""
        entry = self.engines.get((spec.name, budget))
        if entry is None or entry[1] != _caches(entry[0]):
            a = self.settings
            engine = build_engine(
                spec.method, self.target, self.draft, slots=1, max_len=self.max_len, gamma=self.gamma(spec),
                selection=a.selection(budget, spec) if budget is not None else None, mapping=spec.mapping,
                options=spec.policy_options(), draft_budget=spec.draft_budget,
                draft_selection=spec.engine_draft_selection(),
                prefill=PrefillConfig(a.prefill_budget, a.prefill_block) if spec.sparse_prefill else None,
                measure_recall=spec.sparse and a.measure_recall, prefix_cache=self.prefix_cache, seed=a.seed,
                verify="sparse",  # the grid measures sparse verification at every length, the short ones included
            )
            entry = self.engines[spec.name, budget] = (engine, _caches(engine))
        return entry[0]

    def evaluate(self, sample: Sample, spec: MethodSpec, budget: float | None, prompt: list[int], done: dict[str, Record]) -> dict:
        """Return the record of one (sample, method, budget) run on the sample's prompt token ids."""
        record: dict[str, Any] = {
            "key": _key(sample, spec, budget), "task": sample.task, "sample_id": sample.sample_id,
            "context_tokens": sample.context_tokens, "prompt_tokens": len(prompt), "depth": sample.depth,
            "method": spec.name, "budget": budget,
        }
        started = time.perf_counter()
        if sample.metric == "perplexity":
            record.update(self._perplexity(sample, prompt, spec, budget))
        else:
            record.update(self._generate(sample, prompt, spec, budget, done))
        record["time_s"] = round(time.perf_counter() - started, 3)
        return record

    def _generate(self, sample: Sample, prompt: list[int], spec: MethodSpec, budget: float | None,
                  done: dict[str, Record]) -> dict[str, Any]:
        limit = self.settings.answer_tokens(sample.task)
        result = self.engine(spec, budget).generate([prompt], limit, self.eos)
        tokens = result.tokens[0]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        summary = result.stats.summary()
        reference = tokens if spec == REFERENCE else done[_key(sample, REFERENCE, None)]["tokens"]
        return {
            "score": score(sample, text), "prediction": text, "answers": list(sample.answers), "tokens": tokens,
            # stopped by the new-token limit, not by the model: an answer cut short scores as a wrong one
            "cut": len(tokens) >= limit and tokens[-1] not in self.eos,
            "agreement": _agreement(tokens, reference), "nll": None, "nll_dense": None,
            "acceptance_length": summary["acceptance_length"], "sparsity": summary["sparsity"],
            "recall": summary["recall"], "recall_context": summary["recall_context"],
            "recall_per_layer": result.stats.recall_per_layer(), "set_recall": summary["set_recall"],
            "tokens_per_s": summary["tokens_per_s"],
        }

    def _perplexity(self, sample: Sample, prompt: list[int], spec: MethodSpec, budget: float | None) -> dict[str, Any]:
        a = self.settings
        context = max(1, len(prompt) - a.ppl_tokens)
        cache = self.prefix_cache
        if sample.sample_id not in self.dense_runs:
            self.dense_runs[sample.sample_id] = teacher_forced(
                self.target.model, self.draft.model, prompt, context, a.gamma, None, prefix_cache=cache)
        dense = self.dense_runs[sample.sample_id]
        run = dense  # a dense verification reads the draft's tokens only, which teacher forcing fixes
        if spec.sparse:
            policy = make_policy(spec.method, a.selection(budget, spec), self.target.model, self.draft.model,
                                 spec.mapping, **spec.policy_options())
            run = teacher_forced(self.target.model, self.draft.model, prompt, context, self.gamma(spec), policy,
                                 measure_recall=a.measure_recall, prefix_cache=cache, draft_budget=spec.draft_budget,
                                 draft_selection=spec.draft_selection)
        summary = run.stats.summary()
        return {
            "score": None, "prediction": "", "tokens": [], "agreement": None,
            "nll": run.nll, "nll_dense": dense.nll, "acceptance_length": None,
            "sparsity": summary["sparsity"], "recall": summary["recall"], "recall_context": summary["recall_context"],
            "recall_per_layer": run.stats.recall_per_layer(), "set_recall": summary["set_recall"], "tokens_per_s": None,
        }


def run_eval(target: LoadedModel, draft: LoadedModel, out: str | Path, settings: EvalSettings = EvalSettings(),
             header: str = "") -> Path:
    """Return the path of the report after running the grid of ``settings`` into the folder ``out``.

    Runs already in ``out/results.jsonl`` are kept and skipped; ``header`` (the command and the
    machine, say) opens the report. Raises :class:`STSError` for impossible settings, for a resume whose
    settings differ from those of the records in ``out`` (:func:`~sts.eval.results.resume`: so the report
    under ``header`` holds only records made with its settings), and for a failed run, which leaves no
    ``out`` behind when it wrote nothing (:meth:`Evaluator.run`).
    """
    specs = settings.method_specs()
    if target.tokenizer is None:
        raise STSError("sts eval needs a target with a tokenizer")
    for model in (target.model, draft.model):  # before minutes of building and tokenizing the samples
        context = model.config.max_position_embeddings
        if max(settings.lengths) >= context:
            raise STSError(f"--lengths {max(settings.lengths)}: not below the context of {model.config.name} "
                           f"({context} tokens), which must also hold the answer")
    samples = build_samples(settings.tasks, settings.lengths, settings.depths, settings.limit, target.tokenizer,
                            settings.seed)
    out = Path(out)
    Evaluator(settings, target, draft, out).run(samples, specs)
    return write_report(out / RESULTS_FILE, out, header=header)
