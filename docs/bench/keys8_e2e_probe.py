"""Probe: STS's ``key_bits=8`` through `sts bench e2e`, with the prompt's mean key fixed as the product does
(``centred``) and with :meth:`KVCache.centre` made a no-op (``no-centre``: the 8-bit copy then holds K minus zero,
and no eager kernels run between the prefills and the graphed rounds; an eager kernel before the rounds slowed every
graph replay once, docs/benchmarks.md "Dense rounds at parity"), and with the centring followed by an eager draft
forward of 16 tokens into scratch rows past the prompt (``centred+forward``: does a forward end that state?).

    OUT=. python docs/bench/keys8_e2e_probe.py centred,no-centre -- --contexts 32768 --batches 16 --new-tokens 128 \\
        --gamma 4 --agreement 0.9274 --sparse-draft-agreement 0.9018 --methods sts+sd-scored-all/key_bits=8

Each variant appends its records to $OUT/keys8-<variant>.jsonl.
"""
import os
import sys

import torch

from sts.bench import e2e
from sts.engine import Engine
from sts.models.transformer import KVCache

variants, argv = sys.argv[1].split(","), sys.argv[sys.argv.index("--") + 1:]
centre, prefill_steps = KVCache.centre, Engine.prefill_steps


def then_forward(self, slot, prompt, *args, **kwargs):
    """Engine.prefill_steps, with an eager draft forward of 16 tokens into scratch rows after the prefill."""
    for step in prefill_steps(self, slot, prompt, *args, **kwargs):
        if step is not None:
            ids = torch.zeros(1, 16, dtype=torch.long, device=self.device)
            self.draft.hidden(ids, torch.tensor([len(prompt) + self.gamma + 2], device=self.device), slot=slot)
        yield step


for name in variants:
    KVCache.centre = centre if name.startswith("centred") else (lambda self, slot, rows: None)
    Engine.prefill_steps = then_forward if name == "centred+forward" else prefill_steps
    print(f"== {name}", file=sys.stderr, flush=True)
    e2e.main(argv + ["--out", os.path.join(os.environ["OUT"], f"keys8-{name}.jsonl")])
