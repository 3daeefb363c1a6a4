"""The ``sts`` command: generate, calibrate, eval, recall, bench, demo.

Each subcommand parses its arguments and calls one library function; user errors
(:class:`~sts.errors.STSError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from sts.errors import STSError


def _budget(text: str) -> float:
    """Return a ``--budget``: a token count, or a fraction of the context when below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number, got {text!r}") from None
    return value


def csv_list(kind: type) -> Callable[[str], list]:
    """Return an argparse type that reads comma-separated values of ``kind``."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def add_model_args(p: argparse.ArgumentParser, draft_required: bool = False) -> None:
    """Add the options that pick the models, their precision and device."""
    p.add_argument("--target", required=True, help="target model: HF checkpoint dir, hub id or .gguf file")
    p.add_argument("--draft", required=draft_required, help="draft model (same tokenizer as the target)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    """Add the sparse-verification options shared by generate and eval."""
    p.add_argument("--budget", type=_budget, default=256.0,
                   help="context rows per target KV head, sinks and window included; < 1 means a fraction")
    p.add_argument("--sink", type=int, default=4, help="first rows always kept (default 4)")
    p.add_argument("--window", type=int, default=64, help="last rows always kept (default 64)")
    p.add_argument("--dense-layers", type=int, default=0, help="first target layers that stay dense")
    p.add_argument("--mapping", help="head-mapping JSON from `sts calibrate` (STS only)")
    p.add_argument("--rerank", type=int, default=None,
                   help="STS: draft proposes this many times the free rows, the target's queries rank them (default 4; 0: the paper's plain rule)")
    p.add_argument("--rerank-by", choices=("prob", "logit"), default=None,
                   help="STS: rank candidates by mean softmax probability (default) or max logit")
    p.add_argument("--feedback", type=float, default=None, help="STS: share of free rows kept for rows the target attended to")
    p.add_argument("--head-budgets", type=float, default=None,
                   help="STS: spread the budget over heads by calibrated difficulty, each at most this many x the mean (needs --mapping)")
    p.add_argument("--draft-budget", type=int, default=None,
                   help="draft steps after a round's first read only sinks + the latest rows, this many in all")
    p.add_argument("--sparse-prefill", action="store_true", help="draft-chosen key blocks for the target's prefill too")
    p.add_argument("--prefill-budget", type=int, default=1024, help="context rows per KV head in sparse prefill")
    p.add_argument("--prefill-block", type=int, default=64, help="rows per block in sparse prefill")


def _selection(args: argparse.Namespace):
    from sts.selection import SelectionConfig

    return SelectionConfig(budget=args.budget, sink=args.sink, window=args.window, dense_layers=args.dense_layers)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the STS refinements set on the command line (other methods take none)."""
    rerank_prob = None if args.rerank_by is None else float(args.rerank_by == "prob")
    chosen = (("rerank", args.rerank), ("rerank_prob", rerank_prob), ("feedback", args.feedback), ("head_budgets", args.head_budgets))
    options = {k: v for k, v in chosen if v is not None}
    if options and args.method != "sts":
        raise STSError(f"--rerank/--rerank-by/--feedback/--head-budgets apply to --method sts, not {args.method}")
    return options


