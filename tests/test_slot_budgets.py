"""Per-slot budgets: each slot of a batched round reads what it would read decoded alone at its own budget.

A round's row count is one static number (the largest slot's); a ranked policy's rows past a slot's
own budget are made invalid (:meth:`SelectionPolicy.slot_rows`). The references are each prompt
decoded alone by an engine whose policy has that budget, and brute-force top-k selections.
"""

from __future__ import annotations

import pytest
import torch

from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.selection import SelectionConfig, make_policy
from sts.selection.base import RoundContext

SINK, WINDOW = 4, 16
#: Three contexts whose fractional budgets fall in different buckets (64, 120 and 224 rows at 0.3).
PROMPTS = [[(7 * i) % 90 + 1 for i in range(150)], [(11 * i) % 93 + 2 for i in range(400)],
           [(5 * i + 3) % 95 for i in range(700)]]
NEW = 12
MAX_LEN = 760
#: Ranked policies: STS plain and re-ranked (its default), and baselines.
POLICIES = [("sts", {"rerank": 0}), ("sts", {}), ("streaming", {}), ("oracle", {}), ("specpc", {})]
IDS = ["sts-plain", "sts-rerank", "streaming", "oracle", "specpc"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared machine: one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def engine(pair, method: str, options: dict, budget: float, slots: int) -> Engine:
    """Return a sparse-verifying engine of ``method`` at ``budget`` (gamma 3, greedy)."""
    _, target, draft = pair
    policy = make_policy(method, SelectionConfig(budget=budget, sink=SINK, window=WINDOW), target, draft, **options)
    return Engine(target, draft, policy, slots=slots, max_len=MAX_LEN, config=EngineConfig(gamma=3, verify="sparse"))


def alone(pair, method: str, options: dict, budget: float, prompt: list[int]) -> list[int]:
    """Return the greedy tokens of ``prompt`` decoded alone by an engine whose policy has ``budget``."""
    return engine(pair, method, options, budget, 1).generate([prompt], NEW).tokens[0]


def batched(eng: Engine, budgets: list[float | None]) -> list[list[int]]:
    """Return the greedy tokens of every prompt decoded together, slot ``s`` at ``budgets[s]`` (None: the policy's)."""
    out = [[eng.prefill(s, p, budget=b)] for s, (p, b) in enumerate(zip(PROMPTS, budgets))]
    while any(len(o) < NEW for o in out):
        for s, tokens in enumerate(eng.step()):
            out[s] += tokens
    return [o[:NEW] for o in out]


@pytest.mark.parametrize(("method", "options"), POLICIES, ids=IDS)
def test_a_fractional_budget_batched_equals_each_prompt_alone(tiny_pair, method, options):
    """Each slot resolves the fraction against its own context, not the longest slot's."""
    eng = engine(tiny_pair, method, options, 0.3, 3)
    got = eng.generate(PROMPTS, NEW).tokens
    assert got == [alone(tiny_pair, method, options, 0.3, p) for p in PROMPTS]


@pytest.mark.parametrize(("method", "options"), POLICIES, ids=IDS)
def test_per_slot_token_budgets_batched_equal_each_alone_at_its_budget(tiny_pair, method, options):
    budgets = [24, None, 100]  # None: the policy's 48
    eng = engine(tiny_pair, method, options, 48, 3)
    got = batched(eng, budgets)
    assert [alone(tiny_pair, method, options, b or 48, p) for p, b in zip(PROMPTS, budgets)] == got


def test_each_slot_reads_its_own_rows_in_the_round(tiny_pair):
    """The device buffer holds each slot's own rows (fraction resolved per context); the round's is their max."""
    eng = engine(tiny_pair, "streaming", {}, 0.3, 3)
    for s, p in enumerate(PROMPTS):
        eng.prefill(s, p, budget=[0.3, 32, None][s])
    assert eng._rows() == 224
    want = [SelectionConfig(0.3, SINK, WINDOW).tokens(150), 32, SelectionConfig(0.3, SINK, WINDOW).tokens(700)]
    assert eng.host_budgets == want and eng.slot_budgets.tolist() == want


def brute_force(scores: torch.Tensor, ctx: int, budget: int) -> set[int]:
    """Return the rows a solo selection at ``budget`` reads from one head's ``scores``: sinks, window and the best rest
    (every row when the context fits the budget)."""
    if ctx <= budget:
        return set(range(ctx))
    forced = set(range(SINK)) | set(range(ctx - WINDOW, ctx))
    rest = sorted((r for r in range(ctx) if r not in forced), key=lambda r: -float(scores[r]))
    return forced | set(rest[: budget - len(forced)])


@pytest.mark.parametrize("method", ["oracle", "streaming", "quest"])
def test_a_slots_rows_are_the_solo_selection_at_its_budget(tiny_pair, method):
    """Brute force over the policy's scores: a slot at budget b reads sinks, window and the b - sink - window best rows
    of its own context, though the round selects 96."""
    _, target, draft = tiny_pair
    torch.manual_seed(0)
    hq, hkv, t, d, n = 4, 2, 4, 16, 300
    start = torch.tensor([300, 120, 40])
    q, k = torch.randn(3, hq, t, d), torch.randn(3, hkv, n + t, d)
    budgets = [64, 30, 64]  # slot 2's context fits its budget: all of it
    options = {"page_size": 1} if method == "quest" else {}  # one row per page: no ties between a page's rows
    policy = make_policy(method, SelectionConfig(budget=96, sink=SINK, window=WINDOW), target, draft, **options)
    policy.prepare(RoundContext(start, target, 96, slot_budgets=torch.tensor(budgets)))
    rows = policy.slot_rows(0, q, k, start)
    scores = policy.scores(0, q, k, start)
    assert rows.shape == (3, hkv, 96)
    for b in range(3):
        ctx = int(start[b])
        for h in range(hkv):
            assert {int(r) for r in rows[b, h] if r < ctx} == brute_force(scores[b, h], ctx, budgets[b]), (b, h)


def test_impossible_slot_budgets_are_refused(tiny_pair):
    eng = engine(tiny_pair, "sts", {"rerank": 0}, 48, 2)
    with pytest.raises(STSError, match="exceed the budget"):
        eng.prefill(0, PROMPTS[0], budget=SINK + WINDOW - 1)
    with pytest.raises(STSError, match="budget must be finite and > 0"):
        eng.prefill(0, PROMPTS[0], budget=-1)
    assert eng.free_slots() == [0, 1]
    eng.prefill(0, PROMPTS[0], budget=10**6)  # past the context: every row (capped at the cache length)
    assert eng._rows() == MAX_LEN
    feedback = engine(tiny_pair, "sts", {"feedback": 0.25}, 48, 1)
    with pytest.raises(STSError, match="whole round's budget"):
        feedback.prefill(0, PROMPTS[0], budget=32)
    _, target, draft = tiny_pair
    dense = Engine(target, draft, slots=1, max_len=MAX_LEN)
    with pytest.raises(STSError, match="selection methods"):
        dense.prefill(0, PROMPTS[0], budget=32)


def test_reranking_with_own_budgets_reads_each_sequences_solo_rows():
    """The re-ranking reference with per-sequence budgets: each sequence's rows are those it re-ranks alone at its own
    budget, all in its first ``budgets[b]`` slots (where the engine's cut keeps them)."""
    from sts.attention.rerank import rerank_rows

    torch.manual_seed(1)
    sp = torch.tensor([400, 300, 200, 40, 30])
    own = torch.tensor([60, 30, 12, 36, 36])  # the round's; smaller; none free; context between own and 60; fits own
    q, k = torch.randn(5, 4, 2, 16), torch.randn(5, 2, 420, 16)
    cand = torch.zeros(5, 2, 100, dtype=torch.long)
    usable = torch.zeros(5, 2, 100, dtype=torch.bool)
    for b, ctx in enumerate(sp.tolist()):
        for h in range(2):
            rows = 4 + torch.randperm(ctx - 4 - 8)[:100]
            cand[b, h, : len(rows)], usable[b, h, : len(rows)] = rows, True
    out = rerank_rows(q, k, cand, usable, sp, 4, 8, 60, True, own)
    for b, (ctx, budget) in enumerate(zip(sp.tolist(), own.tolist())):
        solo = rerank_rows(q[b : b + 1], k[b : b + 1], cand[b : b + 1], usable[b : b + 1], sp[b : b + 1], 4, 8, budget, True)
        for h in range(2):
            assert {int(r) for r in out[b, h] if r < ctx} == {int(r) for r in solo[0, h] if r < ctx}, (b, h)
            assert not (out[b, h, budget:] < ctx).any()
