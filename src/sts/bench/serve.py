"""Server throughput: ``sts serve``'s app under concurrent streaming clients, against direct ``Engine.generate``.

``python -m sts.bench.serve --out serve.jsonl --png serve.png`` (or ``sts bench serve ...``). Per
method, the server is built as ``sts serve`` builds it (its option parser and
:func:`~sts.serve.options.llm_settings`, :class:`~sts.api.LLM`, :func:`~sts.serve.app.create_app`)
over a synthetic pair in real shapes (:mod:`sts.bench.synthetic`: Llama-3.1-8B / Llama-3.2-1B,
random bf16 weights whose draft agrees with the target on ``--agreement`` of the vocabulary), and
uvicorn serves it on a free port of 127.0.0.1 from a thread of this process. For each number of
streams ``C``, ``C`` asynchronous clients (httpx2) each send ``--requests`` streamed completions one
after another: a prompt of ``--prompt-tokens`` random token ids, greedy, ``max_tokens`` new tokens
with ``ignore_eos``, so every request decodes exactly that many. Measured: generated tokens/s of
all streams together (first request sent to last token received), time to first token and
inter-token latency percentiles. Then, in the same process and on the same engine (same method,
settings, slots and CUDA graphs), ``Engine.generate`` decodes the same prompts in batches of ``C``:
the direct tokens/s, prefill included as in the server's. Server/direct is the scheduler's and the
HTTP layer's cost (the clients share the process, and so its interpreter lock, with the server).

Every record also says whether each request got exactly its tokens, whether the server's tokens
equal the direct run's, and whether both follow the target's known next-token rule (the synthetic
pair's greedy continuation is fixed in advance).

Defaults (P = 16384 prompt tokens, N = 256 new tokens, C = 1, 4, 16 in 16 slots, one request per
stream; autoregressive, speculative, sts with a 512-row budget) should take about 3 minutes on one
H200, mostly prefill: ~1 s per request for both models (0.3 s at 8K, 2.3 s at 32K measured by
``sts bench e2e``), 21 requests per method paid by the server and again by the direct run. The
caches hold 16 slots x 16.6K rows x (128 KB target + 32 KB draft) = 43 GB beside 19 GB of weights;
``--prompt-tokens 32768`` fits too (86 GB of caches) but takes about twice as long.
``--quick``: tiny shapes, short prompts, 1/2/4 streams in 4 slots (seconds on a CPU: the test's mode).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from sts.decoding import GenerationStats
from sts.errors import STSError
from sts.eval.output import output_file, read_jsonl
from sts.runner import DENSE_METHODS

#: The served model id.
MODEL = "synthetic"
#: The real shapes (``sts.bench.e2e.SHAPES``) and the test's (``sts.bench.synthetic.TINY_SHAPES``).
SHAPES = ("llama3-8b", "llama3.2-1b")
QUICK_SHAPES = ("tiny-target", "tiny-draft")
#: The defaults ``--quick`` sets, with the tiny shapes (seconds on a CPU, not minutes).
QUICK = dict(prompt_tokens=192, new_tokens=12, streams="1,2,4", requests=2, slots=4, budget=96)


@dataclass
class Sample:
    """One streamed request as its client saw it: ``perf_counter`` stamps and the token ids received."""

    sent: float
    first: float
    last: float
    token_ids: list[int]

    @property
    def ttft_s(self) -> float:
        """Return seconds from sending the request to its first token."""
        return self.first - self.sent

    @property
    def itl_s(self) -> float | None:
        """Return the mean seconds between two tokens after the first (None for one token)."""
        n = len(self.token_ids)
        return (self.last - self.first) / (n - 1) if n > 1 else None


@dataclass
class Point:
    """One (method, streams) measurement: the server's samples and the direct run, prompt by prompt.

    ``server[c][r]`` and ``direct_ids[c][r]`` belong to stream ``c``'s ``r``-th prompt, ``prompts[c][r]``.
    """

    method: str
    streams: int
    prompts: list[list[list[int]]]
    server: list[list[Sample]]
    server_s: float
    direct_ids: list[list[list[int]]]
    direct_s: float
    direct_stats: GenerationStats
    follows_target: bool
    #: Peak GPU memory of the method's whole run (server and direct), GiB; None on the CPU.
    peak_gb: float | None


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """Return p50/p90/p99 of ``values`` times ``scale`` (None when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values) * scale, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4)}


