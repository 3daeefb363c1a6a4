"""``sts recall``: mass and set recall of many methods and budgets on the very same target queries.

The target reads known text teacher-forced, ``gamma + 1`` tokens per step, with dense attention;
at every layer each method chooses its rows for those exact queries (shadow mode, see
:class:`~sts.selection.attend.ShadowAttention`), so differences come from the selections alone.
The draft reads the true continuation, as a draft that guessed right would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from sts.attention.backend import QueryRecorder
from sts.cli import add_model_args, csv_list
from sts.decoding import Decoder, GenerationStats
from sts.eval.teacher import draft_reads_truth
from sts.eval.text import read_token_texts
from sts.errors import STSError
from sts.models.transformer import Transformer
from sts.selection import SelectionConfig, make_policy
from sts.selection.attend import SelectiveAttention, ShadowAttention
from sts.selection.base import RoundContext


def shadow_recall(
    target: Transformer, draft: Transformer, tokens: Sequence[int], context: int, gamma: int, steps: int,
    observers: dict[str, SelectiveAttention],
) -> dict[str, GenerationStats]:
    """Return per-observer stats (recall, set recall, per layer) over ``steps`` teacher-forced verify steps."""
    if context + steps * (gamma + 1) > len(tokens):
        raise STSError(f"text too short: {len(tokens)} tokens for a context of {context} and {steps} steps")
    tokens = list(tokens[: context + steps * (gamma + 1)])
    tdec = Decoder(target, 1, len(tokens) + 1)
    ddec = Decoder(draft, 1, len(tokens) + 1)
    tdec.feed([tokens[:context]])
    ddec.feed([tokens[:context]])
    layers = sorted({dl for o in observers.values() if o.policy.uses_draft for dl in o.policy.draft_layers(draft)})
    recorder = QueryRecorder(layers)
    stats = {name: GenerationStats() for name in observers}
    for observer in observers.values():
        observer.policy.reset()
    start = context
    for _ in range(steps):
        draft_reads_truth(ddec, tokens, start, gamma, recorder)
        queries = recorder.take()
        start_pos = torch.tensor([start], device=tdec.device)
        for observer in observers.values():
            observer.policy.budget = observer.policy.config.tokens(start)
            observer.policy.prepare(RoundContext(start_pos, target, draft, queries))
        block = torch.tensor([tokens[start : start + gamma + 1]], device=tdec.device)
        target(block, start_pos, ShadowAttention(observers))
        for name, observer in observers.items():
            observer.end_step(stats[name])
        start += gamma + 1
    return stats


def add_recall_args(p: argparse.ArgumentParser) -> None:
    """Add ``sts recall``'s options."""
    add_model_args(p, draft_required=True)
    p.add_argument("--text-file", action="append", required=True, help="text to read (repeatable)")
    p.add_argument("--skip-tokens", type=int, default=0, help="tokens skipped at the start of each text")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="verify steps measured per text")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--methods", type=csv_list(str), default=["sts", "streaming", "quest", "specpc", "oracle"])
    p.add_argument("--budgets", type=csv_list(float), default=[64, 128, 256, 512])
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--mapping", help="calibrated mapping for method sts-cal")
    p.add_argument("--out", required=True, help="JSON file for the results")


def run_recall_cli(args: argparse.Namespace) -> Path:
    """Run ``sts recall`` from parsed arguments; write and return the JSON results."""
    from sts.eval.harness import parse_methods, report_header
    from sts.models.loading import parse_dtype
    from sts.runner import load_pair

    specs = [s for s in parse_methods(args.methods, args.mapping) if s.sparse]
    if not specs:
        raise STSError("sts recall compares selection methods: name at least one sparse method")
    target, draft = load_pair(args.target, args.draft, parse_dtype(args.dtype), args.device)
    assert draft is not None
    if target.tokenizer is None:
        raise STSError("sts recall needs the target's tokenizer to read --text-file")
    rows: dict[str, dict] = {}
    texts = read_token_texts(args.text_file, target.tokenizer, args.skip_tokens)
    for name, ids in tqdm(list(zip(args.text_file, texts)), desc="texts", file=sys.stderr):
        observers = {}
        for spec in specs:
            for budget in args.budgets:
                config = SelectionConfig(budget=budget, sink=args.sink, window=args.window)
                policy = make_policy(spec.method, config, target.model, draft.model, spec.mapping, **spec.policy_options())
                observers[f"{spec.name}|{budget:g}"] = SelectiveAttention(policy, measure_recall=True)
        stats = shadow_recall(target.model, draft.model, ids, args.context, args.gamma, args.steps, observers)
        for key, st in stats.items():
            row = rows.setdefault(key, {"method": key.split("|")[0], "budget": float(key.split("|")[1]), "texts": []})
            summary = st.summary()
            row["texts"].append({"file": Path(name).name, "recall": summary["recall"], "recall_context": summary["recall_context"],
                                 "set_recall": summary["set_recall"], "recall_per_layer": st.recall_per_layer()})
    for row in rows.values():
        n = len(row["texts"])
        row["recall"] = sum(t["recall"] for t in row["texts"]) / n
        row["recall_context"] = sum(t["recall_context"] for t in row["texts"]) / n
        row["set_recall"] = {k: sum(t["set_recall"][k] for t in row["texts"]) / n for k in row["texts"][0]["set_recall"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": report_header(sys.argv[1:]), "context": args.context, "steps": args.steps,
                               "rows": list(rows.values())}, indent=1))
    table = recall_table(list(rows.values()))
    out.with_suffix(".md").write_text(table)
    print(table)
    return out


def recall_table(rows: list[dict]) -> str:
    """Return a markdown table of recall rows, grouped by budget (methods in their given order)."""
    lines = ["| budget | method | mass recall | mass recall / context mass | set recall@32 | set recall@64 | set recall@budget |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r["budget"]):
        sr = row["set_recall"]
        lines.append(f"| {row['budget']:g} | {row['method']} | {row['recall']:.3f} | {row['recall_context']:.3f} | "
                     f"{sr['32']:.3f} | {sr['64']:.3f} | {sr['budget']:.3f} |")
    return "\n".join(lines) + "\n"
