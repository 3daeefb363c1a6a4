"""Plot the radix re-rank's device time per kernel, before and after the 8-bit digits (docs/benchmarks.md).

    python docs/bench/rerank_profile_plot.py docs/bench/rerank-profile-h200.json docs/bench/rerank-profile-h200.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

records = json.load(open(sys.argv[1]))
configs = [("before-11bit-95f18a3", "11-bit digits,\nfloat32 logits"), ("default", "8-bit, float16,\n2048 a chunk"),
           ("CHUNK-4096", "4096 a chunk\n(shipped)"), ("CHUNK-8192", "8192 a chunk")]
kernels = ["_logits_kernel", "_key_kernel", "radix_level_kernel", "_emit_kernel", "_lse_kernel", "count_kernel"]
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, batch in zip(axes, (1, 4)):
    bottoms = [0.0] * len(configs)
    for kernel in kernels:
        heights = []
        for tag, _ in configs:
            run = next(r for r in records if r["config"] == tag and r["batch"] == batch and r["budget"] == 13107)
            heights.append(sum(k["us_per_call"] for k in run["kernels"] if k["name"] == kernel))
        ax.bar([label for _, label in configs], heights, bottom=bottoms, label=kernel.strip("_").replace("_kernel", ""))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_title(f"batch {batch}: 52156 candidates x 8 KV heads")
    ax.set_ylabel("device time per call (us)")
axes[1].legend(fontsize=8, loc="upper right")
fig.suptitle("Radix re-rank on an H200, 8-bit digits and float16 offsets (2026-12-01)")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
