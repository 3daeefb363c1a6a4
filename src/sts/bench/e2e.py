"""End-to-end decode speed on the GPU, through the engine users run: autoregressive vs dense speculative vs STS.

Every figure comes from :meth:`sts.engine.Engine.generate`, the function behind ``sts generate``,
the Python API, eval and the server. Speed depends on shapes, not weight values, so the models
are Llama-3.1-8B (or -70B) / Llama-3.2-1B shaped; their weights are a synthetic pair
(:mod:`sts.bench.synthetic`) whose draft agrees with the target on a chosen share of tokens, so
acceptance is measured in the run, not assumed. Per (batch, context): the prompt is prefilled once
through the engine (timed, as a share of the matrix rate), then every method decodes from it
(``cached=True``: decoding never changes a prompt's rows): a first call compiles and captures
(reported as ``compile_s``), a second is timed. Peak GPU memory is recorded per method, and the
tokens decoded (the synthetic target's known greedy continuation, whatever the method).

``--tensor-parallel N`` splits the target by heads over N processes (:mod:`sts.parallel`; one GPU
each, NCCL): every rank builds its part of the same synthetic pair (the draft whole) and runs the
same grid; rank 0 times and writes. Bytes and FLOPs of a record are then one rank's.
``--device cpu`` runs the same code on the CPU (gloo between ranks, float32) for tests; its records
leave out the shares of the H200's rates (bound, matrix) and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from sts.bench.profile import kernel_times
from sts.costmodel import H200_BANDWIDTH, DraftSteps, break_even, kv_bytes, selection_reads, weight_bytes
from sts.decoding import synchronize
from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.eval.output import output_file, read_jsonl
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer
from sts.parallel import Shard, device_type, quiet, rank_device, run_ranks
from sts.runner import DEFAULT_DRAFT_BUDGET
from sts.selection import SelectionConfig, check_options, make_policy, split_options
from sts.selection.base import DEFAULT_BUDGET

#: bf16 matrix rate measured on the H200 (KINDS.md: 769-798 TFLOP/s on random data).
MATRIX_FLOPS = 790e12

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 1024),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 1024,
                        tie_word_embeddings=True, head_dim=64),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072 + 1024),
}


@dataclass(frozen=True)
class Method:
    """One benchmarked decoding path: the draft or not, a policy name and options, a sparse draft or not."""

    name: str
    speculative: bool = True
    policy: str | None = None
    options: tuple[tuple[str, float], ...] = ()
    sparse_draft: bool = False
    #: How the sparse draft picks its rows (``sts.selection.draft``); "-all": its first step reads only them too.
    draft_selection: str = "recent"


METHODS = (
    Method("autoregressive", speculative=False),
    Method("speculative"),
    Method("speculative+sd", sparse_draft=True),
    Method("sts", policy="sts"),
    Method("sts+sd", policy="sts", sparse_draft=True),
    Method("sts+sd-scored", policy="sts", sparse_draft=True, draft_selection="scored"),
    Method("sts+sd-scored-all", policy="sts", sparse_draft=True, draft_selection="scored-all"),
    Method("sts-plain", policy="sts", options=(("rerank", 0),)),
    Method("sts-plain+sd", policy="sts", options=(("rerank", 0),), sparse_draft=True),
)


def parse_methods(names: str) -> list[Method]:
    """Return the methods of a comma list of :data:`METHODS`' names, a selection method's optionally followed by its
    policy's options (``sts+sd-scored-all/rerank=8``, :func:`sts.selection.split_options`); the spec is the
    method's name in the records. Raises STSError for an unknown method or option."""
    by_name = {m.name: m for m in METHODS}
    methods = []
    for spec in names.split(","):
        base, options = split_options(spec)
        if base not in by_name:
            raise STSError(f"unknown method {spec!r} (choose from {', '.join(by_name)}, a selection method optionally "
                           "with /key=number options)")
        method = by_name[base]
        if options:
            if method.policy is None:
                raise STSError(f"method {spec!r}: options apply to selection methods only")
            check_options(method.policy, dict(options))
        methods.append(replace(method, name=spec, options=method.options + options))
    return methods


