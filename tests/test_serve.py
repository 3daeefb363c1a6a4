"""``sts serve`` and the Python API: the official openai client against a live server, continuous batching,
a bounded load test, bad requests, internal errors, disconnects, and ``LLM`` against ``run_method``.

The pair is a tiny random Llama target and a noisy copy as draft with SmolLM2's real tokenizer
(byte-level BPE with a chat template), saved as checkpoint directories. Greedy outputs are
compared token for token with ``sts generate`` / :func:`sts.runner.run_method` decoding the same
prompt alone (one slot, no scheduler, no HTTP), and batched outputs with the same requests sent
one at a time.
"""

from __future__ import annotations

import copy
import errno
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import torch

from conftest import hf_config, hf_model, wait_until_serving
from smollm2 import smollm2_tokenizer
from sts.bench.serve import serving
from sts.runner import load_pair, run_method
from sts.selection import SelectionConfig

ROOT = Path(__file__).resolve().parents[1]
#: The server's method settings: a budget of 32 rows makes verification sparse past 32 tokens of context
#: (``verify="sparse"``: tiny models never reach the cost model's break-even, so "auto" would verify densely).
SETTINGS = dict(method="sts", budget=32, sink=4, window=8, gamma=3, verify="sparse")
CLI_SETTINGS = ["--method", "sts", "--budget", "32", "--sink", "4", "--window", "8", "--gamma", "3", "--verify", "sparse"]
MAX_LEN = 512
MODEL = "tiny"
TEXT = ("The committee met on a grey morning to discuss the harbour, the budget for the new bridge and "
        "the long list of complaints about the ferry timetable. ")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: on a shared 2-core machine a second intra-op thread only adds contention (measured 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, sts_cache_dir) -> dict[str, Any]:
    """Return checkpoint directories of the target and draft (with the tokenizer) and the loaded reference pair."""
    tokenizer = smollm2_tokenizer(sts_cache_dir)
    root = tmp_path_factory.mktemp("serve-pair")
    config = hf_config("llama", vocab=len(tokenizer), layers=2, max_position_embeddings=MAX_LEN)
    target = hf_model(config, seed=0)
    draft = copy.deepcopy(target)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=noise) * p.std())
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    loaded = load_pair(str(root / "target"), str(root / "draft"), torch.float32, "cpu")
    return {"target": str(root / "target"), "draft": str(root / "draft"), "tokenizer": tokenizer, "loaded": loaded,
            "hf": target}


def reference(pair: dict[str, Any], ids: list[int], max_tokens: int, method: str = "sts", budget: float = 32,
              **options: Any) -> list[int]:
    """Return ``run_method``'s greedy tokens for one prompt alone, with the server's settings (or another budget, and
    policy ``options``): its draft too, the default of the method (STS's tokens depend on the rows the draft's queries
    pick)."""
    target, draft = pair["loaded"]
    selection = SelectionConfig(budget=budget, sink=4, window=8)
    return run_method(method, target, draft, [ids], max_tokens, gamma=3, selection=selection, verify="sparse",
                      draft_budget="auto", options=options).tokens[0]


def make_llm(pair: dict[str, Any], **extra: Any):
    from sts import LLM

    settings = {**SETTINGS, "max_model_len": MAX_LEN, **extra}
    if settings["method"] in ("autoregressive", "speculative"):
        del settings["budget"]  # dense methods take none
    return LLM(pair["target"], pair["draft"], **settings)


@pytest.fixture(scope="module")
def server(pair) -> Iterator[tuple[str, Any]]:
    """Return (base URL, LLM) of a server with 4 slots whose prefill reads 16 tokens per chunk."""
    from sts.serve.app import create_app

    llm = make_llm(pair, slots=4, prefill_chunk=16)
    with serving(create_app(llm, MODEL)) as url:
        yield url, llm


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def post_raw(url: str, path: str, body: bytes | dict | list, headers: dict[str, str] | None = None,
             chunked: bool = False) -> tuple[int, bytes]:
    """Return (status, body) of a raw POST (any bytes, unlike a client library's; ``chunked``: in 1 KiB chunks
    without Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = iter([data[i:i + 1024] for i in range(0, len(data), 1024)]) if chunked else data
    conn.request("POST", path, sent, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, payload


def post(url: str, path: str, body: bytes | dict | list, headers: dict[str, str] | None = None,
         chunked: bool = False) -> tuple[int, dict]:
    """Return (status, JSON body) of :func:`post_raw`."""
    status, payload = post_raw(url, path, body, headers, chunked)
    return status, json.loads(payload) if payload else {}


def generate_json(capsys, pair, text: str, max_tokens: int, chat: bool = False) -> list[int]:
    """Return the tokens of ``sts generate --json`` with the server's settings."""
    from sts.cli import main

    argv = ["generate", "--target", pair["target"], "--draft", pair["draft"], "--prompt", text, *CLI_SETTINGS,
            "--max-new-tokens", str(max_tokens), "--json"] + (["--chat"] if chat else [])
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def wait_idle(llm, timeout: float = 30.0) -> None:
    """Wait until the server's scheduler holds no request and every slot is free."""
    deadline = time.monotonic() + timeout
    while not (llm.scheduler.idle and len(llm.engine.free_slots()) == llm.engine.slots):
        assert time.monotonic() < deadline, "the scheduler kept a request"
        time.sleep(0.02)


# --- the openai client against the server ---------------------------------------------------


