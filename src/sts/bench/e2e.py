"""End-to-end decode speed on the GPU: autoregressive vs dense speculative vs STS, in one process.

Speed depends on shapes, not weight values, so the models are Llama-3.1-8B / Llama-3.2-1B shaped
with random bf16 weights and random KV caches filled to the context length. Every step runs
under a CUDA graph. A round's time does not depend on how many drafts are accepted (shapes are
static), so tokens/s at an acceptance length ``a`` is ``a / round_time``: the table reports
forced acceptance lengths and the one measured on real weights (``--measured-accept``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from sts.attention.backend import AttentionFn, QueryRecorder, dense_attention
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer
from sts.selection.attend import SelectiveAttention
from sts.selection.base import RoundContext, SelectionConfig
from sts.selection.mapping import HeadMapping
from sts.selection.sts import STSPolicy
from sts.speculative import sparse_draft_attention

#: Bytes per second used for roofline bounds: the GEMV rate measured on the H200 (see DESIGN.md).
ROOFLINE_BW = 4.07e12

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 1024),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 1024,
                        tie_word_embeddings=True, head_dim=64),
}


def random_model(shape: str, batch: int, max_len: int, device: str = "cuda") -> Transformer:
    """Return a model of a named shape with random bf16 weights and a KV cache full of random rows."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = ModelConfig.from_hf(LlamaConfig(**SHAPES[shape], rope_parameters=rope), name=shape)
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.inv_freq = config.rope_inv_freq()[0].to(device)
    model.setup_cache(batch, max_len)
    with torch.no_grad():
        for blk in model.layers:
            blk.self_attn.cache.k.normal_()
            blk.self_attn.cache.v.normal_()
    return model.eval().requires_grad_(False)


