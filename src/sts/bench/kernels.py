"""Attention-kernel benchmarks on one CUDA GPU: ``python -m sts.bench.kernels --out rows.jsonl [--quick] [--tune]``.

Shapes: a Llama-3.1-8B layer for verification (Hq 32, Hkv 8, D 128, bf16, T = 5 new tokens)
and a Llama-3.2-1B-shaped draft for scoring (Hq 32, Hkv 8, D 64, G = 4 queries). Rows:

- ``sparse_verify``: our split-KV kernel over ``budget`` selected rows per KV head;
- ``dense_verify``: the same kernel with every context row (``indices=None``);
- ``sdpa``: stock ``scaled_dot_product_attention`` with 5 and with 1 query, flash and cuDNN
  backends, GQA through ``enable_gqa=True`` where the backend takes it, else K/V expanded to
  Hq heads beforehand (the row's note says which; expanding is not timed, but the kernel then
  reads 4x the bytes); no mask (the causal mask among the 5 new rows changes no bytes);
- ``scores``: the draft's context scores (K read once, its logits stored as float16 and read back), and ``topk`` of the budget over
  ``[B, Hkv, S]`` float32 scores;
- ``rerank``: the target's re-ranking of the draft's candidates (``4 x`` the free rows of a
  budget of 512: C = 1776 per KV head, T = 5 queries), our fused kernel and the PyTorch
  reference path; bytes are the candidates' K rows alone (what the kernel must gather).

Every row is timed as a CUDA graph replaying many calls in turn, on enough distinct caches and
index sets that each replay touches several times the 60 MB L2 (a real step streams other
layers' KV and weights between two calls of one layer). ``bytes`` is what the operation must
read and write at least: selected K and V rows (and the new rows), q and the output; GB/s and
the share of 4300 GB/s (the H200's device-to-device copy rate) are against those bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sts.attention.rerank import rerank_rows
from sts.attention.triton_rerank import rerank_rows_triton
from sts.attention.triton_scores import context_scores_triton
from sts.attention.triton_verify import KernelConfig, sparse_verify_attention, split_count
from sts.eval.output import output_file

HBM_GBPS = 4300.0
TOUCH_BYTES = 256 << 20  # bytes each timed graph replay touches: over 4x the L2
MAX_CALLS = 256
BF16 = torch.bfloat16
TARGET = dict(hq=32, hkv=8, d=128, t=5)
DRAFT = dict(hq=32, hkv=8, d=64, g=4)
RERANK = dict(sink=4, window=64, budget=512, mult=4)


@dataclass
class Row:
    """One timed operation: what ran, on which shape, how long, and the bytes it must move."""

    op: str
    impl: str
    batch: int
    context: int
    budget: int | None
    time_us: float
    bytes: int
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.time_us / 1e3

    def record(self) -> dict:
        """Return the row as a JSON-ready dict with GB/s and share of the copy bandwidth."""
        return {**asdict(self), "gbps": round(self.gbps, 1), "pct_of_4300": round(100 * self.gbps / HBM_GBPS, 1)}


def time_calls(calls: list[Callable[[], object]]) -> tuple[float, str]:
    """Return the median microseconds per call of ``calls`` run in turn, and how they ran.

    The calls are captured in one CUDA graph and replayed; if capture fails they run eagerly
    (then launch gaps count too, and the second value says so).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run: Callable[[], None] = graph.replay
    except RuntimeError as e:
        torch.cuda.synchronize()
        mode = f"eager ({str(e).splitlines()[0][:60]})"

        def run() -> None:
            for call in calls:
                call()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    start.record()
    run()
    end.record()
    end.synchronize()
    inner = max(1, int(4.0 / max(start.elapsed_time(end), 1e-3)))  # about 4 ms per sample
    samples = []
    for _ in range(7):
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (inner * len(calls)))
    return statistics.median(samples), mode


def copies(nbytes: int) -> int:
    """Return how many distinct input sets make a replay touch ``TOUCH_BYTES`` at least."""
    return max(1, min(MAX_CALLS, math.ceil(TOUCH_BYTES / max(nbytes, 1))))


