"""Probe: STS's score pass over 16-bit draft keys against the 8-bit copy of ``key_bits=8``, kernel alone (CUDA graphs),
pass 1 alone (pass 2 skipped: ``pass1``) and whole, and the draft's cache write with and without the copy; the 1B
draft's shapes (8 KV heads, 32 query heads, gamma 4, head dim 64).

    OUT=. python docs/bench/keys8_probe.py      # writes $OUT/keys8-probe.json

Records: bench/keys8-probe-widen-h200.json (tree of 3b2ed92: each 8-bit K tile widened to bf16 in the kernel) and
bench/keys8-probe-h200.json (the queries rounded to float8 and one float8 product per tile, as committed).
"""
import json
import os

import torch

from sts.attention import triton_scores
from sts.attention.triton_scores import context_scores_triton
from sts.bench.kernels import copies, time_calls
from sts.models.transformer import SCORE_KEY_DTYPE, rope_and_store

HQ, HKV, G, D = 32, 8, 4, 64


class Skip:
    """Stands in for a Triton kernel: launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


probs_kernel = triton_scores._score_probs_kernel
records = []
for b, ctx in ((1, 131072), (16, 32768), (4, 131072)):
    q = torch.randn(b, HQ, G, D, device="cuda", dtype=torch.bfloat16)
    start = torch.full((b,), ctx, device="cuda")
    for dtype in (torch.bfloat16, SCORE_KEY_DTYPE):
        size = dtype.itemsize
        keys = [torch.randn(b, HKV, ctx + 64, D, device="cuda").to(dtype) for _ in range(copies(b * HKV * ctx * D * size))]
        key_bytes = b * HKV * ctx * D * size
        for op, kernel in (("scores", probs_kernel), ("pass1", Skip())):
            triton_scores._score_probs_kernel = kernel
            us, mode = time_calls([lambda k=k: context_scores_triton(q, k, start, max_heads=True) for k in keys])
            records.append(dict(op=op, batch=b, context=ctx, keys=str(dtype), us=round(us, 1), key_gb=key_bytes / 1e9,
                                key_tbps=round(key_bytes / us / 1e6, 2), mode=mode))
            print(records[-1], flush=True)
        triton_scores._score_probs_kernel = probs_kernel
        del keys
    # The draft's cache write of one step (T = 1) at this batch, with and without the 8-bit copy.
    cache = [torch.zeros(b, HKV, ctx + 64, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    copy8 = torch.zeros(b, HKV, ctx + 64, D, device="cuda", dtype=SCORE_KEY_DTYPE)
    mean = torch.zeros(b, HKV, D, device="cuda")
    qkv = [torch.randn(b, 1, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV)]
    cos, sin = (torch.randn(b, 1, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots, pos = torch.arange(b, device="cuda"), torch.full((b, 1), ctx, device="cuda")
    for label, extra in (("write", ()), ("write+copy", (copy8, mean))):
        us, mode = time_calls([lambda: rope_and_store(*qkv, cos, sin, *cache, slots, pos, *extra)] * 16)
        records.append(dict(op=label, batch=b, context=ctx, us=round(us, 2), mode=mode))
        print(records[-1], flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "keys8-probe.json"), "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)
