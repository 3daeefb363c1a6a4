"""The round bound of ``sts bench e2e`` (each record's ``round_bytes``, the numerator of its ``bound_share``):
against the bytes of a tiny synthetic pair's own tensors, and against the records the H200 runs wrote."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import read_weights
from sts.bench.e2e import METHODS, dense_round, main, parse_methods, round_bytes
from sts.bench.synthetic import shape_config, synthetic_pair
from sts.errors import STSError
from sts.parallel import Shard
from sts.selection import SelectionConfig, make_policy
from sts.selection.mapping import HeadMapping

RECORDS = sorted((Path(__file__).parents[1] / "docs" / "bench").glob("e2e*.jsonl"))


def cache_bytes(model, rows: int, layers: tuple[int, ...] | None = None, k_only: bool = False) -> int:
    """Return the bytes of the first ``rows`` rows of every sequence in the caches of ``layers`` (default: all)."""
    chosen = [model.layers[i] for i in (range(len(model.layers)) if layers is None else layers)]
    tensors = [t for blk in chosen for t in (blk.self_attn.cache.k, blk.self_attn.cache.v)[: 1 if k_only else 2]]
    return sum(t[:, :, :rows].numel() * t.element_size() for t in tensors)


def test_round_bytes_of_a_tiny_pair_is_what_each_forward_of_a_round_reads(tmp_path):
    """One CPU run of every method (sparse verification every round): the record's bytes are the draft's weights
    per step, its rows (all, or with "-all" the sparse draft's budget, then the sparse draft's budget), the STS scores' draft K rows, the target's weights and
    its rows (all, or the budget), each counted from the models' tensors; a method with policy options the same
    as without."""
    batch, context, gamma, budget, draft_budget = 2, 150, 3, 96, 100  # a scored draft's budget exceeds sink + window (68)
    out = tmp_path / "e2e.jsonl"
    methods = METHODS + tuple(parse_methods("sts+sd-scored-all/rerank=8"))
    main(["--device", "cpu", "--methods", ",".join(m.name for m in methods), "--target-shape", "tiny-target",
          "--draft-shape", "tiny-draft", "--contexts", str(context),
          "--batches", str(batch), "--gamma", str(gamma), "--budget", str(budget), "--draft-budget", str(draft_budget),
          "--new-tokens", "4", "--verify", "sparse", "--out", str(out)])
    records = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {m.name for m in methods}
    target, draft = synthetic_pair("tiny-target", "tiny-draft", 0.77, dtype=torch.float32, device="cpu")
    for model in (target, draft):
        model.setup_cache(batch, context)
    mapped = make_policy("sts", SelectionConfig(budget=budget), target, draft).draft_layers(draft)
    for method in methods:
        want = read_weights(target) + cache_bytes(target, min(budget, context) if method.policy else context)
        if method.speculative:
            later = min(draft_budget, context) if method.sparse_draft else context
            first = later if method.draft_selection.endswith("-all") else context
            want += gamma * read_weights(draft) + cache_bytes(draft, first) + (gamma - 1) * cache_bytes(draft, later)
        if method.policy:
            want += cache_bytes(draft, context, mapped, k_only=True)
        assert records[method.name]["round_bytes"] == want, method.name
        assert records[method.name]["bound_share"] is None  # no H200 rate on the CPU


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_round_bytes_reproduces_the_stored_h200_records(path):
    """Every record of docs/bench/e2e*.jsonl (Llama-3.1-8B / 70B targets, Llama-3.2-1B draft, bf16, one rank's
    bytes under tensor parallelism): a selection method's bytes mix its dense and sparse rounds by its share of
    dense rounds (floored to a whole byte); a dense round is dense speculative decoding."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert records
    for r in records:
        target = shape_config(r.get("target_shape", "llama3-8b"))
        draft = shape_config(r.get("draft_shape", "llama3.2-1b"))
        mapped = len(HeadMapping.default(target, draft).draft_layers())  # STS's default mapping, as benchmarked
        if r.get("tensor_parallel", 1) > 1:
            target = Shard(0, r["tensor_parallel"]).local_config(target)
        method = parse_methods(r["method"])[0]
        shape = (target, draft, r["batch"], r["context"], r["gamma"], r["budget"], r["draft_budget"], mapped, 2)
        want = round_bytes(method, *shape)
        share = r.get("dense_round_share") or 0.0
        if share:  # records before 2026-11-30T03:50 kept the sparse draft in dense rounds
            dense = replace(method, policy=None) if r["date"] < "2026-11-30T03:50" else dense_round(method)
            want = share * round_bytes(dense, *shape) + (1 - share) * want
        assert abs(r["round_bytes"] - want) <= 1, (path.name, r["method"], r["batch"], r["context"])



def test_kernel_times_counts_every_linear_launch_and_returns_the_run(tmp_path):
    """On the CPU operators stand in for kernels: the profile's ``aten::linear`` launches equal those the models'
    linear layers made, counted by forward hooks (sts's CPU ``Linear`` runs 2-8 rows as one product per row)."""
    from sts.bench.profile import kernel_times
    from sts.engine import Engine, EngineConfig

    target, draft = synthetic_pair("tiny-target", "tiny-draft", 0.77, dtype=torch.float32, device="cpu",
                                   max_position_embeddings=400)
    launches = [0]

    def count(module, inputs, output):
        rows = inputs[0].numel() // inputs[0].shape[-1]
        launches[0] += rows if 2 <= rows <= 8 else 1

    prompt = list(range(3, 150))
    with torch.no_grad():
        Engine(target, draft, slots=1, max_len=300).prefill(0, prompt)
        engine = Engine(target, draft, slots=1, max_len=300, config=EngineConfig(gamma=3))
        reference = engine.generate([prompt], 6, cached=True)
        for model in (target, draft):
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(count)
        result, kernels = kernel_times(lambda: engine.generate([prompt], 6, cached=True), torch.device("cpu"))
    assert result.tokens == reference.tokens
    assert {k["name"]: k["calls"] for k in kernels}["aten::linear"] == launches[0] > 0
    assert [k["us"] for k in kernels] == sorted((k["us"] for k in kernels), reverse=True)
    assert 0 < sum(k["share"] for k in kernels) <= 1.0001


