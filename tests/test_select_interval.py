"""STS's ``select_interval``: one round of n scores the context, the next n - 1 re-rank its candidates with their own
verify queries (sts.engine skips their select phase)."""

from __future__ import annotations

import pytest
import torch

from sts.attention import dispatch
from sts.costmodel import Hardware
from sts.engine import Engine, EngineConfig, generate
from sts.errors import STSError
from sts.selection import SelectionConfig, make_policy
from sts.selection.sts import STSPolicy

SINK, WINDOW, BUDGET, RERANK = 4, 8, 24, 2


def engine_with_log(target, draft, interval, slots=1, verify="sparse", hardware=Hardware(), **draft_settings):
    """Return (engine, log): ``log`` gets one ("budget", rows) per round and one ("prepare", scores, start_pos) per
    select phase, in order."""
    policy = make_policy("sts", SelectionConfig(budget=BUDGET, sink=SINK, window=WINDOW), target, draft,
                         rerank=RERANK, select_interval=interval)
    engine = Engine(target, draft, policy, slots=slots, max_len=260,
                    config=EngineConfig(gamma=3, verify=verify, hardware=hardware, **draft_settings))
    log: list[tuple] = []
    prepare, budget = policy.prepare, engine._budget

    def logged_prepare(ctx):
        prepare(ctx)
        log.append(("prepare", policy.combined.clone(), ctx.start_pos.clone()))

    def logged_budget():
        rows = budget()
        log.append(("budget", rows))
        return rows

    policy.prepare, engine._budget = logged_prepare, logged_budget
    return engine, log


def selected_rounds(log):
    """Return, per round, (its rows, whether it ran a select phase)."""
    rounds = []
    for entry in log:
        if entry[0] == "budget":
            rounds.append([entry[1], False])
        else:
            rounds[-1][1] = True
    return [tuple(r) for r in rounds]


PROMPTS = [[(7 * i) % 90 + 1 for i in range(120)], [(5 * i) % 80 + 3 for i in range(100)]]


@pytest.mark.parametrize("interval", [1, 3])
def test_one_round_of_each_interval_selects_and_any_change_makes_the_next_select(tiny_pair, interval):
    """With one sequence the select phase runs in rounds 0, n, 2n, ...; a sequence joining makes the next round
    select whatever the count."""
    _, target, draft = tiny_pair
    engine, log = engine_with_log(target, draft, interval, slots=2)
    engine.prefill(0, PROMPTS[0])
    for _ in range(7):
        engine.step()
    assert [s for _, s in selected_rounds(log)] == [i % interval == 0 for i in range(7)]
    log.clear()
    engine.prefill(1, PROMPTS[1])  # joins mid-interval (round 7 would reuse with one sequence)
    for _ in range(4):
        engine.step()
    assert [s for _, s in selected_rounds(log)] == [i % interval == 0 for i in range(4)]


def test_the_first_sparse_round_after_dense_ones_selects(tiny_pair):
    """Counting bytes only, a sequence crosses the break-even while decoding: the first sparse round selects, dense
    rounds select nothing, and from there every third sparse round selects."""
    _, target, draft = tiny_pair
    bytes_only = Hardware(bandwidth=1.0, round_s=0.0, rerank_layer_s=0.0, score_s=0.0)
    engine, log = engine_with_log(target, draft, 3, verify="auto", hardware=bytes_only)
    result = engine.generate([[(7 * i) % 90 + 1 for i in range(40)]], 120)
    rounds = selected_rounds(log)
    dense = [i for i, (rows, _) in enumerate(rounds) if rows == 0]
    assert 0 < len(dense) == result.stats.dense_rounds < len(rounds)
    since = None
    for rows, selected in rounds:  # the rule, spelt out: a selection serves itself and the next two sparse rounds
        if rows == 0:
            assert not selected
            since = None
            continue
        assert selected == (since is None or since == 2), rounds
        since = 0 if selected else since + 1


def test_a_reused_round_reranks_the_last_selections_candidates_with_its_own_queries(tiny_pair, monkeypatch):
    """In a reused round every layer re-ranks exactly the candidates the last select phase's scores ranked best
    (recomputed here from those scores and that round's context), with this round's verify queries and context,
    and reads no row twice."""
    _, target, draft = tiny_pair
    calls = []
    rerank = dispatch.rerank_rows
    monkeypatch.setattr(dispatch, "rerank_rows", lambda *a: calls.append(a) or rerank(*a))
    engine, log = engine_with_log(target, draft, 2, slots=2)
    for slot, prompt in enumerate(PROMPTS):
        engine.prefill(slot, prompt)
    engine.step()  # selects
    _, scores, start = log[-1]
    calls.clear()
    engine.step()  # reuses
    assert selected_rounds(log) == [(BUDGET, True), (BUDGET, False)]
    assert len(calls) == target.config.n_layers
    policy = engine.policy
    assert isinstance(policy, STSPolicy)
    free = BUDGET - SINK - WINDOW
    for layer, (q, _, cand, usable, now, *_) in enumerate(calls):
        assert (now > start).all()  # this round's context, past the selection's
        assert q.shape[2] == engine.gamma + 1  # this round's verify queries
        rows = rerank(q, target.layers[layer].self_attn.cache.k, cand, usable, now, SINK, WINDOW, BUDGET,
                                    True, engine.slot_budgets)
        for b in range(2):
            for h in range(target.config.n_kv_heads):
                s = scores[b, policy.combo_of[layer, h]].clone()
                s[:SINK] = float("-inf")
                s[int(start[b]) - WINDOW:] = float("-inf")
                want = set(torch.topk(s, RERANK * free).indices.tolist())
                assert set(cand[b, h][usable[b, h]].tolist()) == want, (layer, b, h)
                read = [r for r in rows[b, h].tolist() if r < int(now[b])]
                assert len(read) == len(set(read)) == BUDGET  # no row twice: the candidates are older than any window


@pytest.mark.parametrize("draft_selection", ["recent", "scored-all"])
def test_reusing_selections_is_lossless_when_the_budget_holds_the_context(tiny_pair, draft_selection):
    """Budget past the context: every round reads every row, so decoding equals the target's greedy decoding."""
    _, target, draft = tiny_pair
    policy = make_policy("sts", SelectionConfig(budget=512, sink=SINK, window=WINDOW), target, draft, select_interval=3)
    settings = dict(draft_budget=40, draft_selection=draft_selection) if draft_selection != "recent" else {}
    engine = Engine(target, draft, policy, slots=2, max_len=200, config=EngineConfig(gamma=3, verify="sparse", **settings))
    assert engine.generate(PROMPTS, 40).tokens == generate(target, PROMPTS, 40).tokens


@pytest.mark.parametrize("options,message", [
    (dict(select_interval=0), "whole number >= 1"),
    (dict(select_interval=1.5), "whole number >= 1"),
    (dict(select_interval=2, feedback=0.25), "--feedback changes them"),
])
def test_impossible_intervals_are_refused(tiny_pair, options, message):
    _, target, draft = tiny_pair
    with pytest.raises(STSError, match=message):
        make_policy("sts", SelectionConfig(budget=64, sink=4, window=8), target, draft, **options)