def random_indices(b: int, hkv: int, n_ctx: int, k: int) -> torch.Tensor:
    """Return ``[B, Hkv, K]`` int32 distinct context rows in score order, as a top-k would give them."""
    return torch.rand(b, hkv, n_ctx, device="cuda").topk(k, dim=-1, sorted=False).indices.int()


def verify_bytes(b: int, rows: int) -> int:
    """Return the bytes a verify step must move: ``rows`` K and V rows per KV head, plus q and the output."""
    t, d = TARGET["t"], TARGET["d"]
    return 2 * b * TARGET["hkv"] * (rows + t) * d * 2 + 2 * b * TARGET["hq"] * t * d * 2


def bench_verify(b: int, ctx: int, budgets: Iterable[int], sdpa: bool, same_tokens: bool) -> list[Row]:
    """Return rows for sparse verify at each budget, dense verify and (optionally) stock SDPA at one shape.

    With ``same_tokens``, also dense verify over a context of each budget's length.
    """
    hq, hkv, d, t = TARGET["hq"], TARGET["hkv"], TARGET["d"], TARGET["t"]
    s = ctx + 64
    cache_bytes = 2 * b * hkv * s * d * 2
    caches = [
        tuple(torch.randn(b, hkv, s, d, device="cuda", dtype=BF16) for _ in range(2)) for _ in range(copies(cache_bytes))
    ]
    q = torch.randn(b, hq, t, d, device="cuda", dtype=BF16)
    start = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    rows: list[Row] = []
    for budget in budgets:
        nbytes = verify_bytes(b, budget)
        n = max(len(caches), copies(nbytes))
        idx = [random_indices(b, hkv, ctx, budget) for _ in range(n)]
        calls = [lambda i=i: sparse_verify_attention(q, *caches[i % len(caches)], start, idx[i]) for i in range(n)]
        us, mode = time_calls(calls)
        rows.append(Row("sparse_verify", "triton", b, ctx, budget, us, nbytes, mode))
        del idx
    if same_tokens:  # dense attention over as many tokens as each budget, for comparison
        for budget in budgets:
            short = torch.full((b,), budget, device="cuda", dtype=torch.int32)
            us, mode = time_calls([lambda kv=kv: sparse_verify_attention(q, *kv, short) for kv in caches])
            rows.append(Row("dense_verify", "triton", b, budget, None, us, verify_bytes(b, budget), mode))
    dense_calls = [lambda kv=kv: sparse_verify_attention(q, *kv, start) for kv in caches]
    us, mode = time_calls(dense_calls)
    rows.append(Row("dense_verify", "triton", b, ctx, None, us, verify_bytes(b, ctx), mode))
    if sdpa:
        rows += bench_sdpa(b, ctx, caches)
    return rows


def bench_sdpa(b: int, ctx: int, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Row]:
    """Return rows for stock SDPA (flash and cuDNN, 5 and 1 queries) over the whole context."""
    hq, hkv, d = TARGET["hq"], TARGET["hkv"], TARGET["d"]
    rows = []
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
        for t in (TARGET["t"], 1):
            q = torch.randn(b, hq, t, d, device="cuda", dtype=BF16)
            nbytes = 2 * b * hkv * (ctx + t) * d * 2 + 2 * b * hq * t * d * 2
            views = [(k[:, :, : ctx + t], v[:, :, : ctx + t]) for k, v in caches]
            how = "enable_gqa"
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, *views[0], enable_gqa=True)
                kvs, gqa = views, True
            except RuntimeError:
                how = "K/V expanded to Hq heads (reads 4x)"
                kvs = [(k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)) for k, v in views[:1]]
                gqa = False

            def call(kv: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor = q, gqa: bool = gqa) -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, *kv, enable_gqa=gqa)

            try:
                us, mode = time_calls([lambda kv=kv: call(kv) for kv in kvs])
                rows.append(Row(f"{name}_T{t}", "torch", b, ctx, None, us, nbytes, f"{how}; {mode}"))
            except RuntimeError as e:
                print(f"# {name} T={t} B={b} ctx={ctx} failed: {str(e).splitlines()[0]}", file=sys.stderr)
            del kvs
    return rows


