"""Selection policies, sparse verification and calibration against brute-force references."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch

from conftest import hf_config, hf_model, ours
from sts.attention import reference
from sts.calibrate import calibrate
from sts.decoding import Decoder
from sts.errors import STSError
from sts.selection import REGISTRY, HeadMapping, RoundContext, SelectionConfig, make_policy
from sts.selection.attend import SelectiveAttention, ShadowAttention
from sts.selection.base import topk_rows
from sts.attention.backend import QueryRecorder
from sts.speculative import speculative_generate

G = torch.Generator().manual_seed(0)


def brute_select(scores, start, budget, sink, window):
    """Return, per (b, h), the set of rows a budgeted sink + window + top-k selection must contain."""
    out = {}
    b_, h_, _ = scores.shape
    for b in range(b_):
        n = int(start[b])
        for h in range(h_):
            if n <= budget:
                out[b, h] = set(range(n))
                continue
            forced = set(range(min(sink, n))) | set(range(max(0, n - window), n))
            rest = sorted((r for r in range(n) if r not in forced), key=lambda r: -float(scores[b, h, r]))
            out[b, h] = forced | set(rest[: budget - len(forced)])
    return out


def as_sets(idx, start):
    """Return the valid rows of an index tensor as sets per (b, h)."""
    return {(b, h): {int(r) for r in idx[b, h] if r < start[b]} for b in range(idx.shape[0]) for h in range(idx.shape[1])}


@pytest.mark.parametrize("budget,sink,window", [(16, 2, 4), (40, 0, 0), (8, 4, 4), (100, 4, 8)])
def test_topk_rows_matches_brute_force(budget, sink, window):
    scores = torch.randn(3, 2, 60, generator=G)
    start = torch.tensor([60, 37, 12])
    idx = topk_rows(scores, start, budget, sink, window)
    assert idx.shape == (3, 2, budget)
    assert as_sets(idx, start) == brute_select(scores, start, budget, sink, window)
    for b in range(3):  # valid entries are distinct
        for h in range(2):
            valid = [int(r) for r in idx[b, h] if r < start[b]]
            assert len(valid) == len(set(valid))


def _verify_inputs(b=2, hq=4, hkv=2, t=3, d=16, s=50):
    q = torch.randn(b, hq, t, d, generator=G)
    k = torch.randn(b, hkv, s, d, generator=G)
    v = torch.randn(b, hkv, s, d, generator=G)
    return q, k, v, torch.tensor([40, 23])


def test_sparse_attention_equals_attention_over_the_selected_rows():
    q, k, v, start = _verify_inputs()
    idx = torch.stack([torch.randperm(23, generator=G)[:10] for _ in range(4)]).view(2, 2, 10)
    idx[0, 1, -2:] = 45  # invalid padding rows (>= start) must be ignored
    out = reference.sparse_attention(q, k, v, start, idx)
    for b in range(2):
        for hq in range(4):
            h = hq // 2
            rows = [int(r) for r in idx[b, h] if r < start[b]]
            for t in range(3):
                keys = rows + list(range(int(start[b]), int(start[b]) + t + 1))
                w = torch.softmax(q[b, hq, t] @ k[b, h, keys].T / math.sqrt(16), -1)
                torch.testing.assert_close(out[b, hq, t], w @ v[b, h, keys], atol=1e-5, rtol=1e-5)


def test_sparse_attention_with_everything_selected_equals_dense():
    q, k, v, start = _verify_inputs()
    idx = torch.arange(40).expand(2, 2, 40).clone()  # rows >= start[1] are invalid for sequence 1
    torch.testing.assert_close(reference.sparse_attention(q, k, v, start, idx),
                               reference.dense_attention(q, k, v, start), atol=1e-5, rtol=1e-5)


def test_selection_config_refuses_impossible_budgets():
    with pytest.raises(STSError, match="exceed the budget"):
        SelectionConfig(budget=16, sink=8, window=16)
    with pytest.raises(STSError, match="> 0"):
        SelectionConfig(budget=0)
    with pytest.raises(STSError, match=">= 0"):
        SelectionConfig(budget=64, sink=-1)
    with pytest.raises(STSError, match="whole"):
        SelectionConfig(budget=10.5)
    assert SelectionConfig(budget=256, sink=4, window=8).tokens(100_000) == 256


def test_fractional_budget_is_the_next_static_size():
    """A fraction resolves to the smallest allowed size (64, or 2**e * (1 + i/8)) holding ceil(f * context) rows."""
    sizes = sorted({64} | {(2**e * (8 + i)) // 8 for e in range(6, 20) for i in range(8)})
    config = SelectionConfig(budget=0.1, sink=4, window=8)
    for context in [10, 640, 641, 1000, 4097, 40_000, 131_072, 262_143]:
        want = math.ceil(0.1 * context)
        rows = config.tokens(context)
        assert rows == min(s for s in sizes if s >= want)
        assert want <= rows <= max(64, want * 1.125)
    # Across a 2x growth of the context only a handful of distinct sizes (kernel shapes) occur.
    assert len({config.tokens(c) for c in range(65_536, 131_073, 7)}) <= 9


@pytest.fixture(scope="module")
def verify_state(tiny_pair):
    """A prefilled pair with one round of recorded draft queries, as the decode loop leaves it."""
    _, target, draft = tiny_pair
    prompt = torch.randint(0, 96, (2, 70), generator=G).tolist()
    prompt[1] = prompt[1][:51]
    tdec, ddec = Decoder(target, 2, 100), Decoder(draft, 2, 100)
    tdec.feed(prompt)
    ddec.feed(prompt)
    layers = tuple(range(draft.config.n_layers))
    recorder = QueryRecorder(layers)
    seqs = [list(p) + [5] for p in prompt]
    ddec.lengths = torch.tensor([len(p) for p in prompt])
    for _ in range(3):
        ddec.feed(seqs, recorder)
        for s in seqs:
            s.append(7)
    start = torch.tensor([len(p) for p in prompt])
    return target, draft, RoundContext(start, target, 0, draft, recorder.take())


def _layer_q(target, start, layer, t=4):
    return torch.randn(2, target.config.n_heads, t, target.config.head_dim, generator=G), target.layers[layer].self_attn.cache.k


def test_streaming_keeps_sinks_and_latest(verify_state):
    target, draft, ctx = verify_state
    policy = make_policy("streaming", SelectionConfig(budget=20, sink=3, window=5), target, draft)
    policy.prepare(replace(ctx, budget=20))
    q, k = _layer_q(target, ctx.start_pos, 0)
    sets = as_sets(policy.select(0, q, k, ctx.start_pos), ctx.start_pos)
    for b, n in enumerate(ctx.start_pos.tolist()):
        assert sets[b, 0] == set(range(3)) | set(range(n - 17, n))


def test_oracle_picks_the_largest_mean_attention(verify_state):
    target, draft, ctx = verify_state
    policy = make_policy("oracle", SelectionConfig(budget=24, sink=0, window=0), target, draft)
    policy.prepare(replace(ctx, budget=24))
    q, k = _layer_q(target, ctx.start_pos, 1)
    probs = reference.attention_probs(q, k, ctx.start_pos)  # [B, Hq, T, N]
    sets = as_sets(policy.select(1, q, k, ctx.start_pos), ctx.start_pos)
    g = target.config.group_size
    for b, n in enumerate(ctx.start_pos.tolist()):
        for h in range(target.config.n_kv_heads):
            importance = probs[b, h * g : (h + 1) * g, :, :n].mean((0, 1))
            assert sets[b, h] == set(torch.topk(importance, 24).indices.tolist())


def test_quest_page_bounds_match_brute_force(verify_state):
    target, draft, ctx = verify_state
    policy = make_policy("quest", SelectionConfig(budget=32, sink=0, window=0), target, draft)
    policy.prepare(ctx)
    q, k = _layer_q(target, ctx.start_pos, 0, t=2)
    scores = policy.scores(0, q, k, ctx.start_pos)
    g = target.config.group_size
    for b, n in enumerate(ctx.start_pos.tolist()):
        for h in range(target.config.n_kv_heads):
            for page in range(math.ceil(n / 16)):
                rows = k[b, h, page * 16 : min(n, page * 16 + 16)]
                best = max(
                    float(torch.maximum(qv * rows.min(0).values, qv * rows.max(0).values).sum())
                    for qv in q[b, h * g : (h + 1) * g].reshape(-1, q.shape[-1])
                )
                assert scores[b, h, page * 16] == pytest.approx(best, rel=1e-4, abs=1e-4)


def test_sts_and_specpc_scores_match_brute_force(verify_state):
    target, draft, ctx = verify_state
    n_max = int(ctx.start_pos.max())

    def draft_probs(layer):  # [B, Hd, gamma, N]: softmax over each sequence's context rows
        q = ctx.draft_queries[layer]
        k = draft.layers[layer].self_attn.cache.k[:, :, :n_max]
        k = k.repeat_interleave(draft.config.group_size, 1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.arange(n_max).view(1, 1, 1, -1) >= ctx.start_pos.view(-1, 1, 1, 1)
        return torch.softmax(logits.masked_fill(mask, float("-inf")), -1)

    sts = make_policy("sts", SelectionConfig(budget=16, sink=2, window=2), target, draft)
    sts.prepare(ctx)
    mapping = HeadMapping.default(target.config, draft.config)
    for layer in range(target.config.n_layers):
        dl = mapping.sources[layer][0][0][0]
        expect = draft_probs(dl).amax(2).amax(1)  # max over gamma queries, then over the layer's heads
        got = sts.scores(layer, None, None, ctx.start_pos)
        for b, n in enumerate(ctx.start_pos.tolist()):
            for h in range(target.config.n_kv_heads):
                torch.testing.assert_close(got[b, h, :n], expect[b, :n], atol=1e-5, rtol=1e-4)
    specpc = make_policy("specpc", SelectionConfig(budget=16, sink=2, window=2), target, draft)
    specpc.prepare(ctx)
    expect = torch.stack([draft_probs(layer).amax(2).amax(1) for layer in range(draft.config.n_layers)]).amax(0)
    got = specpc.scores(0, None, target.layers[0].self_attn.cache.k, ctx.start_pos)
    for b, n in enumerate(ctx.start_pos.tolist()):
        torch.testing.assert_close(got[b, 1, :n], expect[b, :n], atol=1e-5, rtol=1e-4)


def test_tidal_reuses_the_selection_layer_rows(verify_state):
    target, draft, ctx = verify_state
    policy = make_policy("tidal", SelectionConfig(budget=16, sink=0, window=0), target, draft)
    policy.select_layers = (1,)
    policy.prepare(replace(ctx, budget=16))
    q0, k0 = _layer_q(target, ctx.start_pos, 0)
    assert policy.select(0, q0, k0, ctx.start_pos) is None  # before the selection layer: dense
    q1, k1 = _layer_q(target, ctx.start_pos, 1)
    assert policy.select(1, q1, k1, ctx.start_pos) is None  # the selection layer itself is dense
    q2, k2 = _layer_q(target, ctx.start_pos, 2)
    oracle = make_policy("oracle", SelectionConfig(budget=16, sink=0, window=0), target, draft)
    oracle.budget = 16
    assert as_sets(policy.select(2, q2, k2, ctx.start_pos), ctx.start_pos) == as_sets(oracle.select(1, q1, k1, ctx.start_pos), ctx.start_pos)


@pytest.mark.parametrize("method", sorted(REGISTRY) + ["sts-plain"])
def test_budget_covering_the_context_equals_dense_speculative(tiny_pair, method):
    _, target, draft = tiny_pair
    prompts = [list(range(1, 60)), [9, 8, 7] * 20]
    dense = speculative_generate(target, draft, prompts, 20, gamma=3)
    name, options = ("sts", {"rerank": 0}) if method == "sts-plain" else (method, {})
    policy = make_policy(name, SelectionConfig(budget=200, sink=4, window=8), target, draft, **options)
    out = speculative_generate(target, draft, prompts, 20, gamma=3, policy=policy, verify="sparse")
    assert out.tokens == dense.tokens
    assert out.stats.summary()["sparsity"] == 0.0 and out.stats.dense_rounds == 0


def test_small_budget_is_sparse_and_oracle_recall_bounds_every_policy(tiny_pair):
    """On identical queries (shadow mode), the oracle's mass recall is the highest at a given budget."""
    _, target, draft = tiny_pair
    prompt = [torch.randint(0, 96, (120,), generator=G).tolist()]
    tdec, ddec = Decoder(target, 1, 200), Decoder(draft, 1, 200)
    tdec.feed(prompt)
    ddec.feed(prompt)
    recorder = QueryRecorder(range(draft.config.n_layers))
    seq = list(prompt[0])
    for tok in (3, 4, 5):
        seq.append(tok)
        ddec.feed([seq], recorder)
    start = torch.tensor([120])
    config = SelectionConfig(budget=24, sink=2, window=4)
    observers = {}
    queries = recorder.take()
    variants = [(method, method, {}) for method in sorted(REGISTRY)] + [("sts-plain", "sts", {"rerank": 0})]
    for name, method, options in variants:
        policy = make_policy(method, config, target, draft, **options)
        policy.prepare(RoundContext(start, target, 24, draft, queries))
        observers[name] = SelectiveAttention(policy, measure_recall=True)
    target(torch.tensor([[3, 4, 5, 6]]), start, ShadowAttention(observers))
    oracle = observers["oracle"]
    assert float(observers["sts"].layer_sparsity()[0]) == pytest.approx(1 - 24 / 120)
    for method, observer in observers.items():
        for layer, value in observer.recall.items():
            if float(observer.layer_sparsity()[layer]) > 0:  # tidal keeps some layers dense: nothing to bound there
                assert oracle.recall[layer] >= value - 1e-6, (method, layer)
    assert max(oracle.recall.values()) < 1.0


