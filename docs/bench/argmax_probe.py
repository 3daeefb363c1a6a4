"""Micro: argmax over [B, V] logits in CUDA graphs: torch.argmax fp32 / bf16, two-stage reshape."""
import torch, json, os
out = os.environ.get("OUT", "/tmp")
res = {}


def two_stage(x, parts):
    b, v = x.shape
    vals, idx = x.view(b, parts, v // parts).max(-1)
    j = vals.argmax(-1, keepdim=True)
    return idx.gather(1, j).view(-1) + j.view(-1) * (v // parts)


def timed(fn, n=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n // 20):
        g.replay()
    b.record(); torch.cuda.synchronize()
    return round(a.elapsed_time(b) * 1e3 / n, 2)


for v, parts in ((128256, 128), (151936, 128)):
    for b in (1, 4, 16, 20):
        x = torch.randn(b, v, device="cuda")
        xb = x.bfloat16()
        ref = x.argmax(-1)
        assert torch.equal(two_stage(x, parts), ref)
        r = {"argmax_fp32": timed(lambda: x.argmax(-1)), "argmax_bf16": timed(lambda: xb.argmax(-1)),
             "float_then_argmax": timed(lambda: xb.float().argmax(-1)),
             "two_stage_fp32": timed(lambda: two_stage(x, parts)), "two_stage_bf16": timed(lambda: two_stage(xb, parts))}
        res[f"V{v}-B{b}"] = r
        print(v, b, r, flush=True)
json.dump(res, open(f"{out}/argmax.json", "w"), indent=1)