def test_e2e_profile_records_each_methods_kernels_per_round(tmp_path):
    out = tmp_path / "e2e.jsonl"
    main(["--device", "cpu", "--target-shape", "tiny-target", "--draft-shape", "tiny-draft", "--contexts", "150",
          "--batches", "1", "--gamma", "3", "--budget", "96", "--new-tokens", "6", "--verify", "sparse",
          "--methods", "autoregressive,sts", "--profile", "--out", str(out)])
    records = list(map(json.loads, out.read_text().splitlines()))
    assert [r["method"] for r in records] == ["autoregressive", "sts"]
    for record in records:
        top = record["kernels"][0]
        assert top["us"] >= top["us_per_round"] > 0 and top["calls"] >= 1


def test_e2e_runs_each_gamma_and_gives_the_sparse_draft_its_own_agreement(tmp_path):
    """``--gamma 2,3``: every speculative method at both draft lengths (autoregressive once); with
    ``--sparse-draft-agreement 0`` the sparse-draft methods use a second draft that never predicts the target (one
    token per round) while the dense draft (agreement 1) has every token accepted (gamma + 1 per round); not in the
    rounds a selection method verifies, and so drafts, densely."""
    out = tmp_path / "e2e.jsonl"
    main(["--device", "cpu", "--target-shape", "tiny-target", "--draft-shape", "tiny-draft", "--contexts", "150",
          "--batches", "2", "--gamma", "2,3", "--budget", "96", "--new-tokens", "12", "--verify", "sparse",
          "--agreement", "1", "--sparse-draft-agreement", "0", "--methods", "autoregressive,speculative,sts,sts+sd",
          "--out", str(out)])
    records = list(map(json.loads, out.read_text().splitlines()))
    assert [(r["method"], r["gamma"], r["agreement"]) for r in records] == [
        ("autoregressive", None, None), ("speculative", 2, 1.0), ("speculative", 3, 1.0), ("sts", 2, 1.0), ("sts", 3, 1.0),
        ("sts+sd", 2, 0.0), ("sts+sd", 3, 0.0)]
    for r in records[1:5]:
        assert r["acceptance_length"] == r["gamma"] + 1
    assert [r["acceptance_length"] for r in records[5:]] == [1.0, 1.0]
    fastest = max(r["tokens_per_s"] for r in records if r["method"] == "speculative")
    assert all(r["speedup_vs_spec"] == pytest.approx(r["tokens_per_s"] / fastest) for r in records)
    ar = records[0]
    assert all(r["tokens"] == ar["tokens"] for r in records)  # greedy: every method decodes the target's tokens
    # With --verify auto these tiny contexts verify densely, and so draft densely: the dense draft's agreement.
    auto = tmp_path / "auto.jsonl"
    main(["--device", "cpu", "--target-shape", "tiny-target", "--draft-shape", "tiny-draft", "--contexts", "150",
          "--batches", "1", "--gamma", "3", "--budget", "96", "--new-tokens", "12", "--agreement", "1",
          "--sparse-draft-agreement", "0", "--methods", "sts+sd", "--out", str(auto)])
    (record,) = map(json.loads, auto.read_text().splitlines())
    assert (record["agreement"], record["acceptance_length"], record["dense_round_share"]) == (1.0, 4.0, 1.0)
    with pytest.raises(STSError, match="comma list of whole numbers"):
        main(["--device", "cpu", "--gamma", "4,x", "--out", str(tmp_path / "x.jsonl")])


def test_methods_take_policy_options_and_refuse_what_does_not_apply():
    (method,) = parse_methods("sts+sd-scored-all/rerank=8")
    assert method.name == "sts+sd-scored-all/rerank=8" and method.draft_selection == "scored-all"
    assert dict(method.options) == {"rerank": 8.0}
    assert dict(parse_methods("sts-plain/rerank_prob=0")[0].options) == {"rerank": 0, "rerank_prob": 0.0}
    for spec, message in (("sts/bogus=1", "unknown option 'bogus'"), ("speculative/rerank=0", "selection methods only"),
                          ("nope", "unknown method 'nope'"), ("sts/rerank", "/key=number"),
                          ("sts/rerank=1/rerank=2", "sets an option twice")):
        with pytest.raises(STSError, match=message):
            parse_methods(spec)


def test_plot_places_every_context_and_method_with_options(tmp_path, monkeypatch):
    """Contexts below 1K and between powers of two keep their place on the K-token axis; a method named with policy
    options gets its own line."""
    from matplotlib.axes import Axes

    from sts.bench.e2e import plot

    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, *a, **k: drawn.append((k.get("label"), list(x))) or original(self, x, *a, **k))
    base = {"batch": 1, "gamma": 4, "device": "cpu"}
    records = [{**base, "method": m, "context": c, "speedup_vs_ar": 1.5}
               for m in ("sts", "sts/rerank=8") for c in (512, 1536)]
    path = plot(records, tmp_path / "e2e.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn) == [("sts, batch 1", [0.5, 1.5]), ("sts/rerank=8, batch 1", [0.5, 1.5])]
