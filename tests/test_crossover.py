"""The automatic cross-over: a selection policy verifies densely where, by the bandwidth model, sparse
verification does not pay, and the model's accounting against the models' own tensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import FAMILIES, hf_config, hf_model, ours, perturbed, read_weights
from sts.attention.rerank import ONE_PROGRAM_CANDIDATES
from sts.bench.synthetic import shape_config
from sts.costmodel import (
    DraftSteps, Hardware, RoundCost, break_even, kv_bytes, round_cost, selection_reads, weight_bytes,
)
from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.parallel import shard_model
from sts.selection import SelectionConfig, make_policy
from sts.speculative import speculative_generate

#: Only bytes count: sparse verification pays exactly when it reads fewer bytes than dense verification.
BYTES_ONLY = Hardware(bandwidth=1.0, round_s=0.0, rerank_layer_s=0.0, score_s=0.0, forward_s=0.0, radix_layer_s=0.0,
                      radix_candidate_s=0.0)
SELECTION = SelectionConfig(budget=32, sink=4, window=8)
#: (method, policy options) whose reads the model accounts for differently.
POLICIES = [("sts", {}), ("sts", {"rerank": 0}), ("specpc", {}), ("streaming", {}), ("quest", {}), ("tidal", {})]


def decode(target, draft, policy, prompts, n, verify="auto", hardware=Hardware(), gamma=3):
    """Return the engine's generation of ``prompts`` with ``policy`` under the given cross-over settings."""
    config = EngineConfig(gamma=gamma, verify=verify, hardware=hardware)
    engine = Engine(target, draft, policy, slots=len(prompts), max_len=max(map(len, prompts)) + n + gamma + 2, config=config)
    return engine.generate(prompts, n)


def sts(target, draft, budget=32):
    return make_policy("sts", SelectionConfig(budget=budget, sink=4, window=8), target, draft)


#: A dense draft, a sparse one reading 16 rows in its later steps, and in every step at 80% of the dense acceptance.
STEPS = [DraftSteps(), DraftSteps(3), DraftSteps(3, 16), DraftSteps(3, 16, first=True, acceptance=0.8)]


@pytest.mark.parametrize("method,options", POLICIES, ids=lambda x: str(x) if x else "")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("steps", STEPS, ids=str)
def test_break_even_is_the_first_context_where_sparse_pays(tiny_pair, method, options, batch, steps):
    _, target, draft = tiny_pair
    policy = make_policy(method, SELECTION, target, draft, **options)
    reads = selection_reads(policy, target, draft)
    for hardware in (BYTES_ONLY, Hardware(bandwidth=1e6, round_s=2e-3, rerank_layer_s=1e-4, score_s=1e-9, forward_s=1e-4)):
        def pays(n):
            return round_cost(target.config, draft.config, reads, [n] * batch, 32, 4, hardware, steps).sparse_pays
        brute = next((n for n in range(1, 20_000) if pays(n)), None)
        got = break_even(target.config, draft.config, reads, SELECTION, batch, 4, hardware, limit=20_000, steps=steps)
        assert got == brute, (method, options, hardware)
        if brute is not None:  # past the break-even it keeps paying
            assert all(pays(n) for n in range(brute, brute + 2000, 7))
    # With the H200's overheads these tiny models' rows are never worth selecting.
    assert break_even(target.config, draft.config, reads, SELECTION, batch, 4, limit=20_000, steps=steps) is None


def test_fractional_budget_break_even_pays_and_the_context_before_does_not(tiny_pair):
    _, target, draft = tiny_pair
    selection = SelectionConfig(budget=0.1, sink=4, window=8)
    reads = selection_reads(make_policy("sts", selection, target, draft), target, draft)
    n = break_even(target.config, draft.config, reads, selection, 2, 4, BYTES_ONLY)
    assert n is not None
    cost = [round_cost(target.config, draft.config, reads, [c, c], selection.tokens(c), 4, BYTES_ONLY) for c in (n - 1, n)]
    assert not cost[0].sparse_pays and cost[1].sparse_pays


