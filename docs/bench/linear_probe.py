"""Micro: one-row linear layers in CUDA graphs, cuBLAS (F.linear) against sts's Triton kernel (sts.models.triton_linear).

Shapes of the synthetic Llama 8B target / 1B draft and the Qwen2.5 1.5B / 0.5B demo pair. Each call reads
a different copy of its weight (at least 384 MB of copies in all, so the 50 MB L2 never holds the next one),
as a model's layers do. Prints and writes $OUT/linear-probe.json: us per call and TB/s of weight bytes.

    [ONLY=substring] python docs/bench/linear_probe.py [configs]   # configs: block_n/block_k/warps/stages,...
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from sts.models.transformer import swiglu
from sts.models.triton_linear import LinearConfig, gemv

OUT = os.environ.get("OUT", "/tmp")
SHAPES = {  # name: (N, K)
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
    "1b.lm_head": (128256, 2048),
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "q0.5b.qkv": (1152, 896), "q0.5b.o": (896, 896), "q0.5b.gate_up": (9728, 896), "q0.5b.down": (896, 4864),
    "q1.5b.qkv": (2048, 1536), "q1.5b.o": (1536, 1536), "q1.5b.gate_up": (17920, 1536), "q1.5b.down": (1536, 8960),
}


def timed(calls, reps=10):
    """Return us per call of ``calls`` (a list of thunks) replayed in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / len(calls)


def main():
    configs = [LinearConfig(*map(int, c.split("/"))) for c in (sys.argv[1].split(",") if len(sys.argv) > 1 else [])]
    configs = configs or [LinearConfig()]
    res = []
    only = os.environ.get("ONLY", "")
    for name, (n, k) in SHAPES.items():
        if only not in name:
            continue
        nbytes = n * k * 2
        copies = max(2, min(64, -(-384 * 2**20 // nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        m = 1
        fold = name.endswith("down")  # SwiGLU folded into the down projection (the model's use)
        x = torch.randn(m, 2 * k if fold else k, device="cuda", dtype=torch.bfloat16)
        if fold:
            gate, up = x.chunk(2, dim=-1)
            ref_calls = [lambda w=w: F.linear(swiglu(gate, up), w) for w in ws]
            ref = F.linear(swiglu(gate, up), ws[0])
        else:
            ref_calls = [lambda w=w: F.linear(x, w) for w in ws]
            ref = F.linear(x, ws[0])
        row = {"shape": name + ("+swiglu" if fold else ""), "n": n, "k": k, "rows": m, "mb": round(nbytes / 1e6, 1),
               "cublas_us": round(timed(ref_calls), 2)}
        timings = []
        for cfg in configs:
            key = f"{cfg.block_n}/{cfg.block_k}/{cfg.num_warps}/{cfg.num_stages}"
            try:
                out = gemv(x, ws[0], swiglu=fold, config=cfg)
                us = timed([lambda w=w: gemv(x, w, swiglu=fold, config=cfg) for w in ws])
            except Exception as e:  # a config past the shared memory
                row[key] = type(e).__name__
                continue
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[key] = round(us, 2)
            row[key + "_err"] = float(f"{err:.2e}")
            timings.append((us, key))
        best = min(timings)
        row["best"] = best[1]
        row["cublas_tbs"] = round(nbytes / row["cublas_us"] / 1e6, 2)
        row["best_tbs"] = round(nbytes / best[0] / 1e6, 2)
        row["speedup"] = round(row["cublas_us"] / best[0], 3)
        print(json.dumps(row), flush=True)
        res.append(row)
        del ws
    with open(os.path.join(OUT, "linear-probe.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": res}, f, indent=1)


if __name__ == "__main__":
    main()
