"""Probe: STS's early scoring (each draft layer's score pass on a second stream during the draft's last step) against
scoring in the select phase, and with every graph captured on a high-priority stream, through `sts bench e2e`.

    OUT=. python docs/bench/early_probe.py late,early,early-priority -- --contexts 131072 --batches 1 \\
        --new-tokens 256 --gamma 4 --agreement 0.9274 --sparse-draft-agreement 0.9018 --methods sts+sd-scored-all

Each variant appends its records to $OUT/early-<variant>.jsonl. "late" turns the engine's early scoring off (the
select phase scores the context, as before it); "early-priority" captures the rounds on a stream of the highest
priority, so that the side stream's kernels (priority 0) yield SMs to the draft's when both wait; a suffix "-s<N>"
runs each score pass in N splits per (sequence, KV head) (default: four programs an SM), leaving SMs to the draft.
"""
import os
import sys

import torch

from sts.attention import triton_scores
from sts.bench import e2e
from sts.engine import Engine

variants, argv = sys.argv[1].split(","), sys.argv[sys.argv.index("--") + 1:]
init, splits = Engine.__init__, triton_scores.split_count
for name in variants:
    fixed = int(name.rpartition("-s")[2]) if "-s" in name else None
    triton_scores.split_count = (lambda *a, _n=fixed, **k: _n) if fixed else splits
    def patched(self, *a, _early=not name.startswith("late"), **k):
        init(self, *a, **k)
        self.early_scoring = self.early_scoring and _early

    Engine.__init__ = patched
    low, high = torch.cuda.Stream.priority_range()
    torch.cuda.graphs.graph.default_capture_stream = torch.cuda.Stream(priority=high) if "priority" in name else None
    print(f"== {name} (stream priorities {low}..{high})", file=sys.stderr, flush=True)
    e2e.main(argv + ["--out", os.path.join(os.environ["OUT"], f"early-{name}.jsonl")])