def round_bytes(method: Method, target: ModelConfig, draft: ModelConfig, batch: int, context: int, gamma: int,
                budget: int, draft_budget: int, mapped_layers: int, dtype_bytes: int) -> int:
    """Return the fewest bytes one round of ``method`` must move over ``batch`` sequences of ``context`` rows.

    Each forward reads its model's weights once (:func:`sts.costmodel.weight_bytes`) and the KV rows
    it attends to (:func:`sts.costmodel.kv_bytes`): the draft's first step every row (``draft_budget`` rows
    with a "-all" draft selection), its later ``gamma - 1`` steps ``draft_budget`` rows with a sparse draft;
    a selection method's scores the draft's K rows of its ``mapped_layers`` layers, its verify ``budget`` rows. Rows a round writes
    are left out. ``dtype_bytes``: bytes per weight and cache element.
    """
    selective = method.policy is not None
    verified = batch * (min(budget, context) if selective else context)
    verify = weight_bytes(target, dtype_bytes) + kv_bytes(target, verified, dtype_bytes)
    if not method.speculative:
        return verify
    later = batch * (min(draft_budget, context) if method.sparse_draft else context)
    first = later if method.draft_selection.endswith("-all") else batch * context
    drafting = (gamma * weight_bytes(draft, dtype_bytes) + kv_bytes(draft, first, dtype_bytes)
                + (gamma - 1) * kv_bytes(draft, later, dtype_bytes))
    scoring = kv_bytes(draft, batch * context, dtype_bytes, layers=mapped_layers, k_only=True) if selective else 0
    return drafting + scoring + verify


def dense_round(method: Method) -> Method:
    """Return what a selection method runs in the rounds it verifies densely: dense speculative decoding (the
    engine's sparse draft, too, reads every row in those rounds)."""
    return replace(method, policy=None, options=(), sparse_draft=False, draft_selection="recent")


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    """Return the FLOPs of a causal prefill of ``tokens`` tokens: ``2 * params`` per token (the weights a forward
    reads, :func:`sts.costmodel.weight_bytes`) plus attention's ``2 * n^2 * d_q * L``."""
    params = weight_bytes(config, 1)
    return 2.0 * params * tokens + 2.0 * tokens**2 * config.n_heads * config.head_dim * config.n_layers


def gammas(args: argparse.Namespace) -> list[int]:
    """Return ``--gamma``'s draft lengths (a comma list), refusing values below 1."""
    try:
        values = [int(x) for x in str(args.gamma).split(",")]
    except ValueError:
        raise STSError(f"gamma must be a comma list of whole numbers, got {args.gamma!r}") from None
    if min(values) < 1:
        raise STSError(f"gamma must be >= 1, got {args.gamma}")
    return values


def _prefill(target: Transformer, draft: Transformer, batch: int, prompt: list[int], max_len: int) -> float:
    """Prefill ``prompt`` into every slot of both models' caches; return the seconds of the first slot's prefill."""
    reader = Engine(target, draft, slots=batch, max_len=max_len)
    device = target.embed_tokens.weight.device
    synchronize(device)
    start = time.perf_counter()
    reader.prefill(0, prompt)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    for b in range(1, batch):  # one long prefill, copied into every slot
        reader.prefill(b, prompt, copy_from=0)
    return prefill_s