def record(point: Point, new_tokens: int) -> dict[str, Any]:
    """Return the JSON record of a point: throughputs, their ratio, latency percentiles, token checks."""
    samples = [s for stream in point.server for s in stream]
    generated = sum(len(s.token_ids) for s in samples)
    server_rate = generated / point.server_s
    direct_rate = sum(len(t) for stream in point.direct_ids for t in stream) / point.direct_s
    summary = point.direct_stats.summary()
    return {
        "method": point.method, "streams": point.streams, "requests": len(samples),
        "server_tokens_per_s": round(server_rate, 2), "direct_tokens_per_s": round(direct_rate, 2),
        "server_over_direct": round(server_rate / direct_rate, 4),
        "ttft_s": percentiles([s.ttft_s for s in samples]),
        "itl_ms": percentiles([s.itl_s for s in samples if s.itl_s is not None], 1e3),
        "server_s": round(point.server_s, 3), "direct_s": round(point.direct_s, 3),
        "exact_tokens": all(len(s.token_ids) == new_tokens for s in samples),
        "tokens_match": [[s.token_ids for s in stream] for stream in point.server] == point.direct_ids,
        "follows_target": point.follows_target,
        "acceptance_length": summary["acceptance_length"], "sparsity": summary["sparsity"],
        "peak_gb": point.peak_gb,
    }


# --------------------------------------------------------------------------- the server and its clients


