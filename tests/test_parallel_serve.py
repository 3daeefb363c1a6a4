"""Tensor parallelism beyond ``sts generate`` (issue 15), on the CPU with gloo and 2 processes: the end-to-end
benchmark and ``sts serve``, each against one process.

The benchmark's synthetic pair has a known greedy continuation (``sts.bench.synthetic``), so its
tokens are also checked against that rule. The server runs as a subprocess (rank 0 serves and
spawns rank 1) and is compared token for token with :func:`sts.runner.run_method` (what ``sts
generate`` runs) decoding each prompt alone in this process; it must then shut down on SIGTERM
with no process left behind.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import hf_config, hf_model, wait_until_serving
from sts.api import LLM
from sts.bench.e2e import main as e2e_main
from sts.bench.synthetic import TINY_SHAPES, next_token_maps, shape_config, synthetic_model
from sts.cli import main
from sts.errors import STSError
from sts.parallel import NO_MULTICAST, Shard, run_ranks, shard_model
from sts.runner import load_pair, run_method
from sts.selection import SelectionConfig

WORLD = 2
#: The server's settings: a budget of 16 rows makes verification sparse past 16 tokens of context.
SERVE = ["--method", "sts", "--budget", "16", "--sink", "2", "--window", "4", "--gamma", "3", "--verify", "sparse"]
MAX_LEN = 256
MODEL = "tiny"


def _weights(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_a_synthetic_part_equals_the_whole_synthetic_model_cut_by_shard_model():
    config = shape_config("tiny-target")
    f, _ = next_token_maps(config.vocab_size, 0.8)
    for rank in range(WORLD):
        part = synthetic_model(config, f, dtype=torch.float32, device="cpu", partition=Shard(rank, WORLD))
        whole = shard_model(synthetic_model(config, f, dtype=torch.float32, device="cpu"), rank, WORLD)
        expected, got = _weights(whole), _weights(part)
        assert got.keys() == expected.keys() and part.config == whole.config
        for name, value in expected.items():
            assert torch.equal(got[name], value), name


def _environment(rank: int, world: int, out_dir: str) -> None:
    """One rank: write the NVLink multicast switches as this process sees them."""
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({key: os.environ.get(key) for key in NO_MULTICAST}))


def test_every_spawned_rank_runs_with_nvlink_multicast_off(tmp_path, monkeypatch):
    for key in NO_MULTICAST:
        monkeypatch.delenv(key, raising=False)  # not inherited: each rank sets them
    run_ranks(_environment, WORLD, (str(tmp_path),))
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == NO_MULTICAST
    assert NO_MULTICAST == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _e2e(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    """Return the records of a tiny e2e run on the CPU (greedy: dense, sparse-verified and sparse-draft methods)."""
    out = tmp_path / f"{name}.jsonl"
    e2e_main(["--device", "cpu", "--target-shape", "tiny-target", "--draft-shape", "tiny-draft", "--contexts", "160",
              "--batches", "1,2", "--new-tokens", "10", "--budget", "96", "--draft-budget", "16", "--verify", "sparse",
              "--methods", "autoregressive,speculative,sts+sd", "--out", str(out), *extra])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_e2e_bench_on_two_ranks_decodes_what_one_process_does(tmp_path):
    one = _e2e(tmp_path, "one")
    two = _e2e(tmp_path, "two", "--tensor-parallel", str(WORLD))
    f, _ = next_token_maps(TINY_SHAPES["tiny-target"]["vocab_size"], 0.77)
    assert [(r["method"], r["batch"]) for r in two] == [(r["method"], r["batch"]) for r in one] and len(one) == 6
    for a, b in zip(one, two):
        assert b["tensor_parallel"] == WORLD and a["tensor_parallel"] == 1
        assert b["tokens"] == a["tokens"], (a["method"], a["batch"])
        assert len(a["tokens"]) == a["batch"] and all(len(seq) == 10 for seq in a["tokens"])
        for seq in a["tokens"]:  # the synthetic target's known rule: t is followed by f(t)
            assert all(int(f[x]) == y for x, y in zip(seq, seq[1:]))
        if a["method"] == "sts+sd":
            assert a["sparsity"] > 0.3 and b["sparsity"] == pytest.approx(a["sparsity"])


# ---------------------------------------------------------------------------------------------- sts serve


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """Return checkpoint directories of a 4-KV-head target (2 per rank) and a noisy copy as draft, and the loaded pair.

    No end-of-sequence id: every request decodes all its tokens, sampled ones too."""
    root = tmp_path_factory.mktemp("tp-serve")
    # Head dimension 32: on CUDA the Triton kernels take it, so the engine captures its rounds in graphs.
    config = hf_config("llama", heads=8, kv_heads=4, hidden=256, max_position_embeddings=MAX_LEN, eos_token_id=None)
    target = hf_model(config, seed=0)
    target.save_pretrained(root / "target")
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=noise) * p.std())
    target.save_pretrained(root / "draft")
    loaded = load_pair(str(root / "target"), str(root / "draft"), torch.float32, "cpu")
    return {"target": str(root / "target"), "draft": str(root / "draft"), "loaded": loaded}


def _reference(pair: dict, ids: list[int], max_tokens: int) -> list[int]:
    """Return ``sts generate``'s greedy tokens for one prompt alone, in one process, with the server's settings."""
    target, draft = pair["loaded"]
    return run_method("sts", target, draft, [ids], max_tokens, gamma=3, selection=SelectionConfig(budget=16, sink=2, window=4),
                      verify="sparse").tokens[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Return the ids of the processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _complete(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "return_token_ids": True, **body}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    assert response.status == 200, reply
    return reply["choices"][0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the rank processes in /proc")
def test_serve_on_two_ranks_answers_what_one_process_decodes_and_shuts_down_cleanly(pair, tmp_path):
    port = _free_port()
    argv = [sys.executable, "-m", "sts.cli", "serve", "--target", pair["target"], "--draft", pair["draft"], *SERVE,
            "--slots", "3", "--max-model-len", str(MAX_LEN), "--port", str(port), "--served-model-name", MODEL,
            "--log-level", "warning", "--tensor-parallel", str(WORLD), "--device", "cpu"]  # gloo, as the reference
    log = tmp_path / "server.log"
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks: list[int] = []
    try:
        wait_until_serving(proc, port, log, 120, "sts serve --tensor-parallel 2")
        ranks = _children(proc.pid)
        assert ranks, "rank 1 runs in a process of its own"

        # Five prompts of different lengths in 3 slots: requests join and leave the batch between rounds.
        prompts = [[(7 * i + j) % 90 + 3 for j in range(20 + 9 * i)] for i in range(5)]
        expected = [_reference(pair, ids, 12) for ids in prompts]
        assert _complete(port, {"prompt": prompts[0], "max_tokens": 12, "temperature": 0})["token_ids"] == expected[0]
        got: dict[int, list[int]] = {}

        def ask(i: int) -> None:
            got[i] = _complete(port, {"prompt": prompts[i], "max_tokens": 12, "temperature": 0})["token_ids"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(i) for i in range(len(prompts))] == expected

        # A seeded sampled request reseeds every rank's generator (else the ranks would decode different tokens).
        sampled = [_complete(port, {"prompt": prompts[1], "max_tokens": 12, "temperature": 1.0, "seed": 5})["token_ids"]
                   for _ in range(2)]
        assert sampled[0] == sampled[1] and len(sampled[0]) == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in ranks if _alive(pid)], "a rank outlived the server"
    finally:
        for pid in [proc.pid, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < WORLD, reason="needs 2 GPUs"))])
def test_the_api_on_two_ranks_equals_one_process(pair, device):
    """``LLM(..., tensor_parallel=2)`` (this process is rank 0): a seeded sampled request and a greedy one equal one
    process's (on CUDA with NCCL all-reduces inside the engine's CUDA graphs); ``close`` stops rank 1."""
    settings = dict(method="sts", budget=16, sink=2, window=4, gamma=3, verify="sparse", max_model_len=MAX_LEN,
                    device=device, dtype="float32")
    one = LLM(pair["target"], pair["draft"], **settings)
    ids = list(range(3, 40))
    reference = [c.token_ids for c in one.generate([ids, ids[5:]], max_tokens=12, temperature=1.0, seed=11)]
    llm = LLM(pair["target"], pair["draft"], **settings, tensor_parallel=WORLD)
    try:
        workers = llm.parallel.workers
        assert llm.engine.graphs_enabled == (device == "cuda")
        assert [c.token_ids for c in llm.generate([ids, ids[5:]], max_tokens=12, temperature=1.0, seed=11)] == reference
        assert all(len(tokens) == 12 for tokens in reference) and reference[0] != reference[1]
        assert llm.generate(ids, max_tokens=8)[0].token_ids == one.generate(ids, max_tokens=8)[0].token_ids
    finally:
        llm.close()
    assert not any(p.is_alive() for p in workers.processes) and not torch.distributed.is_initialized()


def test_tensor_parallel_serving_refuses_what_it_cannot_split(pair, capsys):
    with pytest.raises(STSError, match="checkpoint paths"):
        LLM(pair["loaded"][0], pair["loaded"][1], method="sts", tensor_parallel=WORLD)
    argv = ["serve", "--target", pair["target"], "--draft", pair["draft"], *SERVE, "--max-model-len", str(MAX_LEN),
            "--port", str(_free_port()), "--device", "cpu"]  # on a GPU host with fewer GPUs, that count is refused first
    assert main([*argv, "--tensor-parallel", "3"]) == 2
    assert "4 KV heads, not divisible by 3" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()
    assert main([*argv, "--tensor-parallel", "0"]) == 2
    assert "--tensor-parallel must be >= 1" in capsys.readouterr().err