def bench_scores(b: int, ctx: int, budgets: Iterable[int]) -> list[Row]:
    """Return rows for the draft's context scores and for top-k of each budget at one shape."""
    hq, hkv, d, g = DRAFT["hq"], DRAFT["hkv"], DRAFT["d"], DRAFT["g"]
    s = ctx + 64
    caches = [torch.randn(b, hkv, s, d, device="cuda", dtype=BF16) for _ in range(copies(b * hkv * s * d * 2))]
    q = torch.randn(b, hq, g, d, device="cuda", dtype=BF16)
    start = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    nbytes = b * hkv * ctx * d * 2 + b * hq * s * 4 + q.numel() * 2
    us, mode = time_calls([lambda k=k: context_scores_triton(q, k, start) for k in caches])
    rows = [Row("scores", "triton", b, ctx, None, us, nbytes, f"reads K once, logits stored and read back; {mode}")]
    del caches
    # Top-k over scores already reduced to the target's KV heads, as the selection would.
    score_sets = [torch.randn(b, TARGET["hkv"], s, device="cuda") for _ in range(copies(b * TARGET["hkv"] * s * 4))]
    for budget in budgets:
        calls = [lambda x=x: torch.topk(x, budget, dim=-1, sorted=False) for x in score_sets]
        us, mode = time_calls(calls)
        rows.append(Row("topk", "torch", b, ctx, budget, us, score_sets[0].numel() * 4, mode))
    return rows


def bench_rerank(b: int, ctx: int, budget: int = RERANK["budget"]) -> list[Row]:
    """Return rows for re-ranking ``mult`` x the free rows of the budget, fused kernel and reference, at one shape
    (past ``MAX_CANDIDATES`` candidates the kernel's radix path)."""
    hq, hkv, d, t = TARGET["hq"], TARGET["hkv"], TARGET["d"], TARGET["t"]
    sink, window = RERANK["sink"], RERANK["window"]
    n_cand = RERANK["mult"] * (budget - sink - window)
    k = torch.randn(b, hkv, ctx + 64, d, device="cuda", dtype=BF16)
    q = torch.randn(b, hq, t, d, device="cuda", dtype=BF16)
    start = torch.full((b,), ctx, device="cuda")
    nbytes = b * hkv * n_cand * d * 2
    # Distinct candidate sets, so that a replay gathers several times the L2's worth of rows.
    cands = [random_indices(b, hkv, ctx, n_cand).long() for _ in range(copies(nbytes))]
    usable = torch.ones(b, hkv, n_cand, device="cuda", dtype=torch.bool)
    rows = []
    for impl, fn in (("triton", rerank_rows_triton), ("torch", rerank_rows)):
        calls = [lambda c=c, fn=fn: fn(q, k, c, usable, start, sink, window, budget, True) for c in cands]
        us, mode = time_calls(calls)
        rows.append(Row("rerank", impl, b, ctx, budget, us, nbytes, f"C={n_cand}, prob; {mode}"))
    return rows


def bench_copy() -> Row:
    """Return the device-to-device copy of 2 GB: the bandwidth ceiling, counting bytes read and written."""
    x = torch.randn(1 << 30, device="cuda", dtype=BF16)
    y = torch.empty_like(x)
    us, mode = time_calls([lambda: y.copy_(x)])
    return Row("d2d_copy", "torch", 1, 0, None, us, 2 * x.numel() * 2, mode)