@contextmanager
def serving(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """Run the ASGI ``app`` with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL.

    Leaving the block shuts the server down (the app's lifespan ends: ``sts serve``'s stops its scheduler).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise STSError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


async def stream_completion(client: Any, prompt: list[int], new_tokens: int) -> Sample:
    """Return one streamed greedy completion of ``new_tokens`` tokens past end-of-sequence ids, as received.

    Raises :class:`STSError` with the server's message for an error status or an error event.
    """
    body = {"model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    sent = time.perf_counter()
    first = last = 0.0
    ids: list[int] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise STSError(f"the server answered {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise STSError(f"the server failed a request: {chunk['error']['message']}")
            got = chunk["choices"][0].get("token_ids") or []
            if got:
                last = time.perf_counter()
                first = first or last
                ids.extend(got)
    if not ids:
        raise STSError("the server streamed no token")
    return Sample(sent, first, last, ids)


async def drive(url: str, prompts: list[list[list[int]]], new_tokens: int) -> tuple[list[list[Sample]], float]:
    """Return every stream's samples and the seconds from the first request to the last token.

    ``prompts[c]``: stream ``c``'s prompts, sent one after another; the streams run concurrently.
    """
    import httpx2 as httpx

    async def one_stream(client: Any, mine: list[list[int]]) -> list[Sample]:
        return [await stream_completion(client, p, new_tokens) for p in mine]

    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits, trust_env=False) as client:
        began = time.perf_counter()
        samples = await asyncio.gather(*(one_stream(client, mine) for mine in prompts))
        return list(samples), time.perf_counter() - began


# --------------------------------------------------------------------------- the grid


def serve_settings(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Return the :class:`~sts.api.LLM` settings that ``sts serve`` takes from these options (its parser and
    :func:`~sts.serve.options.llm_settings`); raise :class:`STSError` for options it refuses."""
    from sts.serve.options import add_serve_args, llm_settings

    parser = argparse.ArgumentParser(prog="sts serve", exit_on_error=False)
    add_serve_args(parser)
    budget = [] if method in DENSE_METHODS else ["--budget", str(args.budget)]  # dense methods take none
    argv = ["--target", MODEL, "--draft", MODEL, "--method", method, *budget, "--gamma",
            str(args.gamma), "--slots", str(args.slots), "--max-model-len", str(args.max_model_len),
            "--device", args.device, "--dtype", args.dtype, *shlex.split(args.serve_args)]
    try:
        options, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise STSError(f"--serve-args: {exc}") from None
    if unknown:
        raise STSError(f"--serve-args: sts serve has no option {unknown[0]}")
    return llm_settings(options)


def serve_llm(method: str, target: Any, draft: Any, args: argparse.Namespace) -> Any:
    """Return the :class:`~sts.api.LLM` that ``sts serve`` builds for these options, over the loaded pair."""
    from sts.api import LLM
    from sts.runner import LoadedModel

    return LLM(LoadedModel(target, None), LoadedModel(draft, None), **serve_settings(method, args))


def successors(start: int, successor: torch.Tensor, n: int) -> list[int]:
    """Return the ``n`` tokens after ``start`` under the next-token map ``successor``."""
    out, token = [], start
    for _ in range(n):
        token = int(successor[token])
        out.append(token)
    return out


def bench_method(
    method: str, target: Any, draft: Any, prompts: list[list[list[int]]], warmup: list[list[list[int]]],
    successor: torch.Tensor, args: argparse.Namespace, progress: tqdm,
) -> list[Point]:
    """Return one point per number of streams for ``method``: the server first (all stream counts), then direct.

    Before the timed runs the server serves ``warmup`` (other prompts, as many streams as the most
    timed): a whole run at the largest stream count passes through the batch sizes and contexts of
    the timed runs, so every CUDA graph (one per verify budget and sampling mode; a selection
    method's rounds turn sparse only once enough long sequences decode together) is captured before
    any timing, as it is for the direct runs, which follow on the same engine."""
    from sts.serve.app import create_app

    streams = [int(c) for c in args.streams.split(",")]
    llm = serve_llm(method, target, draft, args)
    cuda = llm.engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    served: dict[int, tuple[list[list[Sample]], float]] = {}
    with serving(create_app(llm, MODEL)) as url:
        asyncio.run(drive(url, warmup, args.new_tokens))
        for c in streams:
            served[c] = asyncio.run(drive(url, prompts[:c], args.new_tokens))
            progress.update()
    points = []
    for c in streams:  # the server has stopped: the engine is this thread's
        began, ids, stats = time.perf_counter(), [[] for _ in range(c)], GenerationStats()
        for r in range(args.requests):
            result = llm.engine.generate([prompts[s][r] for s in range(c)], args.new_tokens)
            stats.accepted_per_round += result.stats.accepted_per_round
            stats.sparsity += result.stats.sparsity
            for s in range(c):
                ids[s].append(result.tokens[s])
        direct_s = time.perf_counter() - began
        samples, server_s = served[c]
        follows = all(s.token_ids == successors(p[-1], successor, args.new_tokens) and d == s.token_ids
                      for stream, mine, direct in zip(samples, prompts, ids) for s, p, d in zip(stream, mine, direct))
        points.append(Point(method, c, prompts[:c], samples, server_s, ids, direct_s, stats, follows, None))
        progress.update()
    for point in points:  # the method's peak, server and direct runs together
        point.peak_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    del llm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return points


def add_args(p: argparse.ArgumentParser) -> None:
    """Add the server benchmark's options."""
    p.add_argument("--methods", default="autoregressive,speculative,sts", help="comma-separated sts serve --method values")
    p.add_argument("--streams", default="1,4,16", help="concurrent streaming clients, comma-separated")
    p.add_argument("--requests", type=int, default=1, help="requests each stream sends, one after another")
    p.add_argument("--prompt-tokens", type=int, default=16384, help="tokens per prompt (random ids)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens every request decodes (ignore_eos)")
    p.add_argument("--slots", type=int, default=16, help="sts serve --slots (at least the most streams)")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budget", type=int, default=512, help="sts serve --budget: rows per KV head (sinks and window included)")
    p.add_argument("--agreement", type=float, default=0.77,
                   help="share of tokens where the synthetic draft predicts the target (0.77: ~3 tokens per round at gamma 4)")
    p.add_argument("--serve-args", default="", help='more sts serve options for every method, e.g. --serve-args="--rerank 0"')
    p.add_argument("--quick", action="store_true", help="tiny shapes, and these defaults (seconds on a CPU): " +
                   ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--device", default=None, help="default cuda when there is one, else cpu")
    p.add_argument("--out", default="serve.jsonl", help="JSON lines, one record per (method, streams), appended")
    p.add_argument("--png", default=None, help="also draw tokens/s against streams into this PNG")


def check_args(args: argparse.Namespace) -> None:
    """Apply the device's defaults; raise :class:`STSError` for sizes or settings that cannot run."""
    from sts.runner import methods
    from sts.selection import SelectionConfig

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (args.quick or args.device.startswith("cuda")):
        raise STSError("the 8B/1B shapes need a CUDA device (--quick runs tiny shapes on the CPU)")
    args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    try:
        streams = [int(c) for c in args.streams.split(",")]
    except ValueError:
        raise STSError(f"--streams must be comma-separated integers, got {args.streams!r}") from None
    for name, value in (("requests", args.requests), ("prompt-tokens", args.prompt_tokens),
                        ("new-tokens", args.new_tokens), ("streams", min(streams))):
        if value < 1:
            raise STSError(f"--{name} must be >= 1, got {value}")
    if max(streams) > args.slots:
        raise STSError(f"--streams up to {max(streams)} need --slots >= {max(streams)} (direct runs batch all streams)")
    args.max_model_len = args.prompt_tokens + args.new_tokens + args.gamma + 1  # every request's rows and a round's
    for method in args.methods.split(","):
        if method not in methods():
            raise STSError(f"unknown method {method!r} (choose from {', '.join(methods())})")
        settings = serve_settings(method, args)  # sts serve's own checks, and the selection's, before anything loads
        if method not in DENSE_METHODS:
            SelectionConfig(**{k: settings[k] for k in ("budget", "sink", "window", "dense_layers")})


def table(records: list[dict[str, Any]]) -> str:
    """Return the records as an aligned text table."""
    head = (f"{'method':<15}{'streams':>8}{'server tok/s':>14}{'direct tok/s':>14}{'ratio':>7}"
            f"{'TTFT p50/p90/p99 s':>22}{'ITL p50/p99 ms':>16}{'accept':>8}{'sparsity':>10}  ok")
    lines = [head]
    for r in records:
        t, i = r["ttft_s"], r["itl_ms"]
        itl = f"{i['p50']:.1f}/{i['p99']:.1f}" if i["p50"] is not None else "-"
        sparsity = f"{r['sparsity']:.2f}" if r["sparsity"] is not None else "-"
        ok = r["exact_tokens"] and r["tokens_match"] and r["follows_target"]
        lines.append(f"{r['method']:<15}{r['streams']:>8}{r['server_tokens_per_s']:>14.1f}{r['direct_tokens_per_s']:>14.1f}"
                     f"{r['server_over_direct']:>7.2f}{t['p50']:>10.2f}/{t['p90']:.2f}/{t['p99']:.2f}{itl:>16}"
                     f"{r['acceptance_length'] or 1:>8.2f}{sparsity:>10}  {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> Path:
    """Write a PNG of generated tokens/s against concurrent streams: server (solid) and direct (dashed), per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    for i, method in enumerate(dict.fromkeys(r["method"] for r in records)):
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["streams"])
        streams = [r["streams"] for r in rows]
        ax.plot(streams, [r["server_tokens_per_s"] for r in rows], "-o", color=f"C{i}", label=f"{method}: sts serve")
        ax.plot(streams, [r["direct_tokens_per_s"] for r in rows], "--s", color=f"C{i}", label=f"{method}: Engine.generate")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["streams"] for r in records}), [str(s) for s in sorted({r["streams"] for r in records})])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("generated tokens/s, all streams")
    r = records[0]
    ax.set_title(f"{r['target']} / {r['draft']} (synthetic), prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, "
                 f"{r['device']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> list[Point]:
    """Run the grid, append one JSON line per (method, streams), print the table; return the points measured.

    With ``--plot FILE``: only draw that file's records into ``--png`` (no GPU needed).
    """
    from sts.bench.synthetic import next_token_maps, synthetic_pair

    parser = argparse.ArgumentParser(prog="sts bench serve", description=__doc__.splitlines()[0])
    add_args(parser)
    parser.add_argument("--plot", help="only draw this JSON-lines file's records into --png")
    args = parser.parse_args(argv)
    if args.quick:  # its sizes become the defaults: options given still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.plot:
        plot(read_jsonl(args.plot), output_file(args.png or "serve.png"))
        return []
    check_args(args)
    for path in (args.out, args.png):  # unusable output paths fail before the servers start
        if path:
            output_file(path)
    chosen = args.methods.split(",")
    streams = [int(c) for c in args.streams.split(",")]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    target, draft = synthetic_pair(*shapes, args.agreement, dtype=getattr(torch, args.dtype), device=args.device,
                                   max_position_embeddings=args.max_model_len)
    vocab = target.config.vocab_size
    successor, _ = next_token_maps(vocab, args.agreement)  # synthetic_pair's seed 0: the target's greedy rule
    gen = torch.Generator().manual_seed(0)

    def random_prompts(per_stream: int) -> list[list[list[int]]]:
        return [[torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(per_stream)]
                for _ in range(max(streams))]

    prompts = random_prompts(args.requests)
    warmup = random_prompts(1)  # drawn after the timed prompts, which stay those of earlier runs
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    meta = {"target": shapes[0], "draft": shapes[1], "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "requests_per_stream": args.requests, "slots": args.slots, "gamma": args.gamma, "budget": args.budget,
            "agreement": args.agreement, "device": device, "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv}
    out = Path(args.out)
    points, records = [], []
    with torch.no_grad(), tqdm(total=2 * len(chosen) * len(streams), desc="serve", file=sys.stderr) as progress:
        for method in chosen:
            for point in bench_method(method, target, draft, prompts, warmup, successor, args, progress):
                rec = {**record(point, args.new_tokens), **meta}
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                points.append(point)
                records.append(rec)
                progress.write(f"{method:<15} C={point.streams:<3} server {rec['server_tokens_per_s']:9.1f} tok/s  "
                               f"direct {rec['direct_tokens_per_s']:9.1f} tok/s  x{rec['server_over_direct']:.2f}  "
                               f"TTFT p50 {rec['ttft_s']['p50']:.3f} s", file=sys.stderr)
    print(table(records))
    if args.png:
        plot(records, Path(args.png))
    return points


if __name__ == "__main__":
    try:
        main()
    except STSError as exc:
        sys.exit(f"sts bench serve: error: {exc}")