def test_openai_client_completion_chat_and_streams_equal_sts_generate(capsys, pair, server):
    url, _ = server
    tok = pair["tokenizer"]
    api = client(url)
    prompt = TEXT * 2  # 50-odd tokens: sparse verification, prefill in 4 chunks
    expected = generate_json(capsys, pair, prompt, 12)
    assert len(tok(prompt)["input_ids"]) > 32

    done = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    choice = done.choices[0]
    assert choice.token_ids == expected and choice.finish_reason == "length"
    assert choice.text == tok.decode(expected, skip_special_tokens=True)
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert done.model_extra["sts"]["acceptance_length"] >= 1

    stop = choice.text[len(choice.text) // 2 :][:3]
    cut = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=["\x00", stop])
    assert cut.choices[0].text == choice.text[: choice.text.find(stop)] and cut.choices[0].finish_reason == "stop"

    chunks = list(api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                         extra_body={"return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in (getattr(c.choices[0], "token_ids", None) or [])] == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length" and len(chunks) > 2

    question = "Which bridge did the committee discuss?"
    expected_chat = generate_json(capsys, pair, question, 10, chat=True)
    messages = [{"role": "user", "content": question}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                        extra_body={"return_token_ids": True})
    assert reply.choices[0].token_ids == expected_chat
    assert reply.choices[0].message.content == tok.decode(expected_chat, skip_special_tokens=True)
    assert reply.choices[0].message.role == "assistant"

    stream = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 10

    (listed,) = api.models.list().data
    assert listed.id == MODEL and abs(listed.created - time.time()) < 3600  # created: when the server started
    assert api.models.retrieve(MODEL).model_dump() == listed.model_dump()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.models.retrieve("another-model")
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"))
    conn.request("GET", "/metrics")  # Prometheus' text format
    text = conn.getresponse().read().decode()
    for name in ("sts_requests_total", "sts_generation_tokens_total", "sts_acceptance_length_bucket", "sts_sparsity_bucket",
                 "sts_queue_length", "sts_time_to_first_token_seconds_bucket"):
        assert name in text, name
    # A model's route, found or not, is counted as the route (not with unknown paths, "other").
    assert 'sts_http_requests_total{code="200",route="/v1/models/{id}"}' in text, text
    assert 'sts_http_requests_total{code="404",route="/v1/models/{id}"}' in text, text
    # The server verifies sparsely (SETTINGS' verify="sparse"): every round it counted is a sparse one.
    rounds = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("sts_verify_rounds_total{")}
    assert rounds.get("sparse", 0) > 0 and rounds.get("dense", 0) == 0, rounds


def test_continuous_batching_is_lossless(pair, server):
    """8 greedy requests of different lengths at once through 4 slots give the tokens each gives alone."""
    url, llm = server
    api = client(url)
    jobs = [(TEXT * (1 + i % 4) + f" Item {i}.", 6 + 5 * i) for i in range(8)]  # 30 to 130 prompt tokens

    def ask(job: tuple[str, int]) -> list[int]:
        out = api.completions.create(model=MODEL, prompt=job[0], max_tokens=job[1], temperature=0,
                                     extra_body={"return_token_ids": True})
        return out.choices[0].token_ids

    alone = [ask(job) for job in jobs]
    together: list[list[int] | None] = [None] * len(jobs)

    def run(i: int) -> None:
        together[i] = ask(jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert [len(a) for a in alone] == [n for _, n in jobs]
    # And alone equals the one-slot reference (no scheduler, no chunked prefill).
    tok = pair["tokenizer"]
    assert alone[3] == reference(pair, tok(jobs[3][0])["input_ids"], jobs[3][1])
    wait_idle(llm)


@pytest.mark.parametrize("options", [{}, {"key_bits": 8}], ids=["16-bit-keys", "8-bit-keys"])
def test_a_long_prefill_does_not_stall_decoding_and_changes_no_token(pair, options):
    """Prefill chunks interleave with decode rounds: the decoding request gets tokens in every iteration while a
    400-token prompt is read 16 tokens at a time, and both outputs equal each request decoded alone (with STS's
    8-bit keys too: the long request's mean key does not see the rounds)."""
    llm = make_llm(pair, slots=2, prefill_chunk=16, **options)
    llm.scheduler.prefill_slice_s = 0.0  # one chunk between two rounds
    tok = pair["tokenizer"]
    short, long = tok(TEXT)["input_ids"], (tok(TEXT * 20)["input_ids"])[:400]
    alone = [llm.generate([ids], max_tokens=n)[0].token_ids for ids, n in ((short, 150), (long, 20))]

    got: dict[int, list] = {0: [], 1: []}
    a = llm.submit(short, llm.params(len(short), 150), got[0].append)
    while not got[0]:
        llm.scheduler.run_once()
    b = llm.submit(long, llm.params(len(long), 20), got[1].append)
    stalled = iterations = 0
    while not got[1]:
        before = len(a.token_ids)
        llm.scheduler.run_once()
        iterations += 1
        stalled += len(a.token_ids) == before and a.finish_reason is None
    assert iterations >= 2 * 400 // 16 and stalled == 0  # target and draft chunks, each beside a round
    while not llm.scheduler.idle:
        llm.scheduler.run_once()
    assert [a.token_ids, b.token_ids] == alone == [reference(pair, short, 150, **options),
                                                   reference(pair, long, 20, **options)]


def test_a_request_that_cannot_be_admitted_fails_alone(pair):
    """A request whose admission raises (a seed the generator refuses, past the checks of ``params``) finishes with
    an error and holds no slot; the request after it decodes as it would alone."""
    import dataclasses

    llm = make_llm(pair, slots=1)
    try:
        ids = pair["tokenizer"](TEXT)["input_ids"]
        bad = dataclasses.replace(llm.params(len(ids), 4), seed=2**64)
        got: list = []
        failed = llm.submit(ids, bad, got.append)
        good = llm.submit(ids, llm.params(len(ids), 6), got.append)
        while not llm.scheduler.idle:
            llm.scheduler.run_once()
        assert failed.finish_reason == "error" and failed.token_ids == []
        assert good.finish_reason == "length" and good.token_ids == reference(pair, ids, 6)
    finally:
        llm.close()


# --- a bounded load test on localhost -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Return the resident memory of process ``pid`` (Linux /proc)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p90": round(pick(0.9), 4), "p99": round(pick(0.99), 4), "max": round(ordered[-1], 4)}


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_load_1000_requests_16_clients_no_errors_flat_memory(pair, tmp_path):
    """``sts serve`` in a subprocess on 127.0.0.1; 16 clients send 1000 streamed requests in all (bounded)."""
    port, total, clients, max_tokens = free_port(), 1000, 16, 8
    argv = [sys.executable, "-m", "sts.cli", "serve", "--target", pair["target"], "--draft", pair["draft"], *CLI_SETTINGS,
            "--slots", "8", "--max-model-len", str(MAX_LEN), "--port", str(port), "--served-model-name", MODEL,
            "--log-level", "warning"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, port, tmp_path / "server.log", 180)
        api = client(url)
        lock = threading.Lock()
        issued, finished, errors = [0], [0], []
        ttft, rates, rss = [], [], {}
        began = time.perf_counter()

        def worker() -> None:
            while True:
                with lock:
                    if issued[0] >= total:
                        return
                    i = issued[0]
                    issued[0] += 1
                try:
                    start = time.perf_counter()
                    first, n, reason = None, 0, None
                    for chunk in api.completions.create(model=MODEL, prompt=f"Request {i}: " + TEXT[: 20 + i % 60],
                                                        max_tokens=max_tokens, temperature=0, stream=True,
                                                        extra_body={"return_token_ids": True}):
                        ids = getattr(chunk.choices[0], "token_ids", None) or []
                        if ids and first is None:
                            first = time.perf_counter()
                        n += len(ids)
                        reason = chunk.choices[0].finish_reason or reason
                    end = time.perf_counter()
                    assert n == max_tokens or (reason == "stop" and n > 0), (n, reason)  # "stop": an end-of-sequence id
                    with lock:
                        ttft.append(first - start)
                        rates.append((n - 1) / max(end - first, 1e-9))
                except Exception as exc:  # noqa: BLE001  (counted, reported below)
                    with lock:
                        errors.append(repr(exc))
                with lock:
                    finished[0] += 1
                    if finished[0] in (200, total):
                        rss[finished[0]] = rss_bytes(proc.pid)

        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - began
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert not errors, errors[:5]
    growth = rss[total] / rss[200] - 1
    report = {
        "command": " ".join(["sts", *argv[3:]]).replace(pair["target"], "TARGET").replace(pair["draft"], "DRAFT"),
        "clients": clients, "requests": total, "max_tokens": max_tokens,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} (client and server share them)",
        "model": "tiny random Llama pair (2 layers, hidden 64) with SmolLM2's tokenizer, float32, OMP_NUM_THREADS=1",
        "errors": len(errors), "wall_s": round(wall, 2), "requests_per_s": round(total / wall, 2),
        "tokens_per_s_total": round(total * max_tokens / wall, 1),
        "time_to_first_token_s": percentiles(ttft), "tokens_per_s_per_request": percentiles(rates),
        "rss_mb_at_200": round(rss[200] / 2**20, 1), "rss_mb_at_1000": round(rss[total] / 2**20, 1),
        "rss_growth_200_to_1000": round(growth, 4),
    }
    print(json.dumps(report, indent=2))
    # The committed record (docs/bench/serve-load-cpu.json) is refreshed on purpose, not by every test run:
    # STS_SERVE_LOAD_RECORD=docs/bench/serve-load-cpu.json python -m pytest -q tests/test_serve.py -k load
    record = os.environ.get("STS_SERVE_LOAD_RECORD")
    (Path(record) if record else tmp_path / "serve-load.json").write_text(json.dumps(report, indent=2) + "\n")
    assert growth < 0.05, report


# --- bad requests, internal errors, disconnects ---------------------------------------------


def assert_error(status: int, body: dict, expected: int, param: str | None = None, code: str | None = None) -> None:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    if param is not None:
        assert error["param"] == param, body
    if code is not None:
        assert error["code"] == code, body


def assert_serves(url: str) -> None:
    status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body


GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny", "prompt": ', 400, None, "json_invalid"),
    ("unknown model", {**GOOD, "model": "gpt-5"}, 404, "model", "model_not_found"),
    ("max_tokens a string", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", None),
    ("temperature a list", {**GOOD, "temperature": [1]}, 400, "temperature", None),
    ("no prompt", {"model": MODEL}, 400, "prompt", None),
    ("max_tokens past the context", {**GOOD, "max_tokens": MAX_LEN}, 400, "max_tokens", "context_length_exceeded"),
    ("prompt past the context", {**GOOD, "prompt": [7] * (MAX_LEN + 1)}, 400, "prompt", "context_length_exceeded"),
    ("empty prompt", {**GOOD, "prompt": ""}, 400, "prompt", None),
    ("ids outside the vocabulary", {**GOOD, "prompt": [10**6]}, 400, "prompt", None),
    ("impossible budget", {**GOOD, "budget": 8}, 400, "budget", "invalid_value"),
    ("negative budget", {**GOOD, "budget": -0.5}, 400, "budget", "invalid_value"),
    ("method override", {**GOOD, "method": "streaming"}, 400, "method", "unsupported_override"),
    ("gamma override", {**GOOD, "gamma": 5}, 400, "gamma", "unsupported_override"),
    ("STS option override", {**GOOD, "rerank": 0}, 400, "rerank", "unsupported_override"),
    ("another policy's option", {**GOOD, "page_size": 8}, 400, "page_size", "unsupported_override"),
    ("a dense draft", {**GOOD, "draft_budget": "dense"}, 400, "draft_budget", "unsupported_override"),
    ("draft_budget neither a count, auto nor dense", {**GOOD, "draft_budget": "sparse"}, 400, "draft_budget", "value_error"),
    ("n > 1", {**GOOD, "n": 2}, 400, "n", None),
    ("negative temperature", {**GOOD, "temperature": -1.0}, 400, "temperature", None),
    ("top_p out of range", {**GOOD, "top_p": 1.5}, 400, "top_p", None),
    ("NaN budget", {**GOOD, "budget": float("nan")}, 400, "budget", "invalid_value"),
    ("infinite temperature", {**GOOD, "temperature": float("inf")}, 400, "temperature", None),
    ("temperature past float32", {**GOOD, "temperature": 1e39}, 400, "temperature", None),
    ("top_k past 64 bits", {**GOOD, "top_k": 2**70}, 400, "top_k", None),
    ("seed past 64 bits", {**GOOD, "seed": 2**64}, 400, "seed", None),
    ("logprobs", {**GOOD, "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("several prompts", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("a JSON list, not an object", [GOOD], 400, None, None),
    ("a body that is not UTF-8", b'{"model": "tiny", "prompt": "caf\xe9"}', 400, None, "json_invalid"),
    ("a lone surrogate in the prompt", b'{"model": "tiny", "prompt": "caf\\udcff"}', 400, "prompt", None),
    ("prompt a number", {**GOOD, "prompt": 5}, 400, "prompt", None),
    ("stop a number", {**GOOD, "stop": 5}, 400, "stop", None),
    ("stream_options without stream", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
]


@pytest.mark.parametrize(("what", "body", "status", "param", "code"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_its_4xx_and_the_next_one_succeeds(server, what, body, status, param, code):
    url, _ = server
    assert_error(*post(url, "/v1/completions", body), status, param, code)
    assert_serves(url)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
#: A valid value (not the default, but for n) of each field a request may set: a field the 400 lists and this lacks fails.
SETTABLE = {"max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "n": 1, "stream": True,
            "stream_options": {"include_usage": True}, "stop": ["\n\n"], "seed": 3, "user": "me", "return_token_ids": True,
            "ignore_eos": True, "budget": 16, "max_completion_tokens": 2}
#: The method settings with values other than the server's (SETTINGS; dense_layers 0, sts's default draft: 4096 scored
#: rows), and a selection policy option (sts's default rerank: 4).
OVERRIDES = {"method": "streaming", "gamma": 5, "sink": 2, "window": 4, "dense_layers": 1, "draft_budget": 64,
             "draft_selection": "recent", "rerank": 0}


@pytest.mark.parametrize(("path", "good"), [("/v1/completions", GOOD), ("/v1/chat/completions", CHAT)],
                         ids=["completion", "chat"])
def test_a_refused_override_lists_what_a_request_may_set_and_each_is_accepted(server, path, good):
    """Each method setting other than the server's is a 400; the fixed ones' message lists the fields a request may
    set, which include what vLLM-style clients send, none of the refused ones, and each of which gets a 200."""
    url, llm = server
    lists = []
    for name, value in OVERRIDES.items():
        status, body = post(url, path, {**good, name: value})
        assert_error(status, body, 400, name, "unsupported_override")
        if name != "method":  # its message says to start another server
            lists.append(body["error"]["message"].split("a request may set only ", 1)[1].split(", "))
    listed = lists[0]
    assert all(fields == listed for fields in lists), lists
    assert {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "budget", "n", "stream", "ignore_eos",
            "return_token_ids"} <= set(listed), listed
    assert not set(listed) & {*OVERRIDES, "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}, listed
    for name in listed:
        streamed = name in ("stream", "stream_options")  # stream_options only with stream: true (as OpenAI)
        status, payload = post_raw(url, path, {**good, name: SETTABLE[name]} | ({"stream": True} if streamed else {}))
        assert status == 200, (name, payload)
        assert b'"error"' not in payload and (payload.endswith(b"data: [DONE]\n\n") if streamed else
                                              json.loads(payload)["usage"]["completion_tokens"] > 0), (name, payload)
    wait_idle(llm)


def test_every_policy_option_is_refused_but_with_the_servers_value(server):
    """Each option any selection policy takes (sts.selection's constructors: not a list of the test's own) is a 400 with
    any value but the server's, as /v1/models reports it; its own value, and "auto" or the row count the server's draft
    budget resolves to, are served."""
    from sts.serve.protocol import POLICY_OPTIONS

    url, llm = server
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=60)
    conn.request("GET", "/v1/models")
    reported = json.loads(conn.getresponse().read())["data"][0]["sts"]
    assert {"rerank", "rerank_prob", "feedback", "head_budgets"} <= set(POLICY_OPTIONS) and "page_size" in POLICY_OPTIONS
    assert reported["rerank"] == 4 and "page_size" not in reported, reported  # sts's default; quest's option
    for name in POLICY_OPTIONS:
        value = reported.get(name)
        other = value + "-other" if isinstance(value, str) else value + 1 if isinstance(value, (int, float)) else [1]
        status, body = post(url, "/v1/completions", {**GOOD, name: other})
        assert_error(status, body, 400, name, "unsupported_override")
        assert f"{name} is fixed when the server starts" in body["error"]["message"], body
        if name in reported:
            status, body = post(url, "/v1/completions", {**GOOD, name: value})
            assert status == 200, (name, body)
    status, body = post(url, "/v1/completions", {**GOOD, "draft_budget": "dense"})
    assert f"(this server: draft_budget={reported['draft_budget']})" in body["error"]["message"], body
    for value in ("auto", reported["draft_budget"]):
        status, body = post(url, "/v1/completions", {**GOOD, "draft_budget": value})
        assert status == 200, (value, body)
    wait_idle(llm)


def test_a_body_not_sent_as_json_is_a_415_that_says_so(server):
    """A JSON body sent as text, a form (curl -d without -H) or untyped is refused, as FastAPI refuses it (against
    cross-site requests from a browser), with a 415 that names the Content-Type; JSON types, with parameters, are read."""
    url, llm = server
    for kind in ("text/plain", "application/x-www-form-urlencoded", "text/json", ""):
        status, body = post(url, "/v1/completions", GOOD, {"Content-Type": kind})
        assert_error(status, body, 415, None, "unsupported_media_type")
        sent = f"got {kind!r}" if kind else "none was sent"
        assert body["error"]["message"] == f"Content-Type must be application/json, {sent}", body
    for kind in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
        status, body = post(url, "/v1/chat/completions", CHAT, {"Content-Type": kind})
        assert status == 200 and body["usage"]["completion_tokens"] == 3, (kind, body)
    assert_serves(url)
    wait_idle(llm)


def test_a_body_past_the_limit_is_a_413_unread_and_the_server_goes_on(pair):
    """With Content-Length or chunked, a body one byte past --max-request-bytes is a 413 with the error body, sent before
    the rest of the body (none, or an endless stream) has come; a body of exactly the limit is served."""
    from sts.serve.app import create_app

    limit = 4096
    llm = make_llm(pair, method="autoregressive", slots=1)
    with serving(create_app(llm, MODEL, max_request_bytes=limit)) as url:
        at_limit = json.dumps(GOOD).encode().ljust(limit)  # JSON with trailing spaces
        for chunked in (False, True):
            status, body = post(url, "/v1/completions", at_limit, chunked=chunked)
            assert status == 200 and body["usage"]["completion_tokens"] == 3, body
            status, body = post(url, "/v1/completions", at_limit + b" ", chunked=chunked)
            assert_error(status, body, 413, code="request_too_large")
            assert str(limit) in body["error"]["message"]
            assert_serves(url)
        host, port = url.removeprefix("http://").split(":")
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for framing in (b"Content-Length: 1000000000000\r\n\r\n",  # and not one byte of the body
                        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (limit + 1) + b" " * (limit + 1) + b"\r\n"):
            with socket.create_connection((host, int(port)), timeout=60) as sock:
                sock.sendall(head + framing)
                response = http.client.HTTPResponse(sock)
                response.begin()
                assert response.getheader("connection") == "close"
                assert_error(response.status, json.loads(response.read()), 413, code="request_too_large")
                sock.settimeout(10)
                assert sock.recv(1) == b""  # closed by the server: it does not wait for the rest of the body
            assert_serves(url)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", "/metrics")
        counted = conn.getresponse().read().decode()
        assert 'sts_http_requests_total{code="413",route="/v1/completions"} 4.0' in counted, counted


def test_concurrent_requests_with_their_own_budgets_each_equal_run_method_at_it(pair, server):
    """Two requests decoding together at budgets 16 and 48 rows (the server's: 32), and one at a fraction: each gives
    ``run_method``'s tokens for it alone at its budget (sparse verification, contexts past every budget)."""
    url, llm = server
    tok = pair["tokenizer"]
    jobs = [(TEXT * 3, 16, 40), (TEXT * 3 + " And then?", 48, 30), (TEXT * 9, 0.25, 20)]  # 0.25: 72 of ~270 rows
    got: list[list[int] | None] = [None] * len(jobs)

    def run(i: int) -> None:
        text, budget, n = jobs[i]
        status, body = post(url, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": n, "temperature": 0,
                                                     "budget": budget, "return_token_ids": True})
        got[i] = body["choices"][0]["token_ids"] if status == 200 else body

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [reference(pair, tok(text)["input_ids"], n, budget=budget) for text, budget, n in jobs]
    assert reference(pair, tok(jobs[0][0])["input_ids"], 40) != got[0]  # the budget made a difference
    wait_idle(llm)


def test_max_tokens_past_the_context_says_what_takes_the_rows(server):
    """The 400 names the prompt's tokens, the room left and the rows a round writes: together, the max model length."""
    url, llm = server
    status, body = post(url, "/v1/completions", {**GOOD, "prompt": [7] * 100, "max_tokens": MAX_LEN})
    assert_error(status, body, 400, "max_tokens", "context_length_exceeded")
    prompt, room, max_len, scratch = map(int, re.findall(r"(\d+) tokens leaves room for (\d+) \(max model length (\d+), "
                                                          r"(\d+) rows for a round", body["error"]["message"])[0])
    assert (prompt, max_len, scratch) == (100, MAX_LEN, llm.gamma + 1) and prompt + room + scratch == MAX_LEN


def test_null_fields_take_their_defaults_as_openai_reads_them(server):
    """OpenAI types the sampling fields "... or null": a null is the field's default, for both endpoints; a prompt
    that is a number names the field and the kinds of value it takes."""
    url, _ = server
    nulls = dict.fromkeys(("n", "temperature", "top_p", "top_k", "stream", "return_token_ids", "ignore_eos"))
    for path, body in (("/v1/completions", GOOD), ("/v1/chat/completions", CHAT)):
        status, reply = post(url, path, {**body, **nulls})  # temperature null: 1, sampled
        assert status == 200 and reply["usage"]["completion_tokens"] == 3, reply
        greedy = {**body, "temperature": 0}
        status, reply = post(url, path, {**greedy, **nulls, "temperature": 0})
        assert status == 200 and reply["choices"][0] == post(url, path, greedy)[1]["choices"][0], reply
    status, body = post(url, "/v1/completions", {**GOOD, "prompt": 5})
    assert body["error"]["message"] == "prompt: must be one of str, list[int], list[str], list[list[int]]", body


def test_bad_chat_requests_and_routes(server):
    url, llm = server
    chat = {"model": MODEL, "max_tokens": 2}
    assert_error(*post(url, "/v1/chat/completions", {**chat, "messages": []}), 400, "messages")
    status, body = post(url, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 3}]})
    assert_error(status, body, 400, "messages.0.content")  # the field, not pydantic's branch (content.str)
    assert body["error"]["message"] == "messages.0.content: must be one of str, list[ContentPart]", body
    assert_error(*post(url, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": None}]}), 400,
                 "messages.0")
    assert_error(*post(url, "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}), 400)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(*post(url, "/v1/chat/completions", {**chat, "messages": image}), 400, "messages.0.content")
    assert_error(*post(url, "/v1/nothing", GOOD), 404)
    llm.scheduler.max_queue, free = 0, llm.scheduler.free_slots
    llm.scheduler.free_slots = lambda: []  # every slot busy: the queue takes nobody
    try:
        assert_error(*post(url, "/v1/completions", GOOD), 429, code="queue_full")
    finally:
        llm.scheduler.max_queue, llm.scheduler.free_slots = 64, free
    assert_serves(url)


def test_an_internal_error_fails_that_request_only(server, monkeypatch):
    url, llm = server
    real_step, real_prefill = llm.engine.step, llm.engine.prefill_steps

    def broken_step():
        monkeypatch.setattr(llm.engine, "step", real_step)
        raise RuntimeError("injected fault in a round")

    monkeypatch.setattr(llm.engine, "step", broken_step)
    status, body = post(url, "/v1/completions", {**GOOD, "max_tokens": 20})
    assert_error(status, body, 500)
    assert "injected fault" in body["error"]["message"] and body["error"]["type"] == "internal_error"
    assert_serves(url)

    def broken_prefill(*args, **kwargs):
        monkeypatch.setattr(llm.engine, "prefill_steps", real_prefill)
        yield None
        raise ValueError("injected fault in a prefill")

    monkeypatch.setattr(llm.engine, "prefill_steps", broken_prefill)
    assert_error(*post(url, "/v1/completions", GOOD), 500)
    assert_serves(url)

    monkeypatch.setattr(llm.engine, "step", broken_step)  # mid-stream: an error event, then [DONE]
    with pytest.raises(openai.APIError, match="injected fault"):
        list(client(url).completions.create(model=MODEL, prompt="Hello", max_tokens=20, stream=True))
    assert_serves(url)
    wait_idle(llm)


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch):
    url, llm = server
    real_step = llm.engine.step

    def slow_step():
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    host, port = url.removeprefix("http://").split(":")
    finished: list = []
    observer = llm.scheduler.observer
    monkeypatch.setattr(observer, "finished", lambda request, real=observer.finished: (finished.append(request), real(request)))
    for stream in (True, False):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": stream}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        if stream:
            response = conn.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")
        else:
            time.sleep(0.3)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_idle(llm, timeout=20)
        assert finished[-1].finish_reason == "abort" and len(finished[-1].token_ids) < 400, (stream, [(r.finish_reason, len(r.token_ids), r.prompt_ids) for r in finished])
    assert_serves(url)


def test_an_api_key_guards_every_route_but_health(pair):
    from sts.serve.app import create_app

    from sts.errors import STSError

    llm = make_llm(pair, method="autoregressive", slots=1)
    with pytest.raises(STSError, match="the API key is empty"):  # a bare "Bearer" header would match it
        create_app(llm, MODEL, api_key="")
    with serving(create_app(llm, MODEL, api_key="s3cret")) as url:
        assert_error(*post(url, "/v1/completions", GOOD), 401, code="invalid_api_key")
        assert_error(*post(url, "/v1/completions", GOOD, {"Authorization": "Bearer wrong"}), 401)
        for path in ("/v1/models", "/metrics", "/health"):
            conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"))
            conn.request("GET", path)
            assert conn.getresponse().status == (200 if path == "/health" else 401), path
        out = client(url, key="s3cret").completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens == 2


# --- the Python API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(pair):
    return make_llm(pair, slots=2)


def test_text_that_is_not_unicode_is_a_request_error(llm):
    from sts.api import RequestError

    # A lone surrogate: undecodable command-line bytes (surrogateescape) or a JSON "\\udcff" escape.
    with pytest.raises(RequestError, match="prompt is not valid Unicode text: a lone surrogate '\\\\udcff' at character 3"):
        llm.generate("caf\udcff", max_tokens=2)
    with pytest.raises(RequestError, match=r"messages\[1\]\.content is not valid Unicode") as chat:
        llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x\ud800y"}], max_tokens=2)
    assert chat.value.param == "messages[1].content"


def test_llm_refuses_bytes_prompts_and_chat_roles_the_server_refuses(llm):
    """Bytes are not token ids; a chat role outside the server's (its request model's) is an error, not a message
    the template drops."""
    import typing

    from sts.api import CHAT_ROLES, RequestError
    from sts.serve.protocol import ChatMessage

    assert typing.get_args(ChatMessage.model_fields["role"].annotation) == CHAT_ROLES
    with pytest.raises(RequestError, match="a prompt is text or a list of token ids, got bytes"):
        llm.generate(b"hello", max_tokens=2)
    with pytest.raises(RequestError, match=r"token ids \(integers\), got str 'a' in the list"):
        llm.generate([1, "a"], max_tokens=2)
    for message, param, message_text in (
        ({"role": "narrator", "content": "x"}, "messages[1].role", "role is one of system, user, .*, got 'narrator'"),
        ({"content": "x"}, "messages[1].role", "got None"),
        ("x", "messages[1]", "a message is a dict with a role and content, got str"),
        ({"role": "user", "content": b"Say hi"}, "messages[1].content", "content is text, got bytes"),  # not "<bytes>"
        ({"role": "user"}, "messages[1].content", "a message needs content"),  # not the template's jinja error
    ):
        with pytest.raises(RequestError, match=message_text) as bad:
            llm.chat([{"role": "user", "content": "hi"}, message], max_tokens=2)
        assert bad.value.param == param


def test_llm_generate_stream_and_chat_equal_run_method(pair, llm):
    tok = pair["tokenizer"]
    prompts = [TEXT, TEXT * 3, "Short one."]
    results = llm.generate(prompts, max_tokens=15)  # three prompts through two slots
    for prompt, result in zip(prompts, results):
        ids = tok(prompt)["input_ids"]
        assert result.token_ids == reference(pair, ids, 15) and result.prompt_token_ids == ids
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)
        assert result.finish_reason == "length" and result.stats.new_tokens == 15
        assert result.stats.summary()["acceptance_length"] >= 1
    pieces = list(llm.stream(prompts[1], max_tokens=15))
    assert "".join(pieces) == results[1].text and len(pieces) > 1
    messages = [{"role": "user", "content": "Which bridge?"}]
    (reply,) = llm.chat(messages, max_tokens=9)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert reply.token_ids == reference(pair, list(ids), 9)
    assert llm.generate(tok(TEXT)["input_ids"], max_tokens=15)[0].token_ids == results[0].token_ids  # ids as the prompt
    (own,) = llm.generate(TEXT * 3, max_tokens=15, budget=16)  # a call's own budget
    assert own.token_ids == reference(pair, tok(TEXT * 3)["input_ids"], 15, budget=16)


def test_llm_dense_speculative_equals_transformers(pair):
    """With ``speculative`` the output is the target's own greedy decoding (transformers' generate)."""
    llm = make_llm(pair, method="speculative")
    ids = pair["tokenizer"](TEXT)["input_ids"]
    hf = pair["hf"].generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert llm.generate(ids, max_tokens=12)[0].token_ids == hf[0, len(ids):].tolist()


def test_stop_strings_and_end_of_sequence_cut_the_output(pair, llm, monkeypatch):
    tok = pair["tokenizer"]
    full = llm.generate(TEXT, max_tokens=30)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    cut = llm.generate(TEXT, max_tokens=30, stop=["@@never@@", stop])[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < 30
    assert "".join(llm.stream(TEXT, max_tokens=30, stop=stop)) == cut.text
    eos = full.token_ids[7]
    monkeypatch.setattr(llm.scheduler, "eos", frozenset({eos}))
    ended = llm.generate(TEXT, max_tokens=30)[0]
    assert ended.token_ids == full.token_ids[: full.token_ids.index(eos) + 1] and ended.finish_reason == "stop"
    assert ended.text == tok.decode(ended.token_ids, skip_special_tokens=True)


def test_a_stop_string_ends_the_ids_at_the_token_that_completes_it(pair, llm, server):
    """The ids end with the token that completes the stop string (none past it), through the API and the server
    (whole and streamed); the text ends before the stop string."""
    tok = pair["tokenizer"]
    full = llm.generate(TEXT, max_tokens=30)[0]
    prefixes = [tok.decode(full.token_ids[:k], skip_special_tokens=True) for k in range(31)]
    # A 3-character stop string whose first occurrence ends inside token j's text (j from the middle on).
    j, stop = next((j, prefixes[j + 1][len(prefixes[j]) - 2 : len(prefixes[j]) + 1]) for j in range(12, 30)
                   if len(prefixes[j]) >= 2 and len(prefixes[j + 1]) > len(prefixes[j])
                   and full.text.find(prefixes[j + 1][len(prefixes[j]) - 2 : len(prefixes[j]) + 1]) == len(prefixes[j]) - 2)
    expected_ids, expected_text = full.token_ids[: j + 1], full.text[: len(prefixes[j]) - 2]
    cut = llm.generate(TEXT, max_tokens=30, stop=stop)[0]
    assert (cut.token_ids, cut.text, cut.finish_reason) == (expected_ids, expected_text, "stop")
    url, _ = server
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": 30, "temperature": 0, "stop": stop, "return_token_ids": True}
    status, whole = post(url, "/v1/completions", body)
    assert status == 200 and whole["choices"][0]["token_ids"] == expected_ids and whole["choices"][0]["text"] == expected_text
    chunks = list(client(url).completions.create(model=MODEL, prompt=TEXT, max_tokens=30, temperature=0, stop=stop,
                                                 stream=True, extra_body={"return_token_ids": True}))
    assert [t for c in chunks for t in (getattr(c.choices[0], "token_ids", None) or [])] == expected_ids
    assert "".join(c.choices[0].text for c in chunks) == expected_text and chunks[-1].choices[0].finish_reason == "stop"


def test_a_stop_string_is_found_at_a_token_that_also_starts_a_character(tmp_path):
    """A byte-level BPE token can end a word and start a multi-byte character ("d" + the first byte of "—"):
    a stop string ending in that word stops at that token, not once the character's last byte arrives."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from sts.serve.text import TextStream
    from test_detokenize import bpe_tokenizer

    byte = bytes_to_unicode()
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tokenizer = bpe_tokenizer(tmp_path, list(byte.values()), [("d", byte[0xE2])], pre_tokenizer=level, decoder=level)
    ids = tokenizer("and\u2014so", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[2] == "d" + byte[0xE2]  # the token under test
    text = TextStream(tokenizer, ["nd"])
    pieces, stopped_at = [], None
    for k, token in enumerate(ids):
        pieces.append(text.add(token))
        if text.stopped and stopped_at is None:
            stopped_at = k
    assert stopped_at == 2 and "".join(pieces) + text.finish() == "a"
    plain = TextStream(tokenizer, ["so"])  # a stop past the character: all of it before
    assert "".join(plain.add(t) for t in ids) + plain.finish() == "and\u2014" and plain.stopped


def test_max_tokens_defaults_as_openai_and_ignore_eos_decodes_past_eos(pair, server, monkeypatch):
    """A completion without max_tokens gets 16 tokens (OpenAI's default), a chat the rest of the context;
    ``ignore_eos`` decodes past end-of-sequence ids, which otherwise end the request (kept in the ids)."""
    url, llm = server
    body = {"model": MODEL, "prompt": TEXT, "temperature": 0, "return_token_ids": True}
    status, plain = post(url, "/v1/completions", {**body, "ignore_eos": True})
    full = plain["choices"][0]["token_ids"]
    assert status == 200 and len(full) == 16 and plain["choices"][0]["finish_reason"] == "length"
    assert full == reference(pair, pair["tokenizer"](TEXT)["input_ids"], 16)
    monkeypatch.setattr(llm.scheduler, "eos", frozenset({full[5]}))
    status, ended = post(url, "/v1/completions", body)
    assert ended["choices"][0]["token_ids"] == full[: full.index(full[5]) + 1]
    assert ended["choices"][0]["finish_reason"] == "stop"
    status, past = post(url, "/v1/completions", {**body, "ignore_eos": True})
    assert past["choices"][0]["token_ids"] == full
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": True}
    status, reply = post(url, "/v1/chat/completions", chat)
    usage = reply["usage"]
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == MAX_LEN - usage["prompt_tokens"] - (SETTINGS["gamma"] + 1)  # rows for a round


def test_a_seed_repeats_a_sampled_request(llm):
    first, again, other = (llm.generate(TEXT, max_tokens=12, temperature=0.9, seed=s)[0].token_ids for s in (5, 5, 6))
    assert first == again and first != other


def test_a_stream_left_early_frees_its_slot(llm):
    pieces = llm.stream(TEXT, max_tokens=60)
    next(pieces)
    pieces.close()
    assert llm.generate("Hi", max_tokens=2)[0].finish_reason == "length"
    assert llm.scheduler.idle and len(llm.engine.free_slots()) == llm.engine.slots


def test_llm_refuses_what_it_cannot_serve(pair, llm, tmp_path):
    from sts.errors import STSError
    from sts.serve.scheduler import RequestError

    with pytest.raises(RequestError, match="past the context"):
        llm.generate("Hi", max_tokens=MAX_LEN)
    with pytest.raises(RequestError, match="non-empty list of conversations"):
        llm.chat([])  # as generate([]): nothing to answer is a mistake, not an empty answer
    with pytest.raises(RequestError, match="top_p"):
        llm.generate("Hi", top_p=0)
    with pytest.raises(STSError, match="exceed the budget"):
        make_llm(pair, budget=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'reranking'"):  # no policy's option: a typo
        make_llm(pair, reranking=3)
    with pytest.raises(STSError, match="unknown option 'page_size' for sts"):  # another policy's
        make_llm(pair, page_size=16)
    with pytest.raises(STSError, match="needs a draft"):
        from sts import LLM

        LLM(pair["target"], method="sts")
    deeper = tmp_path / "deeper"  # a 3-layer model as the draft of the 2-layer target: the pair swapped
    hf_model(hf_config("llama", vocab=len(pair["tokenizer"]), layers=3, max_position_embeddings=MAX_LEN), seed=3).save_pretrained(deeper)
    pair["tokenizer"].save_pretrained(deeper)
    with pytest.raises(STSError, match=r"the draft \(3 layers, hidden size 64\) is larger than the target \(2 layers"):
        LLM(pair["target"], str(deeper), method="speculative")


def test_import_sts_stays_cheap():
    code = "import sys, sts; print(any(m in sys.modules for m in ('torch', 'transformers', 'fastapi')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("field, value", [("budget", 64), ("budget", 512), ("window", 4)])
def test_a_selection_setting_on_a_dense_server_says_it_reads_every_row(field, value):
    """A budget (or sink/window) asked of an autoregressive server is refused as such, whatever its value (64 is below
    the server's sink + window, which used to be the reason given)."""
    from sts.serve.protocol import APIError, CompletionRequest, check_body

    settings = dict(method="autoregressive", gamma=0, budget=None, sink=4, window=64, dense_layers=0, draft_budget=None,
                    draft_selection=None)
    with pytest.raises(APIError) as refused:
        check_body(CompletionRequest(model="m", prompt="hi", **{field: value}), settings)
    err = refused.value
    assert (err.status, err.param, err.code) == (400, field, "unsupported_parameter")
    assert err.message == f"{field} applies to selection methods; this server decodes with autoregressive, which reads every row"


def test_the_readme_examples_run(pair, server, capsys):
    import shlex

    from sts.cli import build_parser
    from sts.serve.options import llm_settings

    readme = (ROOT / "README.md").read_text()
    serving_section = readme.split("## Serving\n")[1].split("\n## ")[0]
    python_section = readme.split("## Python\n")[1].split("\n## ")[0]
    (line,) = [x for x in serving_section.splitlines() if x.startswith("sts serve ")]
    settings = llm_settings(build_parser().parse_args(shlex.split(line)[1:]))
    assert (settings["method"], settings["budget"], settings["gamma"], settings["slots"]) == ("sts", 0.1, 4, 8)
    url, _ = server
    client_code = serving_section.split("```python\n")[1].split("```")[0]
    exec(client_code.replace("http://127.0.0.1:8000", url).replace('model="T"', f'model="{MODEL}"'), {})
    api_code = python_section.split("```python\n")[1].split("```")[0]
    exec(api_code.replace("path/to/target", pair["target"]).replace("path/to/draft", pair["draft"]), {})
    out = capsys.readouterr().out.splitlines()
    assert len([x for x in out if x.strip()]) >= 2, out


def test_a_port_in_use_or_a_bad_option_is_one_line_before_loading(capsys, tmp_path, monkeypatch):
    """The port and the server's options are checked before the models load (minutes on real weights): one line,
    exit 2, and loading never starts. The port is bound before loading and held through it (no other process takes
    it meanwhile, not even with SO_REUSEADDR as servers bind), and freed when loading fails."""
    from sts import api
    from sts.cli import main
    from sts.errors import STSError

    loads: list[int] = []

    def load(*args: Any, **kwargs: Any) -> None:
        loads.append(port)
        with socket.socket() as rival, pytest.raises(OSError) as refused:
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rival.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
        raise STSError("no models here")

    monkeypatch.setattr(api, "LLM", load)
    target = str(tmp_path / "never-loaded")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--target", target, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sts: error: cannot listen on 127.0.0.1:{port}: Address already in use", err
    for bad in ("-1", "0", "70000"):
        assert main(["serve", "--target", target, "--port", bad]) == 2
        assert capsys.readouterr().err.strip() == f"sts: error: --port must be in [1, 65535], got {bad}"
    assert main(["serve", "--target", target, "--port", str(free_port()), "--max-request-bytes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "sts: error: --max-request-bytes must be >= 1, got 0"
    for budget in ("64", "1000"):  # 64: below sink + window, yet the error is that dense decoding takes no budget
        assert main(["serve", "--target", target, "--port", str(free_port()), "--budget", budget]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "sts: error: --budget applies to selection methods (e.g. --method sts), not autoregressive", err
    for flag, value in (("--api-key", ""), ("--api-key", "  "), ("--served-model-name", "")):
        assert main(["serve", "--target", target, "--port", str(free_port()), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sts: error: {flag} is empty") and "\n" not in err, err
    monkeypatch.setenv("STS_API_KEY", "")  # read when the parser is built: the default of --api-key
    assert main(["serve", "--target", target, "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip().startswith("sts: error: --api-key is empty (or STS_API_KEY")
    monkeypatch.delenv("STS_API_KEY")
    assert loads == []
    port = free_port()
    assert main(["serve", "--target", target, "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == "sts: error: no models here" and loads == [port]
    with socket.socket() as after:
        after.bind(("127.0.0.1", port))  # freed


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def sse_events(conn: http.client.HTTPConnection, body: dict[str, Any], seen: threading.Event) -> list[Any]:
    """Return the payloads of a streamed completion's events ("[DONE]" as is); set ``seen`` at the first token."""
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events: list[Any] = []
    for line in response:
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            events.append(data if data == "[DONE]" else json.loads(data))
            seen.set()
    return events


@pytest.mark.parametrize("signals, timeout", [(1, "1"), (2, "600")])
def test_sigterm_ends_open_streams_with_abort_and_done(pair, tmp_path, signals, timeout):
    """SIGTERM while 6 streams of 480 tokens share one slot (seconds of decoding here): the streams decode on for
    --shutdown-timeout (a second SIGTERM: not at all), then each still open ends with finish_reason "abort" and
    [DONE]; the server exits 0 with no traceback. (And its --max-request-bytes: a larger body is a 413.)"""
    port = free_port()
    argv = [sys.executable, "-m", "sts.cli", "serve", "--target", pair["target"], "--method", "autoregressive",
            "--slots", "1", "--max-model-len", str(MAX_LEN), "--port", str(port), "--served-model-name", MODEL,
            "--log-level", "warning", "--shutdown-timeout", timeout, "--max-request-bytes", "4096"]
    log = tmp_path / "server.log"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    streams: list[list[Any]] = [[] for _ in range(6)]
    try:
        wait_until_serving(proc, port, log, 180)
        assert_error(*post(f"http://127.0.0.1:{port}", "/v1/completions", b" " * 4097), 413, code="request_too_large")
        seen = threading.Event()
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
        readers = [threading.Thread(target=lambda events=events: events.extend(
            sse_events(http.client.HTTPConnection("127.0.0.1", port, timeout=120), body, seen))) for events in streams]
        for reader in readers:
            reader.start()
        assert seen.wait(120), log.read_text()
        proc.send_signal(signal.SIGTERM)
        if signals == 2:  # once the first has closed the listening socket (two at once may arrive as one)
            while listening(port):
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(120)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    reasons = []
    for events in streams:
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1], events[-3:]
        ends = [e["choices"][0]["finish_reason"] for e in events[:-1]]
        assert ends[-1] in ("length", "abort") and set(ends[:-1]) <= {None}, ends[-3:]
        reasons.append(ends[-1])
    assert "abort" in reasons, reasons
    stderr = log.read_text()
    assert "Traceback" not in stderr and "aborted" in stderr, stderr
    # What it serves, as chosen, in its first line.
    assert f"[sts] serving '{MODEL}' on 127.0.0.1:{port} (autoregressive): 1 slot of {MAX_LEN} tokens each" in stderr


def test_a_stream_aborted_during_a_long_scheduler_step_still_ends_with_done(monkeypatch):
    """A decoding request is freed only after the scheduler's iteration in progress (a round takes seconds on a CPU):
    the shutdown's grace period adds the longest iteration, so a stream aborted during a 1 s step still sends its last
    event and [DONE] when the grace alone is 0.1 s (without it uvicorn cut such a stream off mid-response)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from sts.serve import shutdown

    monkeypatch.setattr(shutdown, "ABORT_GRACE_S", 0.1)
    step_s, state = 1.0, {}

    async def stream(request):
        state["ended"] = asyncio.Event()

        async def events():
            yield b"data: first\n\n"
            await state["ended"].wait()
            yield b"data: abort\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    def abort() -> int:  # the scheduler's cancel_all: the open stream ends once the step in progress is over
        if "ended" not in state or state.get("aborted"):
            return 0
        state["aborted"] = True
        asyncio.get_running_loop().call_later(step_s, state["ended"].set)
        return 1

    port = free_port()
    app = Starlette(routes=[Route("/stream", stream)])
    server = shutdown.BoundedServer(app, abort, 0.0, lambda: step_s, host="127.0.0.1", port=port, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stream")
    response = conn.getresponse()
    assert response.readline() == b"data: first\n"
    server.should_exit = True
    body = b""
    try:
        while chunk := response.read1(1024):
            body += chunk
    except http.client.IncompleteRead as cut:
        body += cut.partial
    thread.join(30)
    assert body.endswith(b"data: abort\n\ndata: [DONE]\n\n"), body
    assert not thread.is_alive()


def test_python_api_wrong_types_are_one_line_errors(pair):
    from sts.errors import STSError

    llm = make_llm(pair, slots=1)
    try:
        for kwargs, words in (({"stop": 5}, "stop must be a string or a list of strings"),
                              ({"budget": "x"}, "budget must be a number"), ({"max_tokens": 2.5}, "max_tokens must be an integer"),
                              ({"temperature": "hot"}, "temperature must be a number"), ({"seed": True}, "seed must be an integer")):
            with pytest.raises(STSError, match=words):
                llm.generate("hello", **kwargs)
        assert llm.generate("hello", max_tokens=3)[0].text is not None  # it still serves
    finally:
        llm.close()


def test_the_queue_bound_counts_only_requests_no_free_slot_will_take(pair):
    """Slots 2, --max-queue 1: on an idle server three requests at once are taken (two get slots at the next
    iteration, one waits); a fourth is refused; once the first two hold their slots, one more may wait."""
    from sts.serve.scheduler import QueueFull, RequestParams

    llm = make_llm(pair, slots=2, max_queue=1)  # its scheduler thread is not started: nothing is admitted by itself
    ids = pair["tokenizer"]("hello there").input_ids
    params = RequestParams(max_tokens=2)
    taken = [llm.submit(ids, params, lambda delta: None) for _ in range(3)]
    with pytest.raises(QueueFull, match=r"requests waiting for a slot: 1\)"):
        llm.submit(ids, params, lambda delta: None)
    llm.scheduler._admit()  # the two oldest take the free slots; the third still waits
    assert [r.slot is not None for r in taken] == [True, True, False]
    with pytest.raises(QueueFull):
        llm.submit(ids, params, lambda delta: None)
    while not llm.scheduler.idle:
        llm.scheduler.run_once()
    assert all(r.finish_reason is not None for r in taken)
