"""``sts eval``: every method x budget x task x context length on one pair, resumable, with a report.

Each sample is prefilled once (a :class:`~sts.decoding.PrefixCache` shared by every method and
budget); every finished (sample, method, budget) is appended to ``results.jsonl`` at once, so
an interrupted run continues where it stopped. Dense greedy decoding is the reference for
token agreement, and teacher-forced dense verification the reference for perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from sts.cli import add_model_args, csv_list
from sts.decoding import PrefixCache
from sts.errors import STSError
from sts.eval.report import write_report
from sts.eval.scoring import score
from sts.eval.tasks import TASKS, Sample, make_prompt, needle_grid, token_counter
from sts.eval.teacher import teacher_forced
from sts.prefill import PrefillConfig
from sts.runner import DENSE_METHODS, LoadedModel, load_pair, run_method
from sts.selection import REGISTRY, SelectionConfig, make_policy

DEFAULT_METHODS = ("autoregressive", "speculative", "sts", "sts-cal", "streaming", "quest", "tidal", "specpc", "oracle")


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
    (sparse prefill) or ``sts-cal/rerank=4`` (policy options)."""
    specs = []
    for name in names:
        head, sparse_prefill = (name[:-3], True) if name.endswith("+sp") else (name, False)
        base, *pairs = head.split("/")
        try:
            options = tuple((k, float(v)) for k, v in (p.split("=") for p in pairs))
        except ValueError:
            raise STSError(f"method {name!r}: options must look like /key=number") from None
        if base == "sts-cal":
            if mapping is None:
                raise STSError("method sts-cal needs --mapping (a file from `sts calibrate`)")
            spec = MethodSpec(name, "sts", mapping, sparse_prefill, options)
        elif base in DENSE_METHODS or base in REGISTRY:
            spec = MethodSpec(name, base, None, sparse_prefill, options)
        else:
            raise STSError(f"unknown method {name!r} (choose from {', '.join(DEFAULT_METHODS)}, each optionally +sp)")
        if sparse_prefill and not spec.sparse:
            raise STSError(f"{name}: sparse prefill (+sp) applies to sparse methods only")
        specs.append(spec)
    return specs


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Add ``sts eval``'s options."""
    add_model_args(p, draft_required=True)
    p.add_argument("--tasks", type=csv_list(str), default=list(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--lengths", type=csv_list(int), default=[2048], help="context lengths in tokens")
    p.add_argument("--depths", type=csv_list(float), default=[0.1, 0.5, 0.9], help="needle depths (needle task)")
    p.add_argument("--methods", type=csv_list(str), default=list(DEFAULT_METHODS))
    p.add_argument("--budgets", type=csv_list(float), default=[64, 128, 256, 512], help="token counts, or fractions < 1")
    p.add_argument("--limit", type=int, default=1, help="samples per task and length")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--ppl-tokens", type=int, default=64, help="teacher-forced tokens scored per perplexity sample")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--mapping", help="calibrated mapping for method sts-cal")
    p.add_argument("--prefill-budget", type=int, default=1024, help="rows per KV head for +sp methods' sparse prefill")
    p.add_argument("--prefill-block", type=int, default=64)
    p.add_argument("--no-recall", action="store_true", help="skip recall measurement (it computes dense attention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (results.jsonl, report.md, plots)")


def build_samples(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], limit: int,
                  tokenizer: Any, seed: int) -> list[Sample]:
    """Return the evaluation samples: for the needle task the length x depth grid, else ``limit`` per length."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise STSError(f"unknown task {unknown[0]!r} (choose from {', '.join(TASKS)})")
    count = token_counter(tokenizer)
    samples: list[Sample] = []
    for task in tasks:
        if task == "needle":
            samples += needle_grid(lengths, depths, count, seed, n_samples=limit)
            continue
        for length in lengths:
            samples += TASKS[task](limit, length, count, seed)
    return samples


def _budgets(spec: MethodSpec, budgets: Sequence[float]) -> list[float | None]:
    return list(budgets) if spec.sparse else [None]


def _key(sample: Sample, spec: MethodSpec, budget: float | None) -> str:
    return f"{sample.sample_id}|{spec.name}|{budget}"


def _done_records(path: Path) -> dict[str, dict]:
    """Return the records already in ``path`` by key (resuming skips them)."""
    if not path.exists():
        return {}
    from sts.eval.report import load_records

    return {r["key"]: r for r in load_records(path)}


def _append(sink: Any, done: dict[str, dict], record: dict) -> None:
    """Store a finished record durably (an interrupted run keeps it) and remember it."""
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    os.fsync(sink.fileno())
    done[record["key"]] = record


def _agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Return the share of the reference's positions where ``tokens`` holds the same token."""
    if not reference:
        return 1.0
    return sum(1 for a, b in zip(tokens, reference) if a == b) / len(reference)


