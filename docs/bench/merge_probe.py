"""Probe (negative results of 2026-12-01, docs/benchmarks.md): the verify kernel with the merge folded into its last
program ("new") against sts's split kernel + merge kernel ("old"), over rows in score order (random positions)
against rows sorted by position; the re-rank over candidates in either order; a split-count sweep of both.

    git show b409ac4:src/sts/attention/triton_verify.py > /tmp/base.py    # the kernel the records ran against
    patch -o /tmp/fused_verify.py /tmp/base.py docs/bench/fused-merge.patch
    PYTHONPATH=src [ONLY_SWEEP=1] [STS_MERGE_SPLITS=8] python docs/bench/merge_probe.py   # writes $OUT/probe.json

(After b409ac4 the product kernel cuts gathered rows of head dim <= 64 into more slices, so "old" differs there.)
"""
import importlib.util, json, os, sys
import torch
from sts.bench.kernels import time_calls
from sts.attention import triton_verify as old
spec = importlib.util.spec_from_file_location("fused_verify", os.environ.get("FUSED", "/tmp/fused_verify.py"))
new = importlib.util.module_from_spec(spec); sys.modules["fused_verify"] = new; spec.loader.exec_module(new)
from sts.attention.triton_rerank import rerank_rows_triton

torch.manual_seed(0)
dev = "cuda"
out = []
CASES = [] if os.environ.get("ONLY_SWEEP") else [  # name, B, Hq, Hkv, T, D, S, K
    ("draft-b1-128k", 1, 32, 8, 1, 64, 131072, 4096),
    ("draft-b16-32k", 16, 32, 8, 1, 64, 32768, 4096),
    ("verify-b1-128k", 1, 32, 8, 5, 128, 131072, 512),
    ("verify-b16-32k", 16, 32, 8, 5, 128, 32768, 512),
    ("verify-b1-128k-10pct", 1, 32, 8, 5, 128, 131072, 13107),
]
N = 12
for name, B, Hq, Hkv, T, D, S, K in CASES:
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(B, Hkv, S + 8, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(B, Hkv, S + 8, D, device=dev, dtype=torch.bfloat16)
    start = torch.full((B,), S, device=dev, dtype=torch.long)
    idx = [torch.rand(B, Hkv, S, device=dev).topk(K, dim=-1).indices for _ in range(N)]  # score order = random
    srt = [i.sort(-1).values for i in idx]
    ref = old.sparse_verify_attention(q, kc, vc, start, idx[0])
    got = new.sparse_verify_attention(q, kc, vc, start, idx[0])
    got_s = new.sparse_verify_attention(q, kc, vc, start, srt[0])
    err = float((got.float() - ref.float()).abs().max()); err_s = float((got_s.float() - ref.float()).abs().max())
    row = dict(case=name, B=B, K=K, S=S, D=D, T=T, max_abs_new_vs_old=err, max_abs_sorted_vs_old=err_s,
               splits=new.split_count(K, B * Hkv, q.device, 64, min_rows=32))
    for label, mod, ids in (("old-random", old, idx), ("new-random", new, idx), ("old-sorted", old, srt), ("new-sorted", new, srt)):
        us, mode = time_calls([lambda i=i, m=mod: m.sparse_verify_attention(q, kc, vc, start, i) for i in ids])
        row[label] = round(us, 2)
    bytes_ = B * Hkv * K * D * 2 * 2
    row["bytes_MB"] = round(bytes_ / 1e6, 2)
    row["new-sorted TB/s"] = round(bytes_ / row["new-sorted"] / 1e6, 2)
    row["new-random TB/s"] = round(bytes_ / row["new-random"] / 1e6, 2)
    print(json.dumps(row), flush=True); out.append(row)

# Re-rank with candidates in score order (random positions) vs sorted by position.
RR = [] if os.environ.get("ONLY_SWEEP") else [("rerank-b1-128k", 1, 131072, 512, 4), ("rerank-b16-32k", 16, 32768, 512, 4), ("rerank-b1-128k-10pct", 1, 131072, 13107, 8)]
for name, B, S, budget, width in RR:
    Hq, Hkv, T, D, sink, window = 32, 8, 5, 128, 4, 64
    free = budget - sink - window
    C = width * free
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(B, Hkv, S + 8, D, device=dev, dtype=torch.bfloat16)
    start = torch.full((B,), S, device=dev, dtype=torch.long)
    cands = [torch.rand(B, Hkv, S - window - sink, device=dev).topk(C, dim=-1).indices + sink for _ in range(N)]
    usable = torch.ones(B, Hkv, C, device=dev, dtype=torch.bool)
    row = dict(case=name, B=B, C=C, budget=budget)
    a = rerank_rows_triton(q, kc, cands[0], usable, start, sink, window, budget, True).sort(-1).values
    b = rerank_rows_triton(q, kc, cands[0].sort(-1).values, usable, start, sink, window, budget, True).sort(-1).values
    row["same_rows_sorted_vs_random"] = float((a == b).float().mean())
    for label, cs in (("random", cands), ("sorted", [c.sort(-1).values for c in cands])):
        us, mode = time_calls([lambda c=c: rerank_rows_triton(q, kc, c, usable, start, sink, window, budget, True) for c in cs])
        row[label] = round(us, 2)
    print(json.dumps(row), flush=True); out.append(row)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"), indent=1)

# Split-count sweep, old vs new, at the batch-1 shapes.
for name, B, Hq, Hkv, T, D, S, K in [("draft-b1-128k", 1, 32, 8, 1, 64, 131072, 4096), ("verify-b1-128k", 1, 32, 8, 5, 128, 131072, 512),
                                    ("verify-b1-128k-10pct", 1, 32, 8, 5, 128, 131072, 13107), ("draft-b4-128k", 4, 32, 8, 1, 64, 131072, 4096)]:
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(B, Hkv, S + 8, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(B, Hkv, S + 8, D, device=dev, dtype=torch.bfloat16)
    start = torch.full((B,), S, device=dev, dtype=torch.long)
    idx = [torch.rand(B, Hkv, S, device=dev).topk(K, dim=-1).indices for _ in range(N)]
    ref = old.sparse_verify_attention(q, kc, vc, start, idx[0])
    row = dict(case=name)
    for ns in (None, 2, 4, 8, 16, 33, 64):
        for label, mod in (("old", old), ("new", new)):
            cfg = mod.KernelConfig(num_splits=ns)
            got = mod.sparse_verify_attention(q, kc, vc, start, idx[0], config=cfg)
            assert float((got.float() - ref.float()).abs().max()) < 1e-2
            us, _ = time_calls([lambda i=i: mod.sparse_verify_attention(q, kc, vc, start, i, config=cfg) for i in idx])
            row[f"{label}-{ns}"] = round(us, 2)
    print(json.dumps(row), flush=True); out.append(row)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"), indent=1)