def weight_bytes(model: Transformer) -> int:
    """Return the bytes of weights one forward reads (the embedding table only through the LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def kv_bytes(config: ModelConfig, batch: int, rows: int, layers: int | None = None, k_only: bool = False) -> int:
    """Return the bytes of ``rows`` KV rows per sequence over ``layers`` layers (bf16)."""
    n_layers = config.n_layers if layers is None else layers
    return batch * n_layers * (1 if k_only else 2) * config.n_kv_heads * rows * config.head_dim * 2


def graphed(fn: Callable[[], object], warmup: int = 2) -> Callable[[], None]:
    """Return a replay function of ``fn`` captured in a CUDA graph (after eager warm-up runs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn: Callable[[], None], iters: int) -> float:
    """Return the median milliseconds of ``fn`` over ``iters`` timed runs (CUDA events)."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@dataclass
class Setup:
    """One benchmark point: models, context, and the static input tensors every graph reads."""

    target: Transformer
    draft: Transformer
    batch: int
    context: int
    gamma: int
    start: Tensor
    last: Tensor


def _draft_steps(s: Setup, recorder: QueryRecorder | None, later: AttentionFn = dense_attention) -> Tensor:
    """Return ``[B, gamma]`` greedy draft tokens from ``gamma`` one-token draft forwards.

    The first step attends densely; later steps through ``later`` (a sparse draft).
    """
    tok, out = s.last, []
    for i in range(s.gamma):
        attention = later if i else dense_attention
        if recorder is not None:
            recorder.inner, attention = attention, recorder
        tok = s.draft(tok, s.start + i, attention)[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


def _accept(drafted: Tensor, logits: Tensor) -> Tensor:
    """Return accepted counts ``[B]`` by greedy matching, on the GPU (no host round-trip)."""
    choice = logits.argmax(-1)
    return (choice[:, :-1] == drafted).long().cumprod(1).sum(1)


def bench_point(s: Setup, budget: int, draft_budget: int, iters: int, rerank: int = 0) -> dict[str, float]:
    """Return milliseconds per AR step, dense speculative round, STS round (dense and sparse draft, and
    with target re-ranking of ``rerank`` x the free rows when set) and each STS phase."""
    t, d = s.target, s.draft
    ar = graphed(lambda: t(s.last, s.start).argmax(-1))

    def dense_round() -> Tensor:
        drafted = _draft_steps(s, None)
        return _accept(drafted, t(torch.cat([s.last, drafted], 1), s.start))

    mapping = HeadMapping.default(t.config, d.config)
    policy = STSPolicy(SelectionConfig(budget=budget, sink=4, window=64), mapping, rerank=0)  # the plain rule
    policy.budget = budget
    recorder = QueryRecorder(mapping.draft_layers())
    verify = SelectiveAttention(policy)
    holder: dict[str, Tensor] = {}

    def draft_phase(later: AttentionFn = dense_attention) -> None:
        holder["drafted"] = _draft_steps(s, recorder, later)
        holder["queries"] = recorder.take()

    def select_phase() -> None:
        policy.prepare(RoundContext(s.start, t, d, holder["queries"]))
        holder["rows"] = torch.stack([policy.select(layer, None, None, s.start) for layer in range(t.config.n_layers)])

    def verify_phase(attention: SelectiveAttention = verify) -> None:
        holder["logits"] = t(torch.cat([s.last, holder["drafted"]], 1), s.start, attention)

    def sts_round(later: AttentionFn = dense_attention, attention: SelectiveAttention = verify) -> None:
        draft_phase(later)
        attention.policy.prepare(RoundContext(s.start, t, d, holder["queries"]))
        verify_phase(attention)
        holder["accepted"] = _accept(holder["drafted"], holder["logits"])

    sparse_draft = sparse_draft_attention(draft_budget)

    out = {"ar_ms": time_ms(ar, iters), "dense_round_ms": time_ms(graphed(dense_round), iters)}
    out["sts_round_ms"] = time_ms(graphed(sts_round), iters)
    out["sts_sparse_draft_round_ms"] = time_ms(graphed(lambda: sts_round(sparse_draft)), iters)
    out["draft_ms"] = time_ms(graphed(draft_phase), iters)
    out["sparse_draft_ms"] = time_ms(graphed(lambda: draft_phase(sparse_draft)), iters)
    out["select_ms"] = time_ms(graphed(select_phase), iters)
    out["verify_ms"] = time_ms(graphed(verify_phase), iters)
    if rerank:
        reranked = STSPolicy(policy.config, mapping, rerank=rerank)
        reranked.budget = budget
        attention = SelectiveAttention(reranked)
        out["sts_rerank_round_ms"] = time_ms(graphed(lambda: sts_round(attention=attention)), iters)
        out["sts_rerank_sparse_draft_round_ms"] = time_ms(graphed(lambda: sts_round(sparse_draft, attention)), iters)
    return out


def roofline(s: Setup, budget: int, draft_budget: int, mapped_layers: int) -> dict[str, float]:
    """Return the bytes each path must move per round (weights, KV rows, score pass)."""
    t, d, b, n, g = s.target, s.draft, s.batch, s.context, s.gamma
    draft_bytes = g * (weight_bytes(d) + kv_bytes(d.config, b, n))
    sparse_draft_bytes = g * weight_bytes(d) + kv_bytes(d.config, b, n) + (g - 1) * kv_bytes(d.config, b, min(draft_budget, n))
    sts_verify = weight_bytes(t) + kv_bytes(t.config, b, min(budget, n)) + kv_bytes(d.config, b, n, layers=mapped_layers, k_only=True)
    return {
        "ar_bytes": weight_bytes(t) + kv_bytes(t.config, b, n),
        "dense_round_bytes": draft_bytes + weight_bytes(t) + kv_bytes(t.config, b, n),
        "sts_round_bytes": draft_bytes + sts_verify,
        "sts_sparse_draft_round_bytes": sparse_draft_bytes + sts_verify,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    """Add the end-to-end benchmark's options."""
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--draft-budget", type=int, default=512, help="rows the draft's later steps read (sparse draft)")
    p.add_argument("--rerank", type=int, default=0, help="also time STS with target re-ranking of this many x the free rows")
    p.add_argument("--accept", default="2,3,4", help="forced tokens per round to report")
    p.add_argument("--measured-accept", type=float, default=None, help="tokens per round measured on real weights")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="e2e.jsonl")


