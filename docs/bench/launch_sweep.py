"""Diagnostic: launch configs of the split-KV verify kernel (draft and target shapes) and the score kernels, timed in CUDA graphs."""
import itertools, json, os, sys
import torch
from sts.attention.triton_verify import KernelConfig, sparse_verify_attention, split_count
from sts.attention.triton_scores import context_scores_triton

dev = torch.device("cuda")
out = os.environ.get("OUT", "/tmp")
res = []

def timed(fn, reps=10, iters=20):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(reps):
                fn()
    torch.cuda.synchronize()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * iters)

def verify_case(name, B, Hq, Hkv, D, T, K, S=131200):
    ctx = S - 64
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16)
    start = torch.full((B,), ctx, device=dev, dtype=torch.long)
    idx = torch.stack([torch.randperm(ctx, device=dev)[:K].sort().values for _ in range(B * Hkv)]).view(B, Hkv, K)
    ref = sparse_verify_attention(q, k, v, start, idx)
    nbytes = B * Hkv * K * D * 2 * 2
    base = split_count(K, B * Hkv, dev, 64)
    for splits, bn, w, st in itertools.product([None, 4, 8, 16], [32, 64], [2, 4], [2, 3]):
        cfg = KernelConfig(block_n=bn, num_warps=w, num_stages=st, num_splits=splits)
        try:
            o = sparse_verify_attention(q, k, v, start, idx, config=cfg)
            err = (o.float() - ref.float()).abs().max().item()
            us = timed(lambda: sparse_verify_attention(q, k, v, start, idx, config=cfg))
        except Exception as e:
            continue
        res.append({"case": name, "splits": splits, "block_n": bn, "warps": w, "stages": st, "us": us, "err": err, "GBps": nbytes / us / 1e3})
    rows = sorted([r for r in res if r["case"] == name], key=lambda r: r["us"])
    default = [r for r in res if r["case"] == name and r["splits"] is None and r["block_n"] == 64 and r["warps"] == 4 and r["stages"] == 3]
    print(name, "default", default[0] if default else None, "auto splits", base, flush=True)
    for r in rows[:6]:
        print("   ", r, flush=True)

def score_case(name, B, Hq, Hkv, D, G, S=131072):
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16)
    q = torch.randn(B, Hq, G, D, device=dev, dtype=torch.bfloat16)
    start = torch.full((B,), S - 8, device=dev, dtype=torch.long)
    ref = context_scores_triton(q, k, start)
    nbytes = 2 * B * Hkv * S * D * 2
    for per_sm, bn, w, st in itertools.product([2, 4, 8], [64, 128], [4, 8], [2, 3, 4]):
        splits = split_count(S, B * Hkv, dev, bn, per_sm=per_sm)
        cfg = KernelConfig(block_n=bn, num_warps=w, num_stages=st, num_splits=splits)
        try:
            o = context_scores_triton(q, k, start, config=cfg)
            fin = torch.isfinite(ref)
            err = ((o - ref).abs()[fin]).max().item()
            us = timed(lambda: context_scores_triton(q, k, start, config=cfg), reps=4, iters=10)
        except Exception as e:
            continue
        res.append({"case": name, "per_sm": per_sm, "splits": splits, "block_n": bn, "warps": w, "stages": st, "us": us, "err": err, "GBps": nbytes / us / 1e3})
    rows = sorted([r for r in res if r["case"] == name], key=lambda r: r["us"])
    default = [r for r in res if r["case"] == name and r["per_sm"] == 4 and r["block_n"] == 128 and r["warps"] == 4 and r["stages"] == 2]
    print(name, "default", default[0] if default else None, flush=True)
    for r in rows[:6]:
        print("   ", r, flush=True)

with torch.no_grad():
    which = sys.argv[1:] or ["draft1", "draft2", "target5", "target5b4", "score1", "score4"]
    if "draft1" in which: verify_case("draft1", 1, 32, 8, 64, 1, 4096)
    if "draft2" in which: verify_case("draft2", 1, 32, 8, 64, 2, 4096)
    if "target5" in which: verify_case("target5", 1, 32, 8, 128, 5, 512)
    if "target5b4" in which: verify_case("target5b4", 4, 32, 8, 128, 5, 512)
    if "draft1b4" in which: verify_case("draft1b4", 4, 32, 8, 64, 1, 4096)
    if "draft1b16" in which: verify_case("draft1b16", 16, 32, 8, 64, 1, 4096, S=32832)
    if "target5b16" in which: verify_case("target5b16", 16, 32, 8, 128, 5, 512, S=32832)
    if "score1" in which: score_case("score1", 1, 32, 8, 64, 5)
    if "score4" in which: score_case("score4", 4, 32, 8, 64, 5)
json.dump(res, open(f"{out}/sweep.json", "w"))
