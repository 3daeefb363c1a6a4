"""The ``sts`` command: generate, calibrate, eval, recall, bench, demo.

Each subcommand parses its arguments and calls one library function; user errors
(:class:`~sts.errors.STSError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, Callable, NoReturn, Sequence, TypeVar

from sts.errors import STSError

Settings = TypeVar("Settings")


def _budget(text: str) -> float:
    """Return a ``--budget``: a token count, or a fraction of the context when below 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"budget must be a finite number > 0 (rows, or a fraction of the context "
                                         f"below 1), got {text!r}")
    return value


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """Return an argparse type that reads comma-separated values of ``kind`` (an empty item, as in ``a,,b``, is a
    mistake, not a skip; an empty text is an empty list, which the command refuses in its own words)."""
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",")] if text.strip() else []
        try:
            if "" in items:
                raise ValueError
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {getattr(kind, '__name__', '')} values, got {text!r}") from None
    return parse


def add_model_args(p: argparse.ArgumentParser, draft_required: bool = False) -> None:
    """Add the options that pick the models, their precision and device."""
    p.add_argument("--target", required=True, help="target model: HF checkpoint dir, hub id or .gguf file")
    p.add_argument("--draft", required=draft_required, help="draft model (same tokenizer as the target)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is there, else cpu)")


def _load(args: argparse.Namespace, with_draft: bool = True) -> tuple[Any, Any]:
    """Return (target, draft or None) as :class:`~sts.runner.LoadedModel`, from the model options (the device
    checked by :func:`main`); a ``--mapping`` made for another pair of local checkpoints is refused first, from their
    configs alone."""
    from sts.models.loading import parse_dtype, read_config, source_kind
    from sts.runner import load_pair
    from sts.selection import HeadMapping

    mapping = getattr(args, "mapping", None)
    if mapping and with_draft and args.draft:  # a mapping for another pair fails before the (slow) loading
        configs = read_config(args.target), read_config(args.draft)
        if None not in configs:
            HeadMapping.load(mapping).check_pair(*configs)  # type: ignore[arg-type]
    draft = args.draft if with_draft else None
    for source in (args.target, draft):
        if source is not None and source_kind(source) == "gguf":
            # transformers dequantizes a GGUF whole and silently (50 s for the demo's 0.5 GB draft on 2 CPU cores).
            print(f"[sts] loading {source}: a GGUF is dequantized on every load, which takes minutes on a CPU",
                  file=sys.stderr, flush=True)
    return load_pair(args.target, draft, parse_dtype(args.dtype), args.device)


def _at_least(args: argparse.Namespace, **least: int) -> None:
    """Refuse (STSError) any option named in ``least`` whose value is below its minimum."""
    for dest, minimum in least.items():
        value = getattr(args, dest)
        if value < minimum:
            raise STSError(f"--{dest.replace('_', '-')} must be >= {minimum}, got {value}")


