"""Diagnostic: device time of each kernel of one re-rank call (radix path past 16384 candidates), 128K context.

    PYTHONPATH=src python docs/bench/rerank_profile.py [budget ...]    # writes $OUT/rerank-profile[-TAG].json

Environment: CHUNK, the radix path's candidates per program (default the module's); BLOCK_N, the logits kernel's
tile (set before the kernels compile); KEY_TILE, the logits the key kernel holds at once; TAG, a name for the record.
"""
import json
import os
import sys

import torch
import triton.language as tl

import sts.attention.triton_rerank as tr
from sts.attention.triton_rerank import rerank_rows_triton
from sts.bench.kernels import BF16, RERANK, TARGET, random_indices
from sts.bench.profile import kernel_times

CALLS = 20
if "BLOCK_N" in os.environ:
    tr.BLOCK_N = int(os.environ["BLOCK_N"])
    tr.LOGIT_TILE = tl.constexpr(tr.BLOCK_N)
if "KEY_TILE" in os.environ:
    tr._KEY_TILE = int(os.environ["KEY_TILE"])
chunk = int(os.environ["CHUNK"]) if "CHUNK" in os.environ else None
tag = os.environ.get("TAG", "")
budgets = [int(x) for x in sys.argv[1:]] or [13107]
hq, hkv, d, t = TARGET["hq"], TARGET["hkv"], TARGET["d"], TARGET["t"]
ctx, sink, window = 131072, RERANK["sink"], RERANK["window"]
report = []
for b in (1, 4):
    for budget in budgets:
        n_cand = RERANK["mult"] * (budget - sink - window)
        k = torch.randn(b, hkv, ctx + 64, d, device="cuda", dtype=BF16)
        q = torch.randn(b, hq, t, d, device="cuda", dtype=BF16)
        start = torch.full((b,), ctx, device="cuda")
        usable = torch.ones(b, hkv, n_cand, device="cuda", dtype=torch.bool)
        cands = [random_indices(b, hkv, ctx, n_cand).long() for _ in range(4)]

        def run() -> None:
            for i in range(CALLS):
                rerank_rows_triton(q, k, cands[i % 4], usable, start, sink, window, budget, True,
                                   chunk=chunk if n_cand > tr.MAX_CANDIDATES else None)

        run()
        torch.cuda.synchronize()
        _, rows = kernel_times(run, torch.device("cuda"))
        rows = [{**r, "us_per_call": round(r["us"] / CALLS, 2)} for r in rows]
        total = round(sum(r["us_per_call"] for r in rows), 1)
        report.append({"batch": b, "budget": budget, "candidates": n_cand, "chunk": chunk, "block_n": tr.BLOCK_N,
                       "key_tile": tr._KEY_TILE,
                       "us_per_call": total, "kernels": rows})
        print(f"{tag} b={b} budget={budget} C={n_cand} chunk={chunk} block_n={tr.BLOCK_N}: {total} us")
        for r in rows[:12]:
            print(f"  {r['us_per_call']:8.2f} us  x{r['calls'] // CALLS}  {r['name'][:90]}")
name = f"rerank-profile{'-' + tag if tag else ''}.json"
json.dump(report, open(os.path.join(os.environ.get("OUT", "."), name), "w"), indent=1)