def test_calibration_recovers_a_planted_mapping():
    """A target whose heads are a permutation of the draft's heads maps each head back to its source."""
    cfg = hf_config("llama", layers=2, heads=4, kv_heads=4, hidden=64)
    hf = hf_model(cfg, seed=21)
    with torch.no_grad():  # sharpen attention so that heads are distinguishable
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    draft = ours(hf)
    perm = [2, 0, 3, 1]  # target head h is draft head perm[h]
    state = {k.removeprefix("model."): v.clone() for k, v in hf.state_dict().items()}  # HF names: q/k/v apart
    d = 16
    for layer in range(2):
        for name in ("q_proj", "k_proj", "v_proj"):
            w = state[f"layers.{layer}.self_attn.{name}.weight"].view(4, d, -1)
            state[f"layers.{layer}.self_attn.{name}.weight"] = w[perm].reshape(4 * d, -1)
        o = state[f"layers.{layer}.self_attn.o_proj.weight"].view(-1, 4, d)
        state[f"layers.{layer}.self_attn.o_proj.weight"] = o[:, perm].reshape(-1, 4 * d)
    from sts.models.loading import build_model

    target = build_model(draft.config, state, torch.float32, "cpu")
    texts = [torch.randint(0, 96, (300,), generator=G).tolist() for _ in range(2)]
    for criterion in ("recall", "jaccard"):
        mapping = calibrate(target, draft, texts, criterion=criterion, topk=32, n_queries=16, sink=2, window=8, progress=False)
        for layer in range(2):
            for h in range(4):
                assert mapping.sources[layer][h][0][:2] == (layer, perm[h]), (criterion, layer, h)