def plot(records: list[dict], path: Path, accept: float = 3.0) -> Path:
    """Write a PNG of decode speed-up over autoregressive vs context, per path and batch, at ``accept`` tokens per round."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    paths = (("dense speculative", "dense_round_ms"), ("STS", "sts_round_ms"), ("STS + sparse draft", "sts_sparse_draft_round_ms"))
    for batch, style in ((1, "-o"), (4, "--s")):
        rows = sorted((r for r in records if r["batch"] == batch), key=lambda r: r["context"])
        for label, key in paths:
            ax.plot([r["context"] // 1024 for r in rows], [accept * r["ar_ms"] / r[key] for r in rows], style, label=f"{label}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel(f"decode speed-up over autoregressive\n({accept:g} tokens per round, forced)")
    ax.set_title("Llama-3.1-8B target, Llama-3.2-1B draft shapes, H200, bf16, CUDA graphs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the grid (or, with ``--plot``, only draw an earlier run's results)."""
    parser = argparse.ArgumentParser(prog="sts bench e2e", description=__doc__.splitlines()[0])
    add_args(parser)
    parser.add_argument("--plot", help="draw this JSON-lines file's speed-ups into --png instead of running")
    parser.add_argument("--png", default="e2e.png")
    args = parser.parse_args(argv)
    if args.plot:
        plot([json.loads(line) for line in Path(args.plot).read_text().splitlines() if line.strip()], Path(args.png))
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    """Run the grid and append one JSON line per (batch, context)."""
    accepts = [float(a) for a in args.accept.split(",")] + ([args.measured_accept] if args.measured_accept else [])
    out = Path(args.out)
    for batch in [int(x) for x in args.batches.split(",")]:
        for context in [int(x) for x in args.contexts.split(",")]:
            torch.cuda.empty_cache()
            max_len = context + args.gamma + 2
            s = Setup(random_model("llama3-8b", batch, max_len), random_model("llama3.2-1b", batch, max_len),
                      batch, context, args.gamma, torch.full((batch,), context, device="cuda"),
                      torch.randint(0, 1000, (batch, 1), device="cuda"))
            with torch.no_grad():
                times = bench_point(s, args.budget, args.draft_budget, args.iters, args.rerank)
            mapped = len(HeadMapping.default(s.target.config, s.draft.config).draft_layers())
            bytes_ = roofline(s, args.budget, args.draft_budget, mapped)
            record = {"batch": batch, "context": context, "gamma": args.gamma, "budget": args.budget, **times, **bytes_,
                      "ar_bound_share": bytes_["ar_bytes"] / ROOFLINE_BW / (times["ar_ms"] / 1e3),
                      "dense_round_bound_share": bytes_["dense_round_bytes"] / ROOFLINE_BW / (times["dense_round_ms"] / 1e3),
                      "sts_round_bound_share": bytes_["sts_round_bytes"] / ROOFLINE_BW / (times["sts_round_ms"] / 1e3),
                      "sts_sparse_draft_round_bound_share":
                      bytes_["sts_sparse_draft_round_bytes"] / ROOFLINE_BW / (times["sts_sparse_draft_round_ms"] / 1e3)}
            # Same acceptance for both speculative paths: STS over dense speculative is a ratio of round times.
            record["speedup_sts_vs_spec"] = times["dense_round_ms"] / times["sts_round_ms"]
            record["speedup_sts_sparse_draft_vs_spec"] = times["dense_round_ms"] / times["sts_sparse_draft_round_ms"]
            for a in accepts:
                record[f"speedup_sts_vs_ar@{a:g}"] = a * times["ar_ms"] / times["sts_round_ms"]
                record[f"speedup_sts_sparse_draft_vs_ar@{a:g}"] = a * times["ar_ms"] / times["sts_sparse_draft_round_ms"]
                record[f"speedup_spec_vs_ar@{a:g}"] = a * times["ar_ms"] / times["dense_round_ms"]
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), file=sys.stderr, flush=True)
            del s


if __name__ == "__main__":
    main()