def bench_point(target: Transformer, draft: Transformer, batch: int, context: int, args: argparse.Namespace,
                sparse_draft: Transformer | None = None) -> list[dict]:
    """Return one record per method and gamma at (batch, context): prefill, then decode speed, acceptance, bound share,
    memory. ``sparse_draft``: the draft of the methods with a sparse draft (``--sparse-draft-agreement``), else ``draft``."""
    gen = torch.Generator().manual_seed(batch * 1_000_003 + context)
    prompt = torch.randint(0, target.config.vocab_size, (context,), generator=gen).tolist()
    lengths = gammas(args)
    max_len = context + args.new_tokens + max(lengths) + 2
    device, element = target.embed_tokens.weight.device, target.embed_tokens.weight.element_size()
    cuda = device.type == "cuda"
    prefill_s = _prefill(target, draft, batch, prompt, max_len)
    if sparse_draft is not None:  # its own cache rows (the target's are written again, the same)
        _prefill(target, sparse_draft, batch, prompt, max_len)
    # Each sequence ends in its own token: the synthetic pair's continuation (and so its acceptance)
    # depends on it alone, and the methods below re-read only that last token (cached=True).
    prompts = [prompt[:-1] + [int(t)] for t in torch.randint(0, target.config.vocab_size, (batch,), generator=gen)]
    flops = sum(prefill_flops(m.config, context) for m in (target, draft))
    common = {"batch": batch, "context": context, "budget": args.budget, "draft_budget": args.draft_budget,
              "verify": args.verify, "prefill_s": prefill_s,
              "prefill_matrix_share": flops / prefill_s / MATRIX_FLOPS if cuda else None}
    selection = SelectionConfig(budget=args.budget, sink=4, window=64)
    records = []
    runs = [(m, g) for m in parse_methods(args.methods) for g in (lengths if m.speculative else lengths[:1])]
    for method, gamma in runs:
        policy, crossing = None, None
        config = EngineConfig(gamma=gamma, draft_budget=args.draft_budget if method.sparse_draft else None,
                              draft_selection=method.draft_selection,  # type: ignore[arg-type]
                              verify=args.verify)
        if method.policy is not None:  # and the cost model's break-even context
            policy = make_policy(method.policy, selection, target, draft, **dict(method.options))
            reads = selection_reads(policy, target, draft)
            steps = DraftSteps.of(gamma, config.draft_budget, config.draft_selection)
            crossing = break_even(target.config, draft.config, reads, selection, batch, element, config.hardware,
                                  steps=steps)
        # A selection method drafts densely in the rounds it verifies densely: there the dense draft's acceptance.
        sparse_rounds = policy is None or args.verify == "sparse" or (crossing is not None and context >= crossing)
        worse = method.sparse_draft and sparse_draft is not None and sparse_rounds
        drafter = sparse_draft if worse else draft
        engine = Engine(target, drafter if method.speculative else None, policy, slots=batch, max_len=max_len, config=config)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first = engine.generate(prompts, args.new_tokens, cached=True)  # compiles and captures
        result = engine.generate(prompts, args.new_tokens, cached=True)
        timed = result.stats
        rounds = max(timed.target_forwards, 1)
        decode_s = timed.time_s - timed.prefill_s
        mapped = len(policy.draft_layers(draft)) if policy is not None else 0
        shape = (target.config, draft.config, batch, context, gamma, args.budget, args.draft_budget, mapped, element)
        bytes_ = round_bytes(method, *shape)
        crossover = {"break_even": None, "dense_round_share": None}
        if policy is not None:  # the rounds it verified densely
            dense = round_bytes(dense_round(method), *shape)
            bytes_ = (dense * timed.dense_rounds + bytes_ * (rounds - timed.dense_rounds)) // rounds
            crossover = {"break_even": crossing, "dense_round_share": timed.dense_rounds / rounds}
        summary = timed.summary()
        kernels = None
        if args.profile:  # a third call, profiled: its kernels per round (the timed call ran unprofiled)
            profiled, top = kernel_times(lambda: engine.generate(prompts, args.new_tokens, cached=True), device)
            per_round = max(profiled.stats.target_forwards, 1)
            kernels = [{**k, "us_per_round": round(k["us"] / per_round, 2)} for k in top]
        agreement = args.sparse_draft_agreement if worse else args.agreement
        records.append({
            **common, "method": method.name, "gamma": gamma if method.speculative else None,
            "agreement": agreement if method.speculative else None, "tokens_per_s": summary["tokens_per_s"],
            "ms_per_round": 1e3 * decode_s / rounds, "acceptance_length": summary["acceptance_length"],
            "sparsity": summary["sparsity"], "compile_s": first.stats.compile_s,
            **{f"{phase}_ms": 1e3 * getattr(timed, f"{phase}_s") / rounds for phase in ("draft", "select", "verify")},
            "round_bytes": bytes_, "bound_share": bytes_ / H200_BANDWIDTH / (decode_s / rounds) if cuda else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "tokens": result.tokens, **crossover,
            **({"kernels": kernels} if kernels is not None else {}),
        })
        del engine
    for key, base in (("speedup_vs_ar", "autoregressive"), ("speedup_vs_spec", "speculative")):
        best = max((r["tokens_per_s"] for r in records if r["method"] == base), default=None)  # over the gammas
        for r in records:
            r[key] = r["tokens_per_s"] / best if best else None
    return records