def _settings(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """Return the settings dataclass ``cls`` filled from the options of the same names (lists as tuples)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def report_header(argv: Sequence[str]) -> str:
    """Return a report's provenance: the command, the date and the machine."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    return f"Command: `sts {' '.join(argv)}`\n\nDate: {now}. Machine: {machine}.\n"


def _draft_budget(text: str) -> int | str:
    """Return a ``--draft-budget``: "auto", "dense", else a row count."""
    if text in ("auto", "dense"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, dense or a row count, got {text!r}") from None


def add_selection_args(p: argparse.ArgumentParser) -> None:
    """Add the sparse-verification options shared by generate and serve."""
    from sts.prefill import PrefillConfig
    from sts.runner import DEFAULT_DRAFT_BUDGET
    from sts.selection.base import DEFAULT_BUDGET
    from sts.selection.draft import DRAFT_SELECTIONS

    p.add_argument("--budget", type=_budget, default=None,
                   help=f"context rows per target KV head, sinks and window included; < 1 means a fraction (default {DEFAULT_BUDGET})")
    p.add_argument("--sink", type=int, default=4, help="first rows always kept (default 4)")
    p.add_argument("--window", type=int, default=64, help="last rows always kept (default 64)")
    p.add_argument("--dense-layers", type=int, default=0, help="first target layers that stay dense")
    p.add_argument("--mapping", help="head-mapping JSON from `sts calibrate` (STS only)")
    p.add_argument("--rerank", type=int, default=None,
                   help="STS: draft proposes this many times the free rows, the target's queries rank them (default 4; 0: the paper's plain rule)")
    p.add_argument("--rerank-by", choices=("prob", "logit"), default=None,
                   help="STS: rank candidates by mean softmax probability (default) or max logit")
    p.add_argument("--feedback", type=float, default=None, help="STS: share of free rows kept for rows the target attended to")
    p.add_argument("--key-bits", type=int, choices=(8, 16), default=None,
                   help="STS: score with the draft's keys in 16 bits (default) or an 8-bit copy centred on the "
                        "prompt's mean key (experimental: rounds 0.95-0.98x on an H200)")
    p.add_argument("--head-budgets", type=float, default=None,
                   help="STS: spread the budget over heads by calibrated difficulty, each at most this many x the mean (needs --mapping)")
    p.add_argument("--draft-budget", type=_draft_budget, default="auto",
                   help="sparse draft steps read only this many rows (which, and whether the round's first step too: "
                        "--draft-selection); "
                        f"auto (default): {DEFAULT_DRAFT_BUDGET} scored rows in every draft step of a sparse round with --method sts "
                        "(--draft-selection scored-all), else every row; "
                        "dense: every row")
    p.add_argument("--draft-selection", choices=DRAFT_SELECTIONS, default=None,
                   help="the sparse draft's rows: scored (sts only), sinks, the window and the rows each draft layer scored "
                        "best in the last sparse round; recent (the other methods' default), sinks + the latest rows; "
                        "with -all the round's first draft step reads them too (else every row); scored-all is sts's "
                        "default")
    p.add_argument("--verify", choices=("auto", "sparse"), default="auto",
                   help="auto (default): verify densely in rounds whose contexts are below the break-even, where the "
                        "selection costs more than the KV reads it saves (sts.costmodel, H200 figures); sparse: always "
                        "over the selected rows")
    p.add_argument("--sparse-prefill", action="store_true", help="draft-chosen key blocks for the target's prefill too")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help=f"context rows per KV head in sparse prefill (default {PrefillConfig.budget})")
    p.add_argument("--prefill-block", type=int, default=None,
                   help=f"rows per block in sparse prefill (default {PrefillConfig.block})")


def _selection(args: argparse.Namespace):
    """Return the SelectionConfig of ``args`` for a selection ``--method``; None for a dense one, which takes no
    ``--budget`` (an STSError, as is a budget with no room past the sinks and the window)."""
    from sts.runner import DENSE_METHODS
    from sts.selection import SelectionConfig

    if args.method in DENSE_METHODS:
        if args.budget is not None:
            raise STSError(f"--budget applies to selection methods (e.g. --method sts), not {args.method}")
        return None
    budget = SelectionConfig.budget if args.budget is None else args.budget
    return SelectionConfig(budget=budget, sink=args.sink, window=args.window, dense_layers=args.dense_layers)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the STS refinements set on the command line (other methods take none), their values checked."""
    from sts.selection import check_options

    rerank_prob = None if args.rerank_by is None else float(args.rerank_by == "prob")
    chosen = (("rerank", args.rerank), ("rerank_prob", rerank_prob), ("feedback", args.feedback),
              ("head_budgets", args.head_budgets), ("key_bits", args.key_bits))
    options = {k: v for k, v in chosen if v is not None}
    if options and args.method != "sts":
        flags = "--rerank/--rerank-by/--feedback/--head-budgets/--key-bits"
        raise STSError(f"{flags} apply to --method sts, not {args.method}")
    if options:
        check_options(args.method, options)
    return options


def _prefill(args: argparse.Namespace):
    from sts.prefill import PrefillConfig

    sizes = {k: v for k, v in (("budget", args.prefill_budget), ("block", args.prefill_block)) if v is not None}
    if not args.sparse_prefill:
        if sizes:
            raise STSError("--prefill-budget and --prefill-block apply with --sparse-prefill")
        return None
    return PrefillConfig(**sizes)


def _prompt(args: argparse.Namespace) -> str | list[int]:
    """Return the prompt as given: token ids (--prompt-ids), or text (--prompt, or --prompt-file read as UTF-8).

    Empty text is refused here, before the models load (it has no tokens to decode from), unless --chat wraps it.
    """
    from sts.api import require_unicode
    from sts.eval.output import read_text

    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.split(",")]  # an empty item ("1,,2") is a mistake, not a skip
        except ValueError:
            raise STSError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if args.prompt_file is not None:
        text, what = read_text(args.prompt_file, "prompt file"), f"prompt file {args.prompt_file}"
    else:
        text, what = args.prompt, "--prompt"
        require_unicode(text, "the prompt")  # bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
    if not text and not args.chat:
        raise STSError(f"{what} is empty: there is nothing to continue")
    return text


def _prompt_ids(args: argparse.Namespace, prompt: str | list[int], tokenizer: Any) -> list[int]:
    """Return the token ids of ``prompt`` (:func:`_prompt`), wrapped in the chat template with --chat."""
    if isinstance(prompt, list):
        return prompt
    text = prompt
    if tokenizer is None:
        raise STSError("this checkpoint has no tokenizer: pass --prompt-ids")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise STSError("--chat: this model's tokenizer has no chat template (leave out --chat for the raw prompt)")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _checked_prompt_ids(args: argparse.Namespace, given: str | list[int]) -> list[int] | None:
    """Return the prompt's token ids, refusing, from the local checkpoints' configs and the target's tokenizer alone
    (no weights read), a prompt that with ``--max-new-tokens`` and a round's lookahead exceeds a model's context, or
    ids outside a vocabulary (:func:`~sts.decoding.context_capacity`). None when that needs the loaded models: text
    for a GGUF, a hub id or a checkpoint without a tokenizer is tokenized and checked after loading."""
    from sts.decoding import context_capacity
    from sts.models.loading import read_config, read_tokenizer
    from sts.runner import lookahead

    sources = [args.target] + ([args.draft] if args.method != "autoregressive" else [])
    configs = [config for config in map(read_config, sources) if config is not None]
    tokenizer = None if isinstance(given, list) else read_tokenizer(args.target)
    if not configs or (tokenizer is None and not isinstance(given, list)):
        return None
    ids = _prompt_ids(args, given, tokenizer)
    context_capacity(configs, [ids], args.max_new_tokens, lookahead(args.method, args.gamma, args.max_new_tokens))
    return ids


def cmd_generate(args: argparse.Namespace, load: Callable[..., tuple[Any, Any]] = _load) -> int:
    """Run one generation and stream the text (or print one JSON record with --json).

    ``load`` reads the models: under ``--tensor-parallel`` each rank reads its part of the target
    (:func:`sts.parallel.launch_generate`).
    """
    from sts.detokenize import IncrementalDetokenizer
    from sts.runner import draft_settings, run_method
    from sts.sampling import SamplingConfig, check_seed
    from sts.selection import HeadMapping

    if args.method is None:  # as sts serve and LLM
        args.method = "sts" if args.draft else "autoregressive"
    # Every check that needs no model comes before the (slow) loading.
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    selection = _selection(args)
    _at_least(args, gamma=1, max_new_tokens=1)
    if args.chat and args.prompt_ids is not None:
        raise STSError("--chat wraps prompt text: use it with --prompt or --prompt-file, not --prompt-ids")
    if args.method != "autoregressive" and args.draft is None:
        raise STSError(f"--method {args.method} needs a --draft model")
    if args.mapping is not None and args.method != "sts":
        raise STSError(f"--mapping applies to --method sts, not {args.method}")
    mapping = HeadMapping.load(args.mapping) if args.mapping is not None else None
    prefill, options = _prefill(args), _options(args)
    if options.get("head_budgets") and (mapping is None or mapping.mass_curve is None):
        raise STSError("--head-budgets needs a --mapping with mass curves (from `sts calibrate`)")
    draft_budget, draft_selection = draft_settings(args.method, args.draft_budget, args.draft_selection)
    given = _prompt(args)
    checked = _checked_prompt_ids(args, given)
    if args.tensor_parallel != 1 and load is _load:
        from sts.parallel import launch_generate

        return launch_generate(cmd_generate, args)
    target, draft = load(args, with_draft=args.method != "autoregressive")
    prompt = checked if checked is not None else _prompt_ids(args, given, target.tokenizer)
    tok = target.tokenizer
    text = IncrementalDetokenizer(tok) if not args.json and tok is not None else None

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = run_method(
        args.method, target, draft, [prompt], args.max_new_tokens, gamma=args.gamma, sampling=sampling,
        selection=selection, mapping=args.mapping, measure_recall=args.measure_recall, seed=args.seed,
        on_tokens=None if text is None else lambda b, ids: write(text.add(ids)),
        prefill=prefill, options=options, draft_budget=draft_budget, verify=args.verify, draft_selection=draft_selection,
    )
    tokens = result.tokens[0]
    stats = result.stats.summary()
    if args.json:
        record: dict[str, Any] = {"method": args.method, "draft_budget": draft_budget,
                                  "draft_selection": draft_selection if draft_budget is not None else None,
                                  "tokens": tokens, "stats": stats}
        if tok is not None:
            record["text"] = tok.decode(tokens, skip_special_tokens=True)
        print(json.dumps(record))
    else:
        if text is None:
            print(",".join(map(str, tokens)))
        else:
            write(text.flush() + "\n")
        print(stats_line(stats), file=sys.stderr)
    return 0


def stats_line(stats: dict[str, Any]) -> str:
    """Return a generation's headline numbers (:meth:`~sts.decoding.GenerationStats.summary`) as one line for a person
    (``--json`` gives them all, as JSON)."""
    parts = [f"{stats['new_tokens']} new tokens in {stats['time_s']:.2f} s (prefill {stats['prefill_s']:.2f} s, "
             f"{stats['tokens_per_s']:.1f} tokens/s after it)"]
    if stats.get("acceptance_length") is not None:
        parts.append(f"{stats['acceptance_length']:.2f} tokens per round")
    if stats.get("sparsity") is not None:
        parts.append(f"sparsity {stats['sparsity']:.1%}" + (f", {stats['dense_rounds']} dense rounds"
                                                             if stats.get("dense_rounds") else ""))
    if stats.get("recall") is not None:
        parts.append(f"attention mass recall {stats['recall']:.3f}")
    return "[sts] " + "; ".join(parts)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate the draft->target head mapping and write it to --out."""
    from sts.calibrate import calibrate_files
    from sts.eval.output import output_file
    from sts.eval.text import read_text_files

    _at_least(args, topk=1, sources=1, queries=1, context=1, skip_tokens=0, sink=0, window=0)
    output_file(args.out)  # before loading: an unusable path or unreadable text fails first
    texts = read_text_files(args.text_file)
    target, draft = _load(args)
    mapping = calibrate_files(
        target, draft, texts, args.out, skip_tokens=args.skip_tokens, context=args.context,
        criterion=args.criterion, topk=args.topk, n_sources=args.sources, n_queries=args.queries,
        sink=args.sink, window=args.window,
    )
    quality = [q for row in mapping.quality or () for q in row]
    print(f"wrote {args.out}: {args.criterion} mean {sum(quality) / max(1, len(quality)):.3f} over {len(args.text_file)} texts")
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Add ``sts eval``'s options (defaults: :class:`~sts.eval.harness.EvalSettings`)."""
    from sts.eval.harness import EvalSettings
    from sts.eval.tasks import TASKS

    defaults = EvalSettings()
    add_model_args(p, draft_required=True)
    p.add_argument("--tasks", type=csv_list(str), default=list(defaults.tasks), help=f"comma list of {', '.join(TASKS)} (default: all)")
    p.add_argument("--lengths", type=csv_list(int), default=list(defaults.lengths),
                   help=f"context lengths in tokens (default: {','.join(map(str, defaults.lengths))})")
    p.add_argument("--depths", type=csv_list(float), default=list(defaults.depths), help="needle depths (needle task)")
    p.add_argument("--methods", type=csv_list(str), default=None,
                   help="comma list (default: every method, sts-cal only with --mapping); autoregressive decoding "
                        "always runs too, the reference of every difference in the report; a method's own "
                        "settings follow it as /key=number, e.g. sts/gamma=6, sts/draft_budget=256, "
                        "sts/window=256/dense_layers=2 (over --window, --sink), sts+sp (sparse prefill)")
    p.add_argument("--budgets", type=csv_list(_budget), default=list(defaults.budgets),
                   help=f"token counts, or fractions < 1 (default: {','.join(map(str, defaults.budgets))})")
    p.add_argument("--limit", type=int, default=defaults.limit, help="samples per task and length (needle: per depth; default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="new tokens per answer (default: each task's own, 32-96)")
    p.add_argument("--ppl-tokens", type=int, default=defaults.ppl_tokens, help="teacher-forced tokens scored per perplexity sample")
    p.add_argument("--gamma", type=int, default=defaults.gamma, help="draft tokens per round (default: %(default)s)")
    p.add_argument("--sink", type=int, default=defaults.sink, help="first rows every selection keeps (default: %(default)s)")
    p.add_argument("--window", type=int, default=defaults.window,
                   help="latest rows every selection keeps (default: %(default)s)")
    p.add_argument("--mapping", help="calibrated mapping for method sts-cal")
    p.add_argument("--prefill-budget", type=int, default=defaults.prefill_budget, help="rows per KV head for +sp methods' sparse prefill")
    p.add_argument("--prefill-block", type=int, default=defaults.prefill_block)
    p.add_argument("--no-recall", dest="measure_recall", action="store_false",
                   help="skip recall measurement (it computes dense attention)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="sampling and task seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory (results.jsonl, report.md, plots)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation grid and write its report."""
    from sts.eval.harness import EvalSettings, run_eval
    from sts.eval.output import check_output_dir

    settings = _settings(EvalSettings, args)
    settings.method_specs()  # refuse impossible settings and an --out that cannot be a folder before loading
    check_output_dir(args.out)
    target, draft = _load(args)
    report = run_eval(target, draft, args.out, settings, header=report_header(args.argv))
    print(f"wrote {report}")
    return 0


def add_recall_args(p: argparse.ArgumentParser) -> None:
    """Add ``sts recall``'s options (defaults: :class:`~sts.eval.recall.RecallSettings`)."""
    from sts.eval.recall import RecallSettings

    defaults = RecallSettings()
    add_model_args(p, draft_required=True)
    p.add_argument("--text-file", action="append", required=True, help="text to read (repeatable)")
    p.add_argument("--skip-tokens", type=int, default=defaults.skip_tokens,
                   help="tokens skipped at the start of each text (default: %(default)s)")
    p.add_argument("--context", type=int, default=defaults.context,
                   help="context tokens before the measured steps (default: %(default)s)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="verify steps measured per text (default: %(default)s)")
    p.add_argument("--gamma", type=int, default=defaults.gamma, help="draft tokens per round (default: %(default)s)")
    p.add_argument("--methods", type=csv_list(str), default=list(defaults.methods),
                   help=f"comma list of selection methods (default: {','.join(defaults.methods)})")
    p.add_argument("--budgets", type=csv_list(_budget), default=list(defaults.budgets),
                   help=f"token counts, or fractions < 1 (default: {','.join(map(str, defaults.budgets))})")
    p.add_argument("--sink", type=int, default=defaults.sink, help="first rows every selection keeps (default: %(default)s)")
    p.add_argument("--window", type=int, default=defaults.window,
                   help="latest rows every selection keeps (default: %(default)s)")
    p.add_argument("--mapping", help="calibrated mapping for method sts-cal")
    p.add_argument("--out", required=True, help="JSON file for the results (the table is also written beside it, "
                                                "with the suffix .md)")


def cmd_recall(args: argparse.Namespace) -> int:
    """Compare selections' recall on identical queries and print the table."""
    from sts.eval.recall import RecallSettings, recall_outputs, recall_table, run_recall
    from sts.eval.text import read_text_files

    settings = _settings(RecallSettings, args)
    settings.method_specs()  # refuse impossible settings, an unusable --out and unreadable texts before loading
    recall_outputs(args.out)
    texts = read_text_files(args.text_file)
    target, draft = _load(args)
    rows = run_recall(target, draft, texts, args.out, settings, header=report_header(args.argv))
    print(recall_table(rows))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the GPU benchmarks."""
    from sts.bench.cli import run_bench_cli

    run_bench_cli(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fetch the demo pair and compare decoding methods on real text."""
    from sts.demo import run_demo
    from sts.selection import SelectionConfig

    _at_least(args, gamma=1, max_new_tokens=1)  # before the (slow) loading, as sts generate does
    SelectionConfig(budget=args.budget)  # refuses a budget without room past the sinks and the window
    run_demo(args)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the pair over an OpenAI-compatible HTTP API (options: :mod:`sts.serve.options`)."""
    from sts.serve.options import run_serve

    return run_serve(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (not after the usage block) and exit status 2; subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    from sts.runner import methods

    parser = _Parser(prog="sts", description="Speculative Token Sparsity: fast long-context decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a decoding method")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids (checkpoints without a tokenizer)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample among the k likeliest tokens; 0 = all (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the likeliest tokens of this much probability (nucleus); 1 = all "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--method", default=None, choices=methods(),
                   help="default: sts with --draft (as sts serve and LLM), autoregressive without")
    add_selection_args(g)
    g.add_argument("--measure-recall", action="store_true", help="also compute dense attention to report recall (slow)")
    g.add_argument("--json", action="store_true", help="print one JSON record on stdout")
    g.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the target by heads over N processes (cpu: gloo; cuda: NCCL, one GPU each); rank 0 prints")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="map each target KV head to the draft head that predicts it best")
    add_model_args(c, draft_required=True)
    c.add_argument("--text-file", required=True, action="append", help="calibration text (repeatable)")
    c.add_argument("--out", required=True, help="where to write the mapping JSON")
    c.add_argument("--criterion", choices=("recall", "jaccard"), default="recall", help="how draft and target heads are matched (default: %(default)s)")
    c.add_argument("--topk", type=int, default=256, help="size of the token sets compared (default: %(default)s)")
    c.add_argument("--sources", type=int, default=1, help="draft heads per target head (weighted ensemble if > 1; default: %(default)s)")
    c.add_argument("--context", type=int, default=2048, help="tokens of each text used (default: %(default)s)")
    c.add_argument("--skip-tokens", type=int, default=0, help="tokens skipped at the start of each text (headers; default: %(default)s)")
    c.add_argument("--queries", type=int, default=32, help="last positions whose attention is compared (default: %(default)s)")
    c.add_argument("--sink", type=int, default=4, help="first rows left out of the compared sets (default: %(default)s)")
    c.add_argument("--window", type=int, default=64, help="latest rows left out of the compared sets (default: %(default)s)")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="accuracy, recall and acceptance of every method on offline long-context tasks")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("recall", help="mass and set recall of methods and budgets on the same teacher-forced queries")
    add_recall_args(r)
    r.set_defaults(func=cmd_recall)

    from sts.bench.cli import add_bench_args

    b = sub.add_parser("bench", help="GPU benchmarks: kernels, end-to-end decode speed, server throughput")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="fetch the offline demo pair and compare decoding methods on real text")
    d.add_argument("--prompt-tokens", type=int, default=2048, help="length of the demo prompt (default: %(default)s)")
    d.add_argument("--max-new-tokens", type=int, default=96,
                   help="new tokens per method (default: %(default)s; the answer takes about 15)")
    d.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default: %(default)s)")
    d.add_argument("--budget", type=_budget, default=256.0,
                   help="STS budget, rows per KV head (default 256: 87.5%% sparsity on the 2K prompt)")
    d.add_argument("--device", default=None, help="default: cuda when a GPU is there, else cpu")
    d.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    d.add_argument("--json-out", help="also write the demo's record as JSON here")
    d.set_defaults(func=cmd_demo)

    from sts.serve.options import add_serve_args

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (needs sts[serve])")
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sts`` command line; return the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the reports name the command that made them
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if {"device", "dtype"} <= vars(args).keys():  # unset: the GPU when there is one
            from sts.runner import resolve_device

            args.device, args.dtype = resolve_device(args.device, args.dtype)
        return func(args)
    except STSError as exc:
        print(f"sts: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the system refused (disk full, a path that changed meanwhile): the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sts: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