@pytest.mark.parametrize("family", [*FAMILIES, "llama+bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 2])
def test_weight_bytes_is_every_weight_a_forward_reads(family, dtype, world):
    """Against the parameters of Llama (untied), Qwen2 (tied, q/k/v biases), Mistral and Llama with every bias, whole
    and as rank 1 of 2 (its part of the split matrices, norms, head and row-parallel biases whole)."""
    extra = {"attention_bias": True, "mlp_bias": True} if family == "llama+bias" else {}
    model = ours(hf_model(hf_config(family.removesuffix("+bias"), **extra)), dtype)
    if world > 1:
        model = shard_model(model, 1, world)
    assert model.config.shard == (world - 1, world)
    assert weight_bytes(model.config, model.embed_tokens.weight.element_size()) == read_weights(model)


@pytest.mark.parametrize("shape,params,table", [("llama3-8b", 8_030_261_248, True), ("llama3.2-1b", 1_235_814_400, False),
                                                ("llama3-70b", 70_553_706_496, True)])
def test_weight_bytes_of_the_llama_shapes_are_the_checkpoints_parameter_counts(shape, params, table):
    """The published checkpoints' totals (safetensors metadata), less the embedding table where it is not the head
    (Llama-3.2-1B ties them: its one table is the head a step reads)."""
    config = shape_config(shape)
    assert weight_bytes(config, 2) == 2 * (params - (config.vocab_size * config.hidden_size if table else 0))


def test_kv_bytes_is_the_cache_rows_it_names(tiny_pair):
    _, target, _ = tiny_pair
    target.setup_cache(2, 64)
    caches = [blk.self_attn.cache for blk in target.layers]
    for rows, layers in ((0, None), (17, None), (40, 1), (64, 0)):
        chosen = caches if layers is None else caches[:layers]
        k = sum(c.k[:, :, :rows].numel() * c.k.element_size() for c in chosen)
        v = sum(c.v[:, :, :rows].numel() * c.v.element_size() for c in chosen)
        assert kv_bytes(target.config, 2 * rows, 4, layers) == k + v  # rows of both sequences
        assert kv_bytes(target.config, 2 * rows, 4, layers, k_only=True) == k
    for bad in ({"rows": -1}, {"rows": 1, "layers": 4}, {"rows": 1, "layers": -1}):
        with pytest.raises(STSError):
            kv_bytes(target.config, dtype_bytes=4, **bad)


def test_a_budget_per_slot_must_match_the_contexts(tiny_pair):
    _, target, draft = tiny_pair
    reads = selection_reads(sts(target, draft), target, draft)
    with pytest.raises(STSError, match="2 budgets for 3 contexts"):
        round_cost(target.config, draft.config, reads, [100, 200, 300], [32, 32], 4)


def test_round_cost_counts_the_models_own_tensors(tiny_pair):
    """Dense: the target's weights and every context row of its caches; sparse: budget rows plus the draft K
    rows the STS scores read, the score rows, and the candidates' target K rows."""
    _, target, draft = tiny_pair
    weights = read_weights(target)
    target.setup_cache(1, 600)
    draft.setup_cache(1, 600)
    n, budget = 500, 32
    kv = sum(c.k[:, :, :n].nbytes + c.v[:, :, :n].nbytes for c in (blk.self_attn.cache for blk in target.layers))
    policy = sts(target, draft)
    reads = selection_reads(policy, target, draft)
    mapped = policy.draft_layers(draft)
    draft_keys = sum(draft.layers[layer].self_attn.cache.k[:, :, :n].nbytes for layer in mapped)
    candidates = sum(blk.self_attn.cache.k[:, :, : 4 * (budget - 12)].nbytes for blk in target.layers)
    selected = sum(c.k[:, :, :budget].nbytes + c.v[:, :, :budget].nbytes for c in (blk.self_attn.cache for blk in target.layers))
    scores = 4 * n * len({head for layer in policy.mapping.sources for head in layer})
    cost = round_cost(target.config, draft.config, reads, [n], budget, 4, BYTES_ONLY)
    assert cost == RoundCost(weights + kv, weights + selected + draft_keys + candidates + scores)
    # With 3 draft steps: their weights each, and K and V of every draft layer over the context (dense), or over 16
    # rows in the later two steps (sparse draft), or in all three ("-all").
    step = read_weights(draft)
    rows = {r: sum(c.k[:, :, :r].nbytes + c.v[:, :, :r].nbytes for c in (blk.self_attn.cache for blk in draft.layers))
            for r in (16, n)}
    sparse = weights + selected + draft_keys + candidates + scores + 3 * step
    dense = weights + kv + 3 * step + 3 * rows[n]
    for steps, drafted in ((DraftSteps(3), 3 * rows[n]), (DraftSteps(3, 16), rows[n] + 2 * rows[16]),
                           (DraftSteps(3, 16, first=True, acceptance=0.9), 3 * rows[16])):
        cost = round_cost(target.config, draft.config, reads, [n], budget, 4, BYTES_ONLY, steps)
        assert cost == RoundCost(dense, sparse + drafted, steps.acceptance)


def test_the_radix_re_rank_is_charged_past_the_candidates_one_program_ranks(tiny_pair):
    """Past ONE_PROGRAM_CANDIDATES re-rank candidates per (slot, KV head) the kernel selects by radix select: a sparse
    round then costs its seconds per sparse layer and per candidate of each slot, KV head and sparse layer; up to
    that count, nothing more."""
    _, target, draft = tiny_pair
    radix = dataclasses.replace(BYTES_ONLY, radix_layer_s=3.0, radix_candidate_s=0.5)
    contexts = [10**6, 30000]
    layers, heads = target.config.n_layers - 1, target.config.n_kv_heads
    for free, extra in ((ONE_PROGRAM_CANDIDATES // 4, 0.0), (ONE_PROGRAM_CANDIDATES // 4 + 1, None)):
        budget = 12 + free  # sink 4 + window 8, four candidates per free row
        policy = make_policy("sts", SelectionConfig(budget=budget, sink=4, window=8, dense_layers=1), target, draft)
        reads = selection_reads(policy, target, draft)
        cost = round_cost(target.config, draft.config, reads, contexts, budget, 2, radix)
        plain = round_cost(target.config, draft.config, reads, contexts, budget, 2, BYTES_ONLY)
        if extra is None:
            extra = 3.0 * layers + 0.5 * layers * heads * sum(min(4 * free, n) for n in contexts)
        assert cost.sparse_s - plain.sparse_s == pytest.approx(extra) and cost.dense_s == plain.dense_s


def test_a_sparse_draft_pays_sooner_and_its_lost_acceptance_later(tiny_pair):
    """A sparse round whose draft reads 16 rows saves the draft's context reads too (sparse verification pays at a
    shorter context); one accepting fewer tokens per round pays later; the fixed seconds per forward weigh in only
    through the acceptance. Per token: a sparse round pays when its seconds over the dense round's are below its
    relative acceptance."""
    _, target, draft = tiny_pair
    reads = selection_reads(sts(target, draft), target, draft)

    def crossing(steps, hardware=BYTES_ONLY):
        return break_even(target.config, draft.config, reads, SELECTION, 1, 4, hardware, steps=steps)

    dense_draft = crossing(DraftSteps(3))
    assert dense_draft == crossing(DraftSteps())  # a dense draft reads the same in both rounds
    assert crossing(DraftSteps(3, 16, first=True)) < crossing(DraftSteps(3, 16)) < dense_draft
    assert crossing(DraftSteps(3, 16, first=True, acceptance=0.8)) > crossing(DraftSteps(3, 16, first=True))
    slow = Hardware(bandwidth=1.0, round_s=0.0, rerank_layer_s=0.0, score_s=0.0, forward_s=1e5)
    assert crossing(DraftSteps(3), slow) == dense_draft
    assert crossing(DraftSteps(3, 16, first=True, acceptance=0.8), slow) > crossing(DraftSteps(3, 16, first=True, acceptance=0.8))
    cost = round_cost(target.config, draft.config, reads, [500], 32, 4, BYTES_ONLY, DraftSteps(3, 16, acceptance=0.8))
    assert cost.sparse_pays == (cost.sparse_s / cost.dense_s < 0.8)
    for bad in ({"steps": -1}, {"steps": 3, "rows": 0}, {"steps": 3, "acceptance": 0.0}, {"steps": 3, "acceptance": 1.5}):
        with pytest.raises(STSError):
            DraftSteps(**bad)


def test_the_engine_models_its_own_draft(tiny_pair):
    """Between the break-even of a dense draft and the later one of a draft reading the 16 latest rows in every step
    (which accepts 0.77 of a dense round's tokens), an engine with the dense draft verifies every round sparsely and
    one with the sparse draft every round densely."""
    _, target, draft = tiny_pair
    reads = selection_reads(sts(target, draft), target, draft)
    sparse_draft = DraftSteps.of(3, 16, "recent-all")
    assert sparse_draft == DraftSteps(3, 16, True, 0.77)
    # The acceptance each rule kept on the demo pair: many scored rows the most, the latest rows the least.
    assert DraftSteps.of(4, 4096, "scored-all") == DraftSteps(4, 4096, True, 0.95)
    assert DraftSteps.of(4, 512, "scored") == DraftSteps(4, 512, False, 0.8)
    assert DraftSteps.of(4, None, "recent") == DraftSteps(4)
    dense = break_even(target.config, draft.config, reads, SELECTION, 1, 4, BYTES_ONLY, steps=DraftSteps.of(3, None, "recent"))
    sparse = break_even(target.config, draft.config, reads, SELECTION, 1, 4, BYTES_ONLY, steps=sparse_draft)
    assert dense + 8 < sparse
    prompt = [(5 * i) % 96 for i in range(dense + 4)]
    runs = {}
    for budget, selection in ((None, "recent"), (16, "recent-all")):
        config = EngineConfig(gamma=3, hardware=BYTES_ONLY, draft_budget=budget, draft_selection=selection)
        engine = Engine(target, draft, sts(target, draft), max_len=len(prompt) + 20, config=config)
        runs[budget] = engine.generate([prompt], 4).stats
    assert runs[None].dense_rounds == 0 and runs[16].dense_rounds == runs[16].target_forwards > 0


def test_below_break_even_sts_equals_dense_speculative_and_every_round_is_dense(tiny_pair):
    _, target, draft = tiny_pair
    prompts = [[(7 * i) % 96 for i in range(300)], [9, 8, 7] * 50]
    dense = speculative_generate(target, draft, prompts, 24, gamma=3)
    out = decode(target, draft, sts(target, draft), prompts, 24)  # the H200's overheads: these models never pay
    assert out.tokens == dense.tokens
    summary = out.stats.summary()
    assert summary["dense_rounds"] == summary["target_forwards"] > 0
    assert summary["sparsity"] == 0.0 and out.stats.select_s == 0.0
    sparse = decode(target, draft, sts(target, draft), prompts, 24, verify="sparse")
    assert sparse.stats.dense_rounds == 0 and sparse.stats.summary()["sparsity"] > 0.5
    assert sparse.tokens != dense.tokens  # the budget really cuts: this is not dense by another name


def test_above_break_even_rounds_are_sparse_and_equal_the_forced_sparse_path(tiny_pair):
    _, target, draft = tiny_pair
    prompts = [[(7 * i) % 96 for i in range(300)], [9, 8, 7] * 100]
    reads = selection_reads(sts(target, draft), target, draft)
    assert break_even(target.config, draft.config, reads, SELECTION, 2, 4, BYTES_ONLY) < 290
    auto = decode(target, draft, sts(target, draft), prompts, 24, hardware=BYTES_ONLY)
    forced = decode(target, draft, sts(target, draft), prompts, 24, verify="sparse")
    assert auto.tokens == forced.tokens
    assert auto.stats.dense_rounds == 0 and auto.stats.summary()["sparsity"] == forced.stats.summary()["sparsity"] > 0.5


def test_a_batch_crossing_the_break_even_switches_modes_and_equals_each_sequence_alone(tiny_pair):
    """Prompts of one length and a draft equal to the target: dense rounds accept every draft, so the slots' contexts
    move together and cross the break-even in the same round, alone as in the batch."""
    _, target, _ = tiny_pair
    draft = perturbed(target, 0.0, seed=0)  # the target's weights in a model (and cache) of its own
    prompts = [torch.randint(0, 96, (130,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    reads = selection_reads(sts(target, draft), target, draft)
    crossing = break_even(target.config, draft.config, reads, SELECTION, 1, 4, BYTES_ONLY)
    assert crossing == break_even(target.config, draft.config, reads, SELECTION, 3, 4, BYTES_ONLY)
    assert 130 < crossing < 130 + 60
    batch = decode(target, draft, sts(target, draft), prompts, 60, hardware=BYTES_ONLY)
    assert 0 < batch.stats.dense_rounds < batch.stats.target_forwards
    for prompt, tokens in zip(prompts, batch.tokens):
        alone = decode(target, draft, sts(target, draft), [prompt], 60, hardware=BYTES_ONLY)
        assert tokens == alone.tokens[0]
        assert 0 < alone.stats.dense_rounds < alone.stats.target_forwards
    head = crossing - len(prompts[0])  # tokens decoded before the crossing: dense decoding's
    dense = speculative_generate(target, draft, prompts, 60, gamma=3)
    assert [t[:head] for t in batch.tokens] == [t[:head] for t in dense.tokens]
    assert all(b != d for b, d in zip(batch.tokens, dense.tokens))  # after it, the budget cuts


def test_teacher_forced_rounds_and_recall_measurement_stay_sparse(tiny_pair):
    """Evaluation measures the policy itself: forced_step and measure_recall never fall back to dense verification."""
    _, target, draft = tiny_pair
    tokens = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = Engine(target, draft, sts(target, draft), max_len=220, config=EngineConfig(gamma=3))
    engine.prefill(0, tokens[:150])
    engine.forced_step([tokens[150:155]])
    assert engine.stats.dense_rounds == 0 and engine.stats.sparsity[-1] > 0.5
    prompts = [tokens[:150]]
    measured = speculative_generate(target, draft, prompts, 12, gamma=3, policy=sts(target, draft), measure_recall=True)
    forced = speculative_generate(target, draft, prompts, 12, gamma=3, policy=sts(target, draft), verify="sparse")
    assert measured.tokens == forced.tokens and measured.stats.dense_rounds == 0 and measured.stats.recall


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossover")
    hf_model(hf_config("llama", layers=2), seed=0).save_pretrained(root / "target")
    hf_model(hf_config("llama", layers=2), seed=1).save_pretrained(root / "draft")
    return root


def test_cli_verify_flag(capsys, checkpoints):
    from sts.cli import main

    prompt = ",".join(str((7 * i) % 96) for i in range(200))
    base = ["generate", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--prompt-ids",
            prompt, "--max-new-tokens", "16", "--window", "8", "--gamma", "3", "--json"]

    def record(*extra):
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    spec = record("--method", "speculative")
    auto = record("--method", "sts", "--budget", "32")
    assert auto["tokens"] == spec["tokens"] and auto["stats"]["dense_rounds"] == auto["stats"]["target_forwards"]
    sparse = record("--method", "sts", "--budget", "32", "--verify", "sparse")
    assert sparse["stats"]["dense_rounds"] == 0 and sparse["stats"]["sparsity"] > 0.5
    with pytest.raises(SystemExit):
        main([*base, "--method", "sts", "--budget", "32", "--verify", "dense"])
    assert "invalid choice" in capsys.readouterr().err