def _prefill(args: argparse.Namespace):
    from sts.prefill import PrefillConfig

    return PrefillConfig(args.prefill_budget, args.prefill_block) if args.sparse_prefill else None


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    """Return the prompt's token ids from --prompt, --prompt-file or --prompt-ids."""
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise STSError("--prompt-ids must be comma-separated integers") from None
        return ids
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text()
        except OSError as exc:
            raise STSError(f"cannot read prompt file {args.prompt_file}: {exc.strerror}") from None
    else:
        text = args.prompt
    if tokenizer is None:
        raise STSError("this checkpoint has no tokenizer: pass --prompt-ids")
    if args.chat and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def cmd_generate(args: argparse.Namespace) -> int:
    """Run one generation and print the text (or one JSON record with --json)."""
    from sts.models.loading import parse_dtype
    from sts.runner import load_pair, run_method
    from sts.sampling import SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    selection = _selection(args) if args.method not in ("autoregressive", "speculative") else None
    if args.gamma < 1:
        raise STSError(f"--gamma must be >= 1, got {args.gamma}")
    draft_path = None if args.method == "autoregressive" else args.draft
    target, draft = load_pair(args.target, draft_path, parse_dtype(args.dtype), args.device)
    prompt = _prompt_ids(args, target.tokenizer)
    tok = target.tokenizer
    stream = None
    if not args.json and tok is not None:
        def stream(b: int, ids: list[int]) -> None:
            sys.stdout.write(tok.decode(ids, skip_special_tokens=True))
            sys.stdout.flush()
    result = run_method(
        args.method, target, draft, [prompt], args.max_new_tokens, gamma=args.gamma, sampling=sampling,
        selection=selection, mapping=args.mapping, measure_recall=args.measure_recall, on_tokens=stream, seed=args.seed,
        prefill=_prefill(args), options=_options(args), draft_budget=args.draft_budget,
    )
    tokens = result.tokens[0]
    stats = result.stats.summary()
    if args.json:
        record: dict[str, Any] = {"method": args.method, "tokens": tokens, "stats": stats}
        if tok is not None:
            record["text"] = tok.decode(tokens, skip_special_tokens=True)
        print(json.dumps(record))
    else:
        if tok is None:
            print(",".join(map(str, tokens)))
        else:
            print()
        print(json.dumps(stats), file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate the draft->target head mapping and write it to --out."""
    from sts.calibrate import calibrate_files

    calibrate_files(args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation grid."""
    from sts.eval.harness import run_eval_cli

    run_eval_cli(args)
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    """Compare selections' recall on identical queries."""
    from sts.eval.recall import run_recall_cli

    run_recall_cli(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the GPU benchmarks."""
    from sts.bench.cli import run_bench_cli

    run_bench_cli(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fetch the demo pair and compare decoding methods on real text."""
    from sts.demo import run_demo

    run_demo(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    from sts.runner import methods

    parser = argparse.ArgumentParser(prog="sts", description="Speculative Token Sparsity: fast long-context decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a decoding method")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids (checkpoints without a tokenizer)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per round")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--method", default="speculative", choices=methods())
    add_selection_args(g)
    g.add_argument("--measure-recall", action="store_true", help="also compute dense attention to report recall (slow)")
    g.add_argument("--json", action="store_true", help="print one JSON record on stdout")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="map each target KV head to the draft head that predicts it best")
    add_model_args(c, draft_required=True)
    c.add_argument("--text-file", required=True, action="append", help="calibration text (repeatable)")
    c.add_argument("--out", required=True, help="where to write the mapping JSON")
    c.add_argument("--criterion", choices=("recall", "jaccard"), default="recall")
    c.add_argument("--topk", type=int, default=256, help="size of the token sets compared")
    c.add_argument("--sources", type=int, default=1, help="draft heads per target head (weighted ensemble if > 1)")
    c.add_argument("--context", type=int, default=2048, help="tokens of each text used")
    c.add_argument("--skip-tokens", type=int, default=0, help="tokens skipped at the start of each text (headers)")
    c.add_argument("--queries", type=int, default=32, help="last positions whose attention is compared")
    c.add_argument("--sink", type=int, default=4)
    c.add_argument("--window", type=int, default=64)
    c.set_defaults(func=cmd_calibrate)

    from sts.eval.harness import add_eval_args

    e = sub.add_parser("eval", help="accuracy, recall and acceptance of every method on offline long-context tasks")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)

    from sts.eval.recall import add_recall_args

    r = sub.add_parser("recall", help="mass and set recall of methods and budgets on the same teacher-forced queries")
    add_recall_args(r)
    r.set_defaults(func=cmd_recall)

    from sts.bench.cli import add_bench_args

    b = sub.add_parser("bench", help="GPU benchmarks: kernels and end-to-end decode speed")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="fetch the offline demo pair and compare decoding methods on real text")
    d.add_argument("--prompt-tokens", type=int, default=2048, help="length of the demo prompt")
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--gamma", type=int, default=4)
    d.add_argument("--budget", type=_budget, default=256.0, help="STS budget (rows per KV head)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="float32")
    d.add_argument("--json-out", help="also write the demo's record as JSON here")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sts`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except STSError as exc:
        print(f"sts: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