class Evaluator:
    """Runs the grid for one pair and appends records as they finish."""

    def __init__(self, args: argparse.Namespace, target: LoadedModel, draft: LoadedModel) -> None:
        self.args = args
        self.target, self.draft = target, draft
        self.tokenizer = target.tokenizer
        self.out = Path(args.out)
        self.results = self.out / "results.jsonl"
        self.dense_nll: dict[str, float] = {}

    def selection(self, budget: float) -> SelectionConfig:
        """Return the selection settings for a budget."""
        a = self.args
        return SelectionConfig(budget=budget, sink=a.sink, window=a.window)

    def runs(self, samples: Sequence[Sample], specs: Sequence[MethodSpec]) -> Iterator[tuple[Sample, MethodSpec, float | None]]:
        """Yield every (sample, method, budget) of the grid; dense greedy first for each sample."""
        for sample in samples:
            for spec in specs:
                for budget in _budgets(spec, self.args.budgets):
                    yield sample, spec, budget

    def run(self, samples: Sequence[Sample], specs: Sequence[MethodSpec]) -> None:
        """Run the grid, skipping what ``results.jsonl`` already holds."""
        self.out.mkdir(parents=True, exist_ok=True)
        done = _done_records(self.results)
        todo = [r for r in self.runs(samples, specs) if _key(*r) not in done]
        bar = tqdm(total=len(todo), desc="eval", unit="run", file=sys.stderr)
        current: str | None = None
        cache = PrefixCache()
        with self.results.open("a") as sink:
            for sample, spec, budget in todo:
                if sample.sample_id != current:  # one prefill per sample, shared by its runs
                    cache, current = PrefixCache(), sample.sample_id
                reference = _key(sample, REFERENCE, None)
                if sample.metric != "perplexity" and reference not in done:
                    # Token agreement needs dense greedy output first, whatever the method order.
                    _append(sink, done, self.evaluate(sample, REFERENCE, None, cache, done))
                if _key(sample, spec, budget) not in done:
                    bar.set_postfix_str(f"{sample.task}@{sample.context_tokens} {spec.name} {budget}")
                    _append(sink, done, self.evaluate(sample, spec, budget, cache, done))
                bar.update()
        bar.close()

    def evaluate(self, sample: Sample, spec: MethodSpec, budget: float | None, cache: PrefixCache, done: dict[str, dict]) -> dict:
        """Return the record of one (sample, method, budget) run."""
        prompt = self.tokenizer(make_prompt(sample, self.tokenizer), add_special_tokens=False)["input_ids"]
        record: dict[str, Any] = {
            "key": _key(sample, spec, budget), "task": sample.task, "sample_id": sample.sample_id,
            "context_tokens": sample.context_tokens, "prompt_tokens": len(prompt), "depth": sample.depth,
            "method": spec.name, "budget": budget,
        }
        started = time.perf_counter()
        if sample.metric == "perplexity":
            record.update(self._perplexity(sample, prompt, spec, budget, cache))
        else:
            record.update(self._generate(sample, prompt, spec, budget, cache, done))
        record["time_s"] = round(time.perf_counter() - started, 3)
        return record

    def _generate(self, sample: Sample, prompt: list[int], spec: MethodSpec, budget: float | None,
                  cache: PrefixCache, done: dict[str, dict]) -> dict[str, Any]:
        a = self.args
        result = run_method(
            spec.method, self.target, self.draft, [prompt], a.max_new_tokens, gamma=a.gamma,
            selection=self.selection(budget) if budget is not None else None, mapping=spec.mapping,
            measure_recall=spec.sparse and not a.no_recall, prefix_cache=cache, seed=a.seed,
            prefill=PrefillConfig(a.prefill_budget, a.prefill_block) if spec.sparse_prefill else None,
            options=spec.policy_options(),
        )
        tokens = result.tokens[0]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        summary = result.stats.summary()
        reference = tokens if spec == REFERENCE else done[_key(sample, REFERENCE, None)]["tokens"]
        return {
            "score": score(sample, text), "prediction": text, "tokens": tokens,
            "agreement": _agreement(tokens, reference), "nll": None, "nll_dense": None,
            "acceptance_length": summary["acceptance_length"], "sparsity": summary["sparsity"],
            "recall": summary["recall"], "recall_context": summary["recall_context"],
            "recall_per_layer": result.stats.recall_per_layer(), "set_recall": summary["set_recall"],
            "tokens_per_s": summary["tokens_per_s"],
        }

    def _perplexity(self, sample: Sample, prompt: list[int], spec: MethodSpec, budget: float | None,
                    cache: PrefixCache) -> dict[str, Any]:
        a = self.args
        context = max(1, len(prompt) - a.ppl_tokens)
        if sample.sample_id not in self.dense_nll:
            dense = teacher_forced(self.target.model, self.draft.model, prompt, context, a.gamma, None, prefix_cache=cache)
            self.dense_nll[sample.sample_id] = dense.nll
        policy = None
        if spec.sparse:
            policy = make_policy(spec.method, self.selection(budget), self.target.model, self.draft.model, spec.mapping,
                                 **spec.policy_options())
        run = teacher_forced(self.target.model, self.draft.model, prompt, context, a.gamma, policy,
                             measure_recall=policy is not None and not a.no_recall, prefix_cache=cache)
        summary = run.stats.summary()
        return {
            "score": None, "prediction": "", "tokens": [], "agreement": None,
            "nll": run.nll, "nll_dense": self.dense_nll[sample.sample_id], "acceptance_length": None,
            "sparsity": summary["sparsity"], "recall": summary["recall"], "recall_context": summary["recall_context"],
            "recall_per_layer": run.stats.recall_per_layer(), "set_recall": summary["set_recall"], "tokens_per_s": None,
        }


def report_header(argv: Sequence[str]) -> str:
    """Return the report's provenance: command, date and machine."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    return f"Command: `sts {' '.join(argv)}`\n\nDate: {now}. Machine: {machine}.\n"


def run_eval_cli(args: argparse.Namespace) -> Path:
    """Run ``sts eval`` from parsed arguments; return the report's path."""
    from sts.models.loading import parse_dtype

    specs = parse_methods(args.methods, args.mapping)
    for budget in args.budgets:
        SelectionConfig(budget=budget, sink=args.sink, window=args.window)  # refuse impossible budgets up front
    if args.limit < 1:
        raise STSError(f"--limit must be >= 1, got {args.limit}")
    target, draft = load_pair(args.target, args.draft, parse_dtype(args.dtype), args.device)
    if draft is None or target.tokenizer is None:
        raise STSError("sts eval needs a draft and a target with a tokenizer")
    samples = build_samples(args.tasks, args.lengths, args.depths, args.limit, target.tokenizer, args.seed)
    Evaluator(args, target, draft).run(samples, specs)
    report = write_report(Path(args.out) / "results.jsonl", Path(args.out), header=report_header(sys.argv[1:]))
    print(f"wrote {report}")
    return report