def test_mapping_files_round_trip_and_refuse_other_pairs(tmp_path, tiny_pair):
    _, target, draft = tiny_pair
    mapping = HeadMapping.default(target.config, draft.config)
    path = tmp_path / "map.json"
    mapping.save(path)
    assert HeadMapping.load(path) == mapping
    make_policy("sts", SelectionConfig(budget=32, window=8), target, draft, str(path))
    other = ours(hf_model(hf_config("llama", layers=2)))
    with pytest.raises(STSError, match="mapping was made for"):
        make_policy("sts", SelectionConfig(budget=32, window=8), other, draft, str(path))
    path.write_text("{not json")
    with pytest.raises(STSError, match="not valid JSON"):
        HeadMapping.load(path)
    path.write_text(json.dumps({"format": "sts-head-mapping", "version": 1}))
    with pytest.raises(STSError, match="malformed"):
        HeadMapping.load(path)
    with pytest.raises(STSError, match="does not exist"):
        HeadMapping.load(tmp_path / "missing.json")


def test_block_rows_match_brute_force():
    from sts.prefill import PrefillConfig, block_rows

    scores = torch.randn(1, 2, 100, generator=G)
    start = torch.tensor([90])
    rows = block_rows(scores, start, PrefillConfig(budget=40, block=8), sink=1, window=8)
    for h in range(2):
        chosen = {int(r) for r in rows[0, h] if r < 90}
        blocks = {r // 8 for r in chosen}
        assert {0, 11} <= blocks and len(blocks) == 5  # sink block, local block (rows 88-89), 3 more
        best = sorted(range(1, 11), key=lambda i: -float(scores[0, h, i * 8 : i * 8 + 8].max()))[:3]
        assert blocks == {0, 11, *best}
        assert chosen == {r for blk in blocks for r in range(blk * 8, min(blk * 8 + 8, 90))}


def test_sparse_prefill_with_a_covering_budget_equals_dense(tiny_pair):
    from sts.prefill import PrefillConfig

    _, target, draft = tiny_pair
    prompts = [list(range(1, 90)), [9, 8, 7] * 40]
    dense = speculative_generate(target, draft, prompts, 12, gamma=3, prefill_chunk=32)
    same = speculative_generate(target, draft, prompts, 12, gamma=3, prefill_chunk=32, prefill=PrefillConfig(budget=128, block=16))
    assert same.tokens == dense.tokens
    from sts.prefill import sparse_prefill
    from sts.selection.sts import STSPolicy

    def first_logits(budget):
        if budget is None:
            return Decoder(target, 2, 150, prefill_chunk=32).feed(prompts)
        target.setup_cache(2, 150)
        draft.setup_cache(2, 150)
        config = SelectionConfig(budget=32, sink=2, window=8)
        policy = STSPolicy(config, HeadMapping.default(target.config, draft.config))
        return torch.cat([sparse_prefill(target, draft, b, p, policy, PrefillConfig(budget=budget, block=16), config, 32)
                          for b, p in enumerate(prompts)])

    dense_logits = first_logits(None)
    torch.testing.assert_close(first_logits(128), dense_logits, atol=1e-4, rtol=1e-4)
    assert (first_logits(32) - dense_logits).abs().max() > 1e-3  # blocks were really skipped


@pytest.mark.parametrize("prob", [0, 1], ids=["max-logit", "mean-probability"])
def test_sts_rerank_covering_everything_ranks_free_rows_by_the_targets_queries(verify_state, prob):
    """Candidates covering the context: re-ranking is brute-force ranking of the free rows by the target's
    queries (max logit over group and queries; or mean softmax probability over the free rows: the oracle)."""
    target, draft, ctx = verify_state
    config = SelectionConfig(budget=20, sink=2, window=3)
    policy = make_policy("sts", config, target, draft, rerank=100, rerank_prob=prob)
    policy.prepare(replace(ctx, budget=20))
    q, k = _layer_q(target, ctx.start_pos, 1)
    sets = as_sets(policy.select(1, q, k, ctx.start_pos), ctx.start_pos)
    g, d = target.config.group_size, q.shape[-1]
    for b, n in enumerate(ctx.start_pos.tolist()):
        for h in range(target.config.n_kv_heads):
            forced = set(range(2)) | set(range(n - 3, n))
            free = [r for r in range(n) if r not in forced]
            logits = q[b, h * g : (h + 1) * g].reshape(-1, d) @ k[b, h, free].T / math.sqrt(d)
            score = torch.softmax(logits, -1).mean(0) if prob else logits.amax(0)
            best = [free[i] for i in torch.topk(score, 15).indices.tolist()]
            assert sets[b, h] == forced | set(best)


def test_sts_feedback_keeps_rows_the_target_attended_to(verify_state):
    target, draft, ctx = verify_state
    config = SelectionConfig(budget=20, sink=2, window=3)
    policy = make_policy("sts", config, target, draft, feedback=0.4, decay=0.5, rerank=0)
    assert policy.wants_feedback
    policy.prepare(replace(ctx, budget=20))
    rows = torch.tensor([[[10, 11, 12, 13, 14, 15]] * 2] * 2)
    importance = torch.tensor([[[0.0, 0.9, 0.1, 0.8, 0.2, 0.7]] * 2] * 2)
    policy.feedback(0, rows, importance)
    torch.testing.assert_close(policy.importance[0][0, 0, 10:16], importance[0, 0])
    q, k = _layer_q(target, ctx.start_pos, 0)
    sets = as_sets(policy.select(0, q, k, ctx.start_pos), ctx.start_pos)
    for key, chosen in sets.items():
        assert {11, 13, 15} <= chosen  # int(0.4 * 15) = 6 promoted slots: every row with importance > 0 fits
    policy.feedback(0, rows[..., :1], torch.zeros(2, 2, 1))
    assert float(policy.importance[0][0, 0, 11]) == pytest.approx(0.45)  # decayed by half


def test_selected_importance_matches_brute_force():
    q, k, v, start = _verify_inputs()
    idx = torch.tensor([[[0, 3, 9, 39, 44]] * 2, [[1, 2, 22, 30, 5]] * 2])  # 44 and 30 are invalid
    imp = reference.selected_importance(q, k, start, idx)
    for b in range(2):
        for h in range(2):
            best = torch.zeros(5)
            for hq in (2 * h, 2 * h + 1):
                for t in range(3):
                    valid = [j for j, r in enumerate(idx[b, h].tolist()) if r < start[b]]
                    keys = [int(idx[b, h, j]) for j in valid] + list(range(int(start[b]), int(start[b]) + t + 1))
                    p = torch.softmax(q[b, hq, t] @ k[b, h, keys].T / math.sqrt(16), -1)
                    for pos, j in enumerate(valid):
                        best[j] = max(best[j], p[pos])
            torch.testing.assert_close(imp[b, h], best, atol=1e-5, rtol=1e-4)


def test_streaming_direct_rows_equal_top_k_of_recency(verify_state):
    target, draft, _ = verify_state
    start = torch.tensor([70, 9])
    for budget, sink in ((20, 3), (20, 0), (9, 4)):
        policy = make_policy("streaming", SelectionConfig(budget=budget, sink=sink, window=0), target, draft)
        policy.budget = budget
        k = target.layers[0].self_attn.cache.k
        direct = as_sets(policy.select(0, None, k, start), start)
        assert direct == as_sets(topk_rows(policy.scores(0, None, k, start), start, budget, sink, 0), start)


def test_mass_curves_match_brute_force():
    from sts.calibrate import mass_curves

    mass = torch.rand(2, 3, 4, 50, generator=G)
    curves = mass_curves(mass, step=8)
    assert curves.shape == (2, 3, 6)
    for idx in [(0, 0), (1, 2)]:
        for p in range(6):
            share = [sorted(mass[idx][r].tolist(), reverse=True) for r in range(4)]
            want = sum(sum(s[: 8 * (p + 1)]) / sum(s) for s in share) / 4
            assert float(curves[idx][p]) == pytest.approx(want, rel=1e-5)


def test_head_budgets_allocation_is_the_brute_force_optimum():
    from itertools import product

    from sts.selection.budgets import allocate

    # Concave curves of three heads with different concentration: sorted random masses.
    heads = [torch.rand(96, generator=G) ** e for e in (1.0, 4.0, 12.0)]
    curve = torch.stack([(m.sort(descending=True).values.cumsum(0) / m.sum())[3::4] for m in heads]).view(1, 3, -1)
    step, free, cap = 4, 22, 2.0  # 5 blocks of 4 + 2 extra rows per head; each head 1..11 blocks
    got = allocate(curve, step, free, cap)
    assert int(got.sum()) == 3 * free

    def value(blocks):
        return sum(float(curve[0, h, b - 1]) if b else 0.0 for h, b in enumerate(blocks))

    feasible = [c for c in product(range(1, 12), repeat=3) if sum(c) == 15]
    best = max(value(c) for c in feasible)
    assert value([(int(r) - 2) // step for r in got[0]]) == pytest.approx(best, abs=1e-6)
    assert got[0, 2] < got[0, 0]  # the concentrated head needs fewer rows than the diffuse one


def test_sts_head_budgets_give_each_head_its_own_top_k(verify_state, tmp_path):
    target, draft, ctx = verify_state
    base = HeadMapping.default(target.config, draft.config)
    n_heads = target.config.n_kv_heads
    # Head 0 of every layer diffuse (gains spread evenly), the others concentrated: head 0 gets more rows.
    points = 20
    diffuse = [(p + 1) / points for p in range(points)]
    sharp = [min(1.0, 0.9 + 0.1 * p / points) for p in range(points)]
    curve = tuple(tuple(tuple(diffuse if h == 0 else sharp) for h in range(n_heads)) for _ in range(target.config.n_layers))
    path = tmp_path / "curves.json"
    replace(base, mass_curve=curve, curve_step=2).save(path)
    mapping = HeadMapping.load(path)
    assert mapping.mass_curve == curve
    config = SelectionConfig(budget=21, sink=2, window=3)
    policy = make_policy("sts", config, target, draft, str(path), head_budgets=2, rerank=0)
    uniform = make_policy("sts", config, target, draft, str(path))
    for p in (policy, uniform):
        p.prepare(replace(ctx, budget=21))
    widths = policy._head_widths(torch.device("cpu"))
    assert int(widths.sum()) == 21 * widths.numel() and int(widths[0, 0]) > 21 > int(widths[0, 1])
    for layer in range(target.config.n_layers):
        rows = policy.select(layer, None, None, ctx.start_pos)
        scores = uniform.scores(layer, None, None, ctx.start_pos)
        for (b, h), chosen in as_sets(rows, ctx.start_pos).items():
            want = brute_select(scores[b : b + 1, h : h + 1], ctx.start_pos[b : b + 1], int(widths[layer, h]), 2, 3)
            assert chosen == want[0, 0], (layer, b, h)
    with pytest.raises(STSError, match="mass curves"):
        make_policy("sts", config, target, draft, head_budgets=2, rerank=0)
    with pytest.raises(STSError, match="plain rule"):
        make_policy("sts", config, target, draft, str(path), head_budgets=2, rerank=4)


def test_settings_out_of_range_are_refused_naming_the_flag(tiny_pair):
    _, target, draft = tiny_pair
    config = SelectionConfig(budget=64, sink=4, window=8)
    with pytest.raises(STSError, match="rerank must be a whole number >= 0, got -1"):
        make_policy("sts", config, target, draft, rerank=-1)
    with pytest.raises(STSError, match="feedback must be in"):
        make_policy("sts", config, target, draft, feedback=2.0)
    with pytest.raises(STSError, match=f"exceeds the target's {target.config.n_layers} layers"):
        make_policy("sts", SelectionConfig(budget=64, sink=4, window=8, dense_layers=99), target, draft)
    with pytest.raises(STSError, match="draft budget must exceed"):
        speculative_generate(target, draft, [[1, 2, 3]], 4, draft_budget=0)


@pytest.mark.parametrize("settings", [dict(n_queries=85), dict(window=90), dict(topk=80)])
def test_calibration_text_too_short_names_every_setting_that_counts(tiny_pair, settings):
    from sts.calibrate import calibrate

    _, target, draft = tiny_pair
    chosen = {"n_queries": 8, "topk": 8, "sink": 4, "window": 8} | settings
    with pytest.raises(STSError, match="100 tokens is too short") as err:
        calibrate(target, draft, [[i % 90 + 1 for i in range(100)]], progress=False, **chosen)
    said = re.search(r"exceed --queries (\d+) \+ --topk (\d+) \+ --sink 4 \+ --window (\d+) tokens", str(err.value))
    assert said and [int(x) for x in said.groups()] == [chosen["n_queries"], chosen["topk"], chosen["window"]]
