"""The server benchmark (``sts.bench.serve``) in its ``--quick`` mode: tiny synthetic shapes on the CPU, through the
real server (uvicorn, streamed HTTP) and the direct ``Engine.generate`` path.

The synthetic pair's greedy continuation is known in advance (the target's next-token map), so every streamed
request is checked against it token for token, and against the direct run of the same prompt.
"""

from __future__ import annotations

import json
from typing import Iterator

import pytest
import torch

from sts.bench.serve import QUICK, main
from sts.bench.synthetic import TINY_SHAPES, next_token_maps
from sts.errors import STSError
from test_synthetic import walk


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_bench_streams_every_request_its_tokens_as_generate_does(tmp_path, capsys):
    out, png = tmp_path / "serve.jsonl", tmp_path / "serve.png"
    # --verify sparse: on the CPU the cost model's H200 break-even would verify these short contexts densely.
    points = main(["--quick", "--device", "cpu", "--out", str(out), "--png", str(png), "--serve-args", "--verify sparse"])
    successor, _ = next_token_maps(TINY_SHAPES["tiny-target"]["vocab_size"], 0.77)
    n, streams = QUICK["new_tokens"], [int(c) for c in QUICK["streams"].split(",")]
    methods = ("autoregressive", "speculative", "sts")
    assert [(p.method, p.streams) for p in points] == [(m, c) for m in methods for c in streams]
    for point in points:
        assert len(point.server) == point.streams and all(len(s) == QUICK["requests"] for s in point.server)
        for samples, prompts, direct in zip(point.server, point.prompts, point.direct_ids):
            for sample, prompt, ids in zip(samples, prompts, direct):
                expected = walk(successor, prompt[-1], n)  # the target's greedy rule, past any end-of-sequence id
                assert sample.token_ids == expected and ids == expected, (point.method, point.streams)
                assert sample.sent <= sample.first <= sample.last
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["streams"]) for r in records] == [(p.method, p.streams) for p in points]
    for r in records:
        assert r["exact_tokens"] and r["tokens_match"] and r["follows_target"], r
        assert r["requests"] == r["streams"] * QUICK["requests"] and r["server_tokens_per_s"] > 0
        assert r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] <= r["ttft_s"]["p99"]
        rate = r["server_tokens_per_s"] / r["direct_tokens_per_s"]
        assert r["server_over_direct"] == pytest.approx(rate, rel=1e-3)
        if r["method"] != "autoregressive":  # 77% agreement: ~3 tokens per round at gamma 4
            assert r["acceptance_length"] > 1.5
        if r["method"] == "sts":  # 192-token prompts, 96 rows: sparse rounds, served and direct alike
            assert r["sparsity"] > 0.3, r
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("method") and len(table) == 1 + len(records)


@pytest.mark.parametrize(("argv", "message"), [
    (["--streams", "1,8", "--slots", "4"], "--slots >= 8"),
    (["--methods", "sts,nope"], "unknown method 'nope'"),
    (["--serve-args=--no-such-option"], "sts serve has no option --no-such-option"),
    (["--serve-args=--sink 100"], "exceed the budget"),  # sink + window past --quick's budget of 96
])
def test_what_cannot_run_is_refused_before_loading(tmp_path, argv, message):
    with pytest.raises(STSError, match=message):  # --quick: a check that let it through would load tiny shapes only
        main([*argv, "--quick", "--device", "cpu", "--out", str(tmp_path / "x.jsonl")])


def test_the_real_shapes_are_refused_on_a_cpu(tmp_path):
    with pytest.raises(STSError, match="need a CUDA device"):
        main(["--device", "cpu", "--out", str(tmp_path / "x.jsonl")])
