"""``sts recall``: mass and set recall of many methods and budgets on the very same target queries.

The target reads known text teacher-forced, ``gamma + 1`` tokens per step, with dense attention;
at every layer each method chooses its rows for those exact queries (shadow mode, see
:class:`~sts.selection.attend.ShadowAttention`), so differences come from the selections alone.
The draft reads the true continuation, as a draft that guessed right would.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from sts.decoding import GenerationStats
from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.eval.harness import GridSettings, MethodSpec
from sts.eval.output import atomic_write, output_file
from sts.eval.text import TextFile, read_token_texts
from sts.models.transformer import Transformer
from sts.runner import LoadedModel
from sts.selection import SelectionConfig, make_policy
from sts.selection.attend import SelectiveAttention


def shadow_recall(
    target: Transformer, draft: Transformer, tokens: Sequence[int], context: int, gamma: int, steps: int,
    observers: dict[str, SelectiveAttention],
) -> dict[str, GenerationStats]:
    """Return per-observer stats (recall, set recall, per layer) over ``steps`` teacher-forced verify steps."""
    if context + steps * (gamma + 1) > len(tokens):
        raise STSError(f"text too short: {len(tokens)} tokens for a context of {context} and {steps} steps")
    tokens = list(tokens[: context + steps * (gamma + 1) + 1])
    engine = Engine(target, draft, max_len=len(tokens) + gamma + 2, config=EngineConfig(gamma=gamma))
    engine.prefill(0, tokens[:context])
    stats = {name: GenerationStats() for name in observers}
    for observer in observers.values():
        observer.policy.reset()
    start = context
    for _ in range(steps):
        block = tokens[start : start + gamma + 2]
        block += [0] * (gamma + 2 - len(block))  # the last label past the text is never scored here
        engine.forced_step([block], observers)
        for name, observer in observers.items():
            observer.end_step(stats[name])
        start += gamma + 1
    return stats


@dataclass(frozen=True)
class RecallSettings(GridSettings):
    """What ``sts recall`` compares: methods x budgets, over ``steps`` verify steps after ``context`` tokens."""

    #: Selection method names (see :func:`~sts.eval.harness.parse_methods`; a dense one is refused); None: every
    #: selection method.
    methods: tuple[str, ...] | None = ("sts", "streaming", "quest", "specpc", "oracle")
    context: int = 4096
    #: Verify steps measured per text.
    steps: int = 8
    #: Tokens skipped at the start of each text (headers).
    skip_tokens: int = 0

    def method_specs(self) -> list[MethodSpec]:
        """Return the selection methods to compare, after refusing impossible settings (before loading models)."""
        specs = super().method_specs()
        if self.methods is None:  # every method: the selection ones
            specs = [s for s in specs if s.sparse]
        dense = [s.name for s in specs if not s.sparse]
        if dense or not specs:
            raise STSError("sts recall compares selection methods (which rows each keeps), not "
                           f"{', '.join(dense) or 'none'}: name sparse methods only")
        if any(s.draft_budget is not None or s.gamma is not None for s in specs):
            raise STSError("sts recall scores every method with one dense draft and --gamma: "
                           "/draft_budget and /gamma apply to sts eval")
        if self.context < 1 or self.steps < 1 or self.skip_tokens < 0:
            raise STSError(f"context and steps must be >= 1, skipped tokens >= 0; got context {self.context}, "
                           f"steps {self.steps}, skipped tokens {self.skip_tokens}")
        return specs


def recall_outputs(out: str | Path) -> tuple[Path, Path]:
    """Return the JSON file ``out`` and the markdown table's file beside it (``out`` with the suffix ``.md``), both
    writable (:func:`~sts.eval.output.output_file`); an ``out`` ending in ``.md`` is refused, since the table
    would overwrite it."""
    json_file = output_file(out)
    if json_file.suffix == ".md":
        raise STSError(f"--out {out} is the JSON results file and its table is written beside it as .md: "
                       "name a .json file")
    return json_file, output_file(json_file.with_suffix(".md"))


def run_recall(target: LoadedModel, draft: LoadedModel, text_files: Sequence[str | TextFile], out: str | Path,
               settings: RecallSettings = RecallSettings(), header: str = "") -> list[dict]:
    """Return one row per (method, budget), mean over the texts (paths, or files already read:
    :func:`sts.eval.text.read_text_files`), after writing them as JSON to ``out`` and as a markdown table
    beside it (:func:`recall_outputs`)."""
    specs = settings.method_specs()
    if target.tokenizer is None:
        raise STSError("sts recall needs the target's tokenizer to read the text files")
    out, table = recall_outputs(out)
    s = settings
    rows: dict[str, dict] = {}
    texts = read_token_texts(text_files, target.tokenizer, s.skip_tokens)
    names = [f.path if isinstance(f, TextFile) else f for f in text_files]
    with tqdm(list(zip(names, texts)), desc="texts", file=sys.stderr) as bar:  # closed on errors too
        for name, ids in bar:
            observers = {}
            for spec in specs:
                for budget in s.budgets:
                    config = SelectionConfig(budget=budget, sink=s.sink, window=s.window)
                    policy = make_policy(spec.method, config, target.model, draft.model, spec.mapping, **spec.policy_options())
                    observers[f"{spec.name}|{budget:g}"] = SelectiveAttention(policy, measure_recall=True)
            stats = shadow_recall(target.model, draft.model, ids, s.context, s.gamma, s.steps, observers)
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
    text = json.dumps({"header": header, "context": s.context, "steps": s.steps, "rows": list(rows.values())}, indent=1)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    markdown = (header.strip() + "\n\n" if header.strip() else "") + recall_table(list(rows.values()))
    atomic_write(table, lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    return list(rows.values())


def recall_table(rows: list[dict]) -> str:
    """Return a markdown table of recall rows, grouped by budget (methods in their given order)."""
    lines = ["| budget | method | mass recall | mass recall / context mass | set recall@32 | set recall@64 | set recall@budget |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r["budget"]):
        sr = row["set_recall"]
        lines.append(f"| {row['budget']:g} | {row['method']} | {row['recall']:.3f} | {row['recall_context']:.3f} | "
                     f"{sr['32']:.3f} | {sr['64']:.3f} | {sr['budget']:.3f} |")
    return "\n".join(lines) + "\n"