def add_args(p: argparse.ArgumentParser) -> None:
    """Add the end-to-end benchmark's options."""
    p.add_argument("--contexts", default="8192,32768,131072",
                   help="comma list of prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--batches", default="1,4", help="comma list of sequences decoded together (default: %(default)s)")
    p.add_argument("--gamma", default="4",
                   help="draft tokens per round; a comma list runs every speculative method at each "
                        "(speed-ups over speculative decoding are then over its fastest gamma)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help=f"STS rows per KV head, sinks and window included (default {DEFAULT_BUDGET}, the product's)")
    p.add_argument("--draft-budget", type=int, default=DEFAULT_DRAFT_BUDGET,
                   help=f"rows the sparse draft's later steps read (default {DEFAULT_DRAFT_BUDGET}, the product's)")
    p.add_argument("--agreement", type=float, default=0.77,
                   help="share of tokens where the synthetic draft predicts the target (0.77: ~3 tokens per round at gamma 4)")
    p.add_argument("--sparse-draft-agreement", type=float, default=None,
                   help="the share for the methods with a sparse draft (a second draft; default --agreement), in the "
                        "contexts where they draft sparsely (a selection method with --verify auto: past its break-even): "
                        "on real weights a draft that reads fewer rows predicts worse, while the synthetic pair's does not")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per sequence in the timed run")
    p.add_argument("--verify", choices=("auto", "sparse"), default="auto",
                   help="STS rows: auto verifies densely below the cost model's break-even context; sparse always")
    p.add_argument("--methods", default=",".join(m.name for m in METHODS),
                   help="comma list, a selection method's name optionally followed by policy options "
                        "(sts+sd-scored-all/rerank=8; default: every method without options)")
    p.add_argument("--target-shape", default="llama3-8b", help=f"target shape: {', '.join(SHAPES)}")
    p.add_argument("--draft-shape", default="llama3.2-1b", help="draft shape (same vocabulary)")
    p.add_argument("--device", default="cuda", help="cuda (bfloat16) or cpu (float32, for tests)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the target by heads over N processes (cuda: one GPU each, NCCL); rank 0 writes")
    p.add_argument("--profile", action="store_true",
                   help="also profile one more call per method and record its top kernels (launches, device us per round)")
    p.add_argument("--out", default="e2e.jsonl", help="JSON-lines record of every run, appended (default: %(default)s)")
    p.add_argument("--png", default=None, help="also draw the speed-ups into this PNG")


def plot(records: list[dict], path: Path) -> Path:
    """Write a PNG of decode speed-up over autoregressive vs context, one line per method and batch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    lines = sorted({(r["method"], r.get("gamma")) for r in records if r["method"] != "autoregressive"},
                   key=lambda line: ([m.name for m in METHODS].index(line[0].split("/")[0]), line[0], line[1] or 0))
    several = len({gamma for _, gamma in lines}) > 1
    for batch, style in zip(sorted({r["batch"] for r in records}), ("-o", "--s", ":^", "-.v")):
        for i, (method, gamma) in enumerate(lines):
            rows = sorted((r for r in records if r["batch"] == batch and (r["method"], r.get("gamma")) == (method, gamma)
                           and r["speedup_vs_ar"]), key=lambda r: r["context"])
            if rows:  # one colour per method (and gamma), one line style per batch size
                ax.plot([r["context"] / 1024 for r in rows], [r["speedup_vs_ar"] for r in rows], style, color=f"C{i % 10}",
                        label=f"{method}{f' gamma {gamma}' if several else ''}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("decode tokens/s over autoregressive")
    first = records[0]
    shapes = f"{first.get('target_shape', 'llama3-8b')} / {first.get('draft_shape', 'llama3.2-1b')}"
    ranks = first.get("tensor_parallel", 1)
    ax.set_title(f"sts.engine, {shapes} shapes (synthetic pair), {first['device']}" + (f" x{ranks}" if ranks > 1 else ""),
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _parser() -> argparse.ArgumentParser:
    """Return the benchmark's option parser."""
    parser = argparse.ArgumentParser(prog="sts bench e2e", description=__doc__.splitlines()[0])
    add_args(parser)
    parser.add_argument("--plot", help="only draw this JSON-lines file's records into --png (no GPU needed)")
    return parser


def _line(record: dict) -> str:
    """Return a record's one-line summary (figures the CPU does not give are left out)."""
    label = record["method"] + (f" g{record['gamma']}" if record["gamma"] else "")
    parts = [f"b={record['batch']} ctx={record['context']} {label:<20} {record['tokens_per_s']:9.1f} tok/s"]
    parts += [f"x{record[key]:.2f} {name}" for key, name in (("speedup_vs_ar", "AR"), ("speedup_vs_spec", "spec"))
              if record[key] is not None]
    parts += [f"accept {record['acceptance_length'] or 1:.2f}", f"{record['ms_per_round']:.2f} ms/round"]
    if record["bound_share"] is not None:
        parts.append(f"bound {record['bound_share']:.0%}")
    parts.append(f"compile {record['compile_s']:.1f}s")
    if record["peak_gb"] is not None:
        parts.append(f"peak {record['peak_gb']:.1f} GB")
    if record.get("dense_round_share") is not None:
        parts.append(f"dense rounds {record['dense_round_share']:.0%} (break-even {record['break_even'] or 'never'})")
    for kernel in record.get("kernels", [])[:5]:  # --profile: where the round's time goes
        parts.append(f"\n    {kernel['us_per_round']:9.1f} us/round {kernel['share']:6.1%}  {kernel['calls']:6d}x  {kernel['name'][:90]}")
    return "  ".join(parts)


def run(args: argparse.Namespace, shard: Shard | None = None) -> None:
    """Run the grid of ``args``, writing its records to ``args.out``; with ``shard``, as that tensor-parallel rank
    (rank 0 writes).

    Raises STSError for an unknown shape or method, or a target whose heads do not split over the ranks.
    """
    from sts.bench.synthetic import shape_config, synthetic_draft, synthetic_pair

    parse_methods(args.methods)  # before building anything
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    longest = max(contexts) + args.new_tokens + max(gammas(args)) + 2
    kind = device_type(args.device)
    cuda = kind == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    target, draft = synthetic_pair(args.target_shape, args.draft_shape, args.agreement, max_position_embeddings=longest,
                                   dtype=dtype, device=rank_device(kind), partition=shard)
    sparse_draft = None
    if args.sparse_draft_agreement is not None:
        sparse_draft = synthetic_draft(shape_config(args.target_shape), args.draft_shape, args.sparse_draft_agreement,
                                       max_position_embeddings=longest, dtype=dtype, device=rank_device(kind))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "argv": args.argv, "target_shape": args.target_shape,
            "draft_shape": args.draft_shape, "tensor_parallel": shard.world if shard else 1}
    writer = shard is None or shard.rank == 0
    out = Path(args.out)
    records: list[dict] = []
    with torch.no_grad():
        for batch, context in tqdm([(b, c) for b in batches for c in contexts], desc="e2e", file=sys.stderr):
            if cuda:
                torch.cuda.empty_cache()
            for record in bench_point(target, draft, batch, context, args, sparse_draft):
                record.update(meta)
                records.append(record)
                if writer:
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                print(_line(record), file=sys.stderr, flush=True)
    if args.png and writer:
        plot(records, Path(args.png))


def _rank(rank: int, world: int, argv: list[str]) -> None:
    """One tensor-parallel rank: parse ``argv`` here (see :func:`sts.parallel.launch_generate`) and run the grid."""
    args = _parser().parse_args(argv)
    args.argv = argv
    with quiet(rank > 0):
        run(args, Shard(rank, world))


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the grid, one JSON line per (batch, context, method); or, with ``--plot``, only draw.

    Raises STSError for a CUDA device that is not there, and as :func:`run` does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.plot:
        plot(read_jsonl(args.plot), output_file(args.png or "e2e.png"))
        return
    for path in (args.out, args.png):  # unusable output paths fail before the grid runs
        if path:
            output_file(path)
    kind = device_type(args.device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise STSError("sts bench e2e measures GPU speed and needs a CUDA device (--device cpu runs it on the CPU for tests)")
    if args.tensor_parallel == 1:
        run(args)
    else:
        run_ranks(_rank, args.tensor_parallel, (argv,), kind)


if __name__ == "__main__":
    main()