def tune() -> list[Row]:
    """Return rows sweeping block size, warps, (for scores) stages and the split count on key shapes."""
    hq, hkv, d, t = TARGET["hq"], TARGET["hkv"], TARGET["d"], TARGET["t"]
    rows = []

    def sweep(op: str, b: int, ctx: int, budget: int | None, nbytes: int, n_rows: int, configs, run) -> None:
        for bn, w, st in configs:
            auto = split_count(n_rows, b * hkv, torch.device("cuda"), bn)
            for splits in sorted({max(1, auto // 4), max(1, auto // 2), auto, 2 * auto}):
                cfg = KernelConfig(block_n=bn, num_warps=w, num_stages=st, num_splits=splits)
                try:
                    us, _ = time_calls(run(cfg))
                except triton.runtime.errors.OutOfResources:  # too much shared memory: skip
                    continue
                note = f"block_n={bn} warps={w} stages={st} splits={splits}{' (auto)' if splits == auto else ''}"
                rows.append(Row(op, "triton", b, ctx, budget, us, nbytes, note))
                print(rows[-1].record(), flush=True)

    verify_configs = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3)]
    shapes = ((1, 131072, 2048), (8, 32768, 2048), (8, 32768, 4096), (1, 131072, 512), (1, 131072, None), (8, 32768, None))
    for b, ctx, budget in shapes:
        k = torch.randn(b, hkv, ctx + 64, d, device="cuda", dtype=BF16)
        v = torch.randn_like(k)
        q = torch.randn(b, hq, t, d, device="cuda", dtype=BF16)
        start = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        n_rows = budget or ctx + 64
        nbytes = verify_bytes(b, budget or ctx)
        idx = [random_indices(b, hkv, ctx, budget) for _ in range(copies(nbytes))] if budget else [None]

        def run(cfg: KernelConfig) -> list[Callable[[], object]]:
            return [lambda i=i: sparse_verify_attention(q, k, v, start, i, config=cfg) for i in idx]

        sweep("sparse_verify" if budget else "dense_verify", b, ctx, budget, nbytes, n_rows, verify_configs, run)
        del k, v, idx
    score_configs = [(bn, w, st) for bn in (64, 128) for w in (4, 8) for st in (2, 3)]
    for b, ctx in ((1, 131072), (8, 32768)):
        hq_d, hkv_d, d_d, g = DRAFT["hq"], DRAFT["hkv"], DRAFT["d"], DRAFT["g"]
        k = torch.randn(b, hkv_d, ctx + 64, d_d, device="cuda", dtype=BF16)
        q = torch.randn(b, hq_d, g, d_d, device="cuda", dtype=BF16)
        start = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        nbytes = b * hkv_d * ctx * d_d * 2 + b * hq_d * (ctx + 64) * 4

        def run(cfg: KernelConfig) -> list[Callable[[], object]]:
            return [lambda: context_scores_triton(q, k, start, config=cfg)]

        sweep("scores", b, ctx, None, nbytes, ctx + 64, score_configs, run)
        del k
    return rows


def markdown(rows: list[Row]) -> str:
    """Return the rows as a markdown table."""
    head = (
        "| op | impl | B | context | budget | time (us) | MB moved | GB/s | % of 4.3 TB/s | note |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.op} | {r.impl} | {r.batch} | {r.context} | {r.budget or '-'} | {r.time_us:.1f} | {r.bytes / 1e6:.1f} "
        f"| {r.gbps:.0f} | {100 * r.gbps / HBM_GBPS:.0f}% | {r.note} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark grid (or the tuning sweep) and write JSON lines and a markdown table."""
    parser = argparse.ArgumentParser(prog="sts bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON-lines output path")
    parser.add_argument("--md", help="markdown table output path (default: printed only)")
    parser.add_argument("--quick", action="store_true", help="contexts 8K and 128K, budgets 256 and 2048")
    parser.add_argument("--tune", action="store_true", help="sweep launch configurations instead")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the stock SDPA rows")
    parser.add_argument("--rerank", action="store_true",
                        help="only the re-ranking rows: 128K, batch 1 and 4, budgets 512 and 10%% (13107)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmarks need a CUDA GPU")
    for path in (args.out, args.md):  # unusable output paths fail before the kernels run
        if path:
            output_file(path)
    torch.manual_seed(0)
    contexts = (8192, 131072) if args.quick else (8192, 32768, 65536, 131072)
    budgets = (256, 2048) if args.quick else (256, 512, 1024, 2048, 4096)
    rows = [bench_copy()]
    if args.tune:
        rows += tune()
    elif args.rerank:
        rows += [row for b in (1, 4) for budget in (512, 13107) for row in bench_rerank(b, 131072, budget)]
    else:
        for b in (1, 8):
            for ctx in contexts:
                rows += bench_verify(b, ctx, budgets, sdpa=not args.no_sdpa, same_tokens=ctx == contexts[0])
                rows += bench_scores(b, ctx, budgets)
                rows += bench_rerank(b, ctx)
                torch.cuda.empty_cache()
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(args.out, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        f.writelines(json.dumps(r.record()) + "\n" for r in rows)
    table = markdown(rows)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
