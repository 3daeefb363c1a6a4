"""Probe: launch configurations of STS's score pass for 16-bit and 8-bit draft keys (1B draft shapes).

    OUT=. python docs/bench/keys8_sweep.py      # writes $OUT/keys8-sweep.json

Its record (bench/keys8-sweep-h200.json) is of the tree of 3b2ed92, where the kernel widened each 8-bit K tile to
bf16; the kernel now multiplies in float8 instead.
"""
import itertools
import json
import os

import torch

from sts.attention.triton_scores import context_scores_triton
from sts.attention.triton_verify import KernelConfig
from sts.bench.kernels import copies, time_calls

HQ, HKV, G, D = 32, 8, 4, 64
records = []
for b, ctx in ((16, 32768), (1, 131072)):
    q = torch.randn(b, HQ, G, D, device="cuda", dtype=torch.bfloat16)
    start = torch.full((b,), ctx, device="cuda")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        keys = [torch.randn(b, HKV, ctx + 64, D, device="cuda").to(dtype)
                for _ in range(copies(b * HKV * ctx * D * dtype.itemsize))]
        for block_n, stages, warps in itertools.product((64, 128, 256), (2, 3, 4), (4, 8)):
            cfg = KernelConfig(block_n=block_n, num_stages=stages, num_warps=warps)
            try:
                us, mode = time_calls([lambda k=k: context_scores_triton(q, k, start, max_heads=True, config=cfg)
                                       for k in keys])
            except Exception as e:  # e.g. out of shared memory
                us, mode = None, f"{type(e).__name__}: {str(e)[:80]}"
            records.append(dict(batch=b, context=ctx, keys=str(dtype), block_n=block_n, stages=stages, warps=warps,
                                us=us and round(us, 1), mode=mode))
            print(records[-1], flush=True)
        del keys
with open(os.path.join(os.environ.get("OUT", "."), "keys8-sweep.json"), "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)
