"""The draft's sparse attention with rows scored by STS (``--draft-selection scored``, sts.selection.draft)."""

from __future__ import annotations

import math

import pytest
import torch

from sts.engine import Engine, EngineConfig, generate
from sts.errors import STSError
from sts.eval.harness import parse_methods
from sts.selection import SelectionConfig, make_policy
from sts.selection.base import ranked_free_rows
from sts.selection.draft import ScoredDraftAttention

from test_generation import interleaved_equals_solo


def brute_attention(q, k, v, start, rows):
    """Softmax attention of each query ``q[b, h, t]`` over the context rows in ``rows[b][kv]`` (a set) plus, causally,
    the new rows ``start[b] .. start[b] + t``: one query at a time, in float64."""
    b_, hq, t_, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            for t in range(t_):
                keys = sorted(r for r in rows[b][h // group] if r < int(start[b])) + list(range(int(start[b]), int(start[b]) + t + 1))
                kk, vv = k[b, h // group, keys].double(), v[b, h // group, keys].double()
                p = torch.softmax(kk @ q[b, h, t].double() / math.sqrt(d), -1)
                out[b, h, t] = p @ vv
    return out


def keep_best(attn: ScoredDraftAttention, layers: torch.Tensor, scores: torch.Tensor, start: torch.Tensor) -> None:
    """Keep, for draft layers ``layers``, the best free rows of ``scores`` ``[L, B, N]`` (as STS ranks them)."""
    values, rows = ranked_free_rows(scores.unsqueeze(2), start, attn.sink, attn.window, attn.width)
    attn.keep(layers, values.squeeze(2), rows.squeeze(2))


def test_scored_rows_are_sinks_window_and_the_best_older_rows():
    """keep() keeps, per layer, the top-scored rows older than the window; a later step reads them with its own sinks
    and window, never a row twice, and equals brute-force attention over that set."""
    torch.manual_seed(0)
    layers, slots, hkv, hq, d, cache = 3, 2, 2, 4, 16, 64
    sink, window, budget = 2, 4, 12
    attn = ScoredDraftAttention(layers, slots, hkv, budget, sink, window, invalid=cache, device=torch.device("cpu"))
    scores = torch.rand(layers, slots, cache)
    ctx = torch.tensor([40, 5])  # slot 1: fewer rows than the budget past sinks and window
    scores[:, 0, 40:] = float("-inf")  # past the context, as the policy's scores are
    scores[:, 1, 5:] = float("-inf")
    keep_best(attn, torch.tensor([0, 2]), scores[[0, 2]], ctx)  # layer 1 is not scored
    free = budget - sink - window
    for li, layer in ((0, 0), (1, 2)):
        best = sorted(range(sink, 40 - window), key=lambda r: -float(scores[layer, 0, r]))[:free]
        assert set(attn.rows[layer, 0, 0, sink + window:].tolist()) == set(best)
        assert (attn.rows[layer, 0, 1] == attn.rows[layer, 0, 0]).all()  # every KV head of the layer
        assert (attn.rows[layer, 1, :, sink + window:] == cache).all()  # no row of slot 1 outside sinks and window
    assert (attn.rows[1, :, :, sink + window:] == cache).all()

    start = ctx + 3  # three tokens accepted since: the window moved on
    k, v = torch.randn(slots, hkv, cache, d), torch.randn(slots, hkv, cache, d)
    q = torch.randn(slots, hq, 1, d)
    out = attn(0, q, k, v, start)
    step_rows = attn.rows[0]
    for b in range(slots):
        picked = step_rows[b, 0].tolist()
        real = [r for r in picked if r < int(start[b])]
        assert len(real) == len(set(real))  # no row read twice
    expected = [[set(range(sink)) | set(range(int(s) - window, int(s))) | set(r for r in step_rows[b, kv].tolist() if r < cache)
                 for kv in range(hkv)] for b, s in enumerate(start)]
    assert torch.allclose(out.double(), brute_attention(q, k, v, start, expected), atol=1e-5)
    short = ScoredDraftAttention(1, 1, 1, 14, sink, window, invalid=7, device=torch.device("cpu"))
    short.start(0, 14)  # rows 2..7 before the window of a 14-row sequence (in a larger cache)
    assert short.rows[0, 0, 0, sink + window:].tolist() == list(range(2, 10))
    keep_best(short, torch.tensor([0]), torch.rand(1, 1, 7), torch.tensor([7]))  # scores of a 7-row cache: fewer than 8
    assert short.rows[0, 0, 0, sink + window:].tolist() == [2] + [7] * 7  # row 2 competes; nothing of start() stays
    kept = attn.rows[:, 1].clone()
    attn.start(0, 30)  # a new sequence of 30 rows: the free rows just before its window, until its first scores
    assert (attn.rows[:, 0, :, sink + window:] == torch.arange(30 - window - free, 30 - window)).all()
    assert torch.equal(attn.rows[:, 1], kept)
    attn.start(0, 9)  # a short one: rows that would fall on the sinks are invalid
    assert attn.rows[0, 0, 0, sink + window:].tolist() == [cache, cache, cache, 2, 3, 4]


def test_engine_writes_the_policys_draft_scores_and_starts_new_sequences_afresh(tiny_pair, monkeypatch):
    """After a sparse round the scored columns are the top rows of the policy's own draft-layer scores at that round's
    context; the draft's later steps read them; a new sequence starts from the rows before its window; a full-budget
    verification keeps decoding lossless (equal to the target's greedy)."""
    calls = []
    original = ScoredDraftAttention.__call__
    monkeypatch.setattr(ScoredDraftAttention, "__call__", lambda self, *a: calls.append(a[0]) or original(self, *a))
    _, target, draft = tiny_pair
    selection = SelectionConfig(budget=512, sink=4, window=8)  # more than the context: verification reads every row
    policy = make_policy("sts", selection, target, draft)
    config = EngineConfig(gamma=3, draft_budget=20, draft_selection="scored", verify="sparse")
    engine = Engine(target, draft, policy, slots=1, max_len=200, config=config)
    prompt = [(7 * i) % 90 + 1 for i in range(120)]
    engine.prefill(0, prompt)
    assert (engine.scored_draft.rows[:, 0, :, 12:] == torch.arange(120 - 8 - 8, 120 - 8)).all()
    ctx = torch.tensor(engine.host_ctx)
    engine.step()
    scores = policy.draft_layer_scores()
    layers = policy.draft_layers(draft)
    for i, layer in enumerate(layers):
        s = scores[i, 0].clone()
        s[:4] = s[int(ctx[0]) - 8:] = float("-inf")
        want = set(torch.topk(s, 20 - 4 - 8).indices.tolist())
        assert set(engine.scored_draft.rows[layer, 0, 0, 12:].tolist()) == want
    engine.release(0)
    assert sorted(set(calls)) == list(range(draft.config.n_layers))  # steps 2 and 3 of the round, every layer
    out = engine.generate([prompt], 30)
    assert out.tokens == generate(target, [prompt], 30).tokens


@pytest.mark.parametrize("gamma", [1, 3])
def test_early_scoring_equals_scoring_after_the_draft(tiny_pair, monkeypatch, gamma):
    """STS scores each draft layer during the draft's last step, once that layer's queries of the round are complete:
    round by round the scores equal those the select phase computes from the whole round's queries, the select phase
    scores nothing itself, and the decoded tokens are the same."""
    from sts.selection.sts import STSPolicy

    _, target, draft = tiny_pair
    prompt = [(7 * i) % 90 + 1 for i in range(120)]
    steps: list[int] = []  # queries per score pass
    original = STSPolicy.score_sources
    monkeypatch.setattr(STSPolicy, "score_sources",
                        lambda self, layer, q, *a: steps.append(q.shape[2]) or original(self, layer, q, *a))
    runs = []
    for early in (True, False):
        policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft)
        engine = Engine(target, draft, policy, slots=1, max_len=200,
                        config=EngineConfig(gamma=gamma, draft_budget=20, draft_selection="scored-all",
                                            verify="sparse"))
        engine.early_scoring = early
        engine.prefill(0, prompt)
        tokens, scores = [], []
        for _ in range(4):
            steps.clear()
            tokens += engine.step()[0]
            scores.append(policy.source_scores.clone())
            # One pass per draft layer, each over the round's gamma queries.
            assert steps == [gamma] * len(policy.draft_layers(draft))
        runs.append((tokens, scores))
    (early_tokens, early_scores), (late_tokens, late_scores) = runs
    assert early_tokens == late_tokens
    for got, want in zip(early_scores, late_scores):
        assert torch.equal(got, want)


@pytest.mark.parametrize("selection", ["scored", "scored-all"])
def test_continuous_batching_with_a_scored_draft_is_lossless(tiny_pair, selection):
    _, target, draft = tiny_pair
    policy = make_policy("sts", SelectionConfig(budget=256, sink=4, window=8), target, draft)
    interleaved_equals_solo(target, draft, policy, draft_budget=24, draft_selection=selection)


@pytest.mark.parametrize("verify", ["sparse", "auto"])
@pytest.mark.parametrize("selection", ["recent", "recent-all", "scored", "scored-all"])
def test_which_draft_steps_read_the_sparse_rows(tiny_pair, monkeypatch, selection, verify):
    """In a sparse round the first draft step reads every row unless the selection ends in "-all", the later steps
    read the sparse rows. These tiny contexts verify densely with verify="auto": such a round drafts densely too."""
    from sts.attention import backend, dispatch

    _, target, draft = tiny_pair
    seen: list[bool] = []  # per attention call of the round, in order: did it read selected rows (not every row)?
    sparse, dense = dispatch.verify_attention, backend.dense_sdpa
    monkeypatch.setattr(dispatch, "verify_attention", lambda q, k, v, s, idx=None: seen.append(idx is not None) or sparse(q, k, v, s, idx))
    monkeypatch.setattr(backend, "dense_sdpa", lambda q, k, v, s: seen.append(False) or dense(q, k, v, s))
    policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft)
    engine = Engine(target, draft, policy, slots=1, max_len=200,
                    config=EngineConfig(gamma=3, draft_budget=20, draft_selection=selection, verify=verify))
    engine.prefill(0, [(7 * i) % 90 + 1 for i in range(120)])
    seen.clear()
    engine.step()
    layers = draft.config.n_layers
    assert len(seen) == 3 * layers + target.config.n_layers  # three draft steps, then the verify
    sparse_round = verify == "sparse"
    assert seen[:layers] == [sparse_round and selection.endswith("-all")] * layers
    assert seen[layers : 3 * layers] == [sparse_round] * (2 * layers)
    assert seen[3 * layers :] == [sparse_round] * target.config.n_layers


def test_scored_draft_settings_are_refused_where_they_do_not_apply(tiny_pair):
    _, target, draft = tiny_pair
    policy = make_policy("sts", SelectionConfig(budget=64, sink=4, window=8), target, draft)
    for selection in ("scored", "recent-all", "scored-all"):
        with pytest.raises(STSError, match="needs a draft budget"):
            EngineConfig(draft_selection=selection)  # type: ignore[arg-type]
    with pytest.raises(STSError, match="must be one of recent, scored, recent-all, scored-all"):
        EngineConfig(draft_budget=20, draft_selection="best")  # type: ignore[arg-type]
    with pytest.raises(STSError, match="use --method sts"):
        Engine(target, draft, None, max_len=64, config=EngineConfig(draft_budget=20, draft_selection="scored"))
    with pytest.raises(STSError, match="exceed sink \\+ window"):
        Engine(target, draft, policy, max_len=64, config=EngineConfig(draft_budget=12, draft_selection="scored"))
    streaming = make_policy("streaming", SelectionConfig(budget=64, sink=4, window=8), target, draft)
    with pytest.raises(STSError, match="use --method sts"):
        Engine(target, draft, streaming, max_len=64, config=EngineConfig(draft_budget=20, draft_selection="scored"))
    assert parse_methods(["sts/draft_budget=256/scored_draft=1"], None)[0].draft_selection == "scored"
    assert parse_methods(["sts/draft_budget=256"], None)[0].draft_selection == "recent"
    assert parse_methods(["sts/draft_budget=256/scored_draft=1/draft_all_steps=1"], None)[0].draft_selection == "scored-all"
    assert parse_methods(["speculative/draft_budget=256/draft_all_steps=1"], None)[0].draft_selection == "recent-all"
    for name in ("sts/scored_draft=1", "speculative/draft_budget=256/scored_draft=1", "sts/draft_budget=256/scored_draft=2"):
        with pytest.raises(STSError, match="scored_draft=1 applies"):
            parse_methods([name], None)
    with pytest.raises(STSError, match="draft_all_steps=1 applies"):
        parse_methods(["sts/draft_all_steps=1"], None)


def test_the_server_and_the_api_take_the_draft_selection(tiny_pair):
    """`sts serve --draft-selection` reaches the LLM's settings, and the LLM's engine decodes with that selection."""
    from sts.api import LLM
    from sts.cli import build_parser
    from sts.runner import LoadedModel
    from sts.serve.options import llm_settings

    args = build_parser().parse_args(["serve", "--target", "t", "--draft", "d", "--draft-budget", "24",
                                      "--draft-selection", "scored-all"])
    assert llm_settings(args)["draft_selection"] == "scored-all"
    _, target, draft = tiny_pair
    llm = LLM(LoadedModel(target, None), LoadedModel(draft, None), "sts", budget=16, sink=2, window=4,
              draft_budget=12, draft_selection="scored-all", max_model_len=160, device="cpu")
    assert llm.settings["draft_selection"] == "scored-all" and llm.engine.scored_draft is not None
    prompt = [(7 * i) % 90 + 1 for i in range(100)]
    assert len(llm.generate(prompt, max_tokens=8)[0].token_ids) == 8


def test_draft_settings_resolve_auto_by_method_and_refuse_other_values():
    from sts.runner import DEFAULT_DRAFT_BUDGET, draft_settings

    assert draft_settings("sts", "auto", None) == (DEFAULT_DRAFT_BUDGET, "scored-all")
    assert draft_settings("sts", "auto", "recent-all") == (DEFAULT_DRAFT_BUDGET, "recent-all")
    assert draft_settings("speculative", "auto", None) == (None, "recent")
    assert draft_settings("quest", "auto", None) == (None, "recent")
    assert draft_settings("sts", None, None) == (None, "recent")
    assert draft_settings("sts", 64, None) == (64, "scored-all")
    assert draft_settings("speculative", 64, None) == (64, "recent")
    assert draft_settings("sts", "dense", None) == (None, "recent")
    for bad in ("bogus", 64.5, True):
        with pytest.raises(STSError, match="draft budget must be 'auto', 'dense'"):
            draft_settings("sts", bad, None)  # type: ignore[arg-type]
    with pytest.raises(STSError, match="reuses STS's draft scores: it needs method sts, not quest"):
        draft_settings("quest", 64, "scored-all")
    with pytest.raises(STSError, match="a draft budget needs a draft"):
        draft_settings("autoregressive", 64, None)
    assert draft_settings("autoregressive", "auto", None) == (None, None)
    with pytest.raises(STSError, match="a draft selection needs a draft"):
        draft_settings("autoregressive", None, "recent")
    with pytest.raises(STSError, match="draft selection recent-all needs a draft budget"):
        draft_settings("speculative", "auto", "recent-all")


def test_draft_layer_scores_are_each_layers_max_over_its_scored_heads(tiny_pair):
    """With a map that scores several heads of a draft layer, a layer's row is the max of those heads' softmax
    scores (against the reference scoring, head by head); with one head per layer, the rows themselves."""
    from sts.attention.backend import QueryRecorder
    from sts.attention.scores import context_scores
    from sts.selection.base import RoundContext
    from sts.selection.mapping import HeadMapping
    from sts.selection.sts import STSPolicy
    from sts.speculative import speculative_generate

    _, target, draft = tiny_pair
    n = draft.config.n_heads
    sources = tuple(tuple(((0, (h + layer) % n, 1.0), (2, h % n, 1.0)) for h in range(target.config.n_kv_heads))
                    for layer in range(target.config.n_layers))
    policy = STSPolicy(SelectionConfig(budget=24, sink=2, window=4),
                       HeadMapping(sources, "max", target.config.identity(), draft.config.identity()))
    prompts = [[(7 * i) % 90 + 1 for i in range(60)], [5, 6, 7] * 15]
    speculative_generate(target, draft, prompts, 1, gamma=3)  # fills both caches
    recorder = QueryRecorder(range(draft.config.n_layers))  # every layer: the default map below reads others
    start = torch.tensor([55, 40])
    for i in range(3):
        draft(torch.tensor([[3 + i], [9 + i]]), start + i, recorder)
    queries = recorder.take()
    policy.prepare(RoundContext(start, target, 24, draft, queries))
    got = policy.draft_layer_scores()
    assert policy.draft_layers(draft) == (0, 2) and got.shape[:2] == (2, 2)
    for i, layer in enumerate((0, 2)):
        heads = sorted({dh for lay in sources for head in lay for dl, dh, _ in head if dl == layer})
        assert len(heads) > 1
        ref = context_scores(queries[layer], draft.layers[layer].self_attn.cache.k, start)[:, heads].amax(1)
        assert torch.allclose(got[i, :, : ref.shape[-1]], ref)
    single = STSPolicy(SelectionConfig(budget=24, sink=2, window=4), HeadMapping.default(target.config, draft.config))
    single.prepare(RoundContext(start, target, 24, draft, queries))
    assert single.draft_layer_scores() is single.source_scores


@pytest.mark.parametrize("draft_rows", [6, 60])
def test_one_ranking_serves_the_candidates_and_the_scored_draft(tiny_pair, draft_rows):
    """With one source row per target head (the default map), prepare() ranks the source rows once, as far as the
    wider of the re-rank's candidates (here 4 x 10) and the scored draft's rows: both must be exactly what ranking
    each separately gives (brute force: a full sort of the masked scores), per-sequence budgets included."""
    from sts.attention.backend import QueryRecorder
    from sts.selection.base import RoundContext
    from sts.selection.mapping import HeadMapping
    from sts.selection.sts import STSPolicy
    from sts.speculative import speculative_generate

    _, target, draft = tiny_pair
    prompts = [[(7 * i) % 90 + 1 for i in range(80)], [5, 6, 7] * 20]
    speculative_generate(target, draft, prompts, 1, gamma=3)
    recorder = QueryRecorder(range(draft.config.n_layers))
    start = torch.tensor([75, 50])
    for i in range(3):
        draft(torch.tensor([[3 + i], [9 + i]]), start + i, recorder)
    sink, window, budget = 2, 4, 16
    policy = STSPolicy(SelectionConfig(budget=budget, sink=sink, window=window),
                       HeadMapping.default(target.config, draft.config))
    slot_budgets = torch.tensor([16, 11])
    policy.prepare(RoundContext(start, target, budget, draft, recorder.take(), slot_budgets=slot_budgets,
                                draft_rows=draft_rows))
    assert policy.source_top is not None  # the shared path ran

    def best(row: torch.Tensor, ctx: int, k: int) -> list[int]:
        order = sorted(range(sink, ctx - window), key=lambda r: -float(row[r]))
        return order[:k]

    scores = policy.draft_layer_scores()
    values, rows = policy.draft_layer_ranking(start, draft_rows)
    cand, usable = policy.candidates
    for b in range(2):
        for li in range(scores.shape[0]):
            want = best(scores[li, b], int(start[b]), draft_rows)
            assert rows[li, b, : len(want)].tolist() == want and torch.isinf(values[li, b, len(want):]).all()
        for layer in range(target.config.n_layers):
            source = int(policy.combo_sources[policy.combo_of[layer, 0], 0])
            own = 4 * (int(slot_budgets[b]) - sink - window)
            want = best(scores[source, b], int(start[b]), own)
            for h in range(target.config.n_kv_heads):
                assert cand[b, layer, h][usable[b, layer, h]].tolist() == want


def test_a_draft_budget_past_the_cache_drafts_densely(tiny_pair, monkeypatch):
    """A draft budget of at least the cache's rows reads every row anyway: the draft runs the dense path (no scored
    rows kept) and decodes as a dense draft does; a scored selection still needs STS."""
    from sts.attention import dispatch

    _, target, draft = tiny_pair
    policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft)
    config = EngineConfig(gamma=3, draft_budget=200, draft_selection="scored", verify="sparse")
    engine = Engine(target, draft, policy, slots=1, max_len=200, config=config)
    assert engine.scored_draft is None
    gathered: list[int] = []
    verify = dispatch.verify_attention
    monkeypatch.setattr(dispatch, "verify_attention", lambda q, k, v, s, idx=None: gathered.append(q.shape[0]) or verify(q, k, v, s, idx))
    prompt = [(7 * i) % 90 + 1 for i in range(120)]
    out = engine.generate([prompt], 12)
    assert len(gathered) == out.stats.target_forwards * target.config.n_layers  # the verify's layers alone read rows
    dense = Engine(target, draft, make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft),
                   slots=1, max_len=200, config=EngineConfig(gamma=3, verify="sparse")).generate([prompt], 12)
    assert out.tokens == dense.tokens
    with pytest.raises(STSError, match="use --method sts"):
        Engine(target, draft, make_policy("quest", SelectionConfig(budget=48, sink=4, window=8), target, draft), slots=1,
               max_len=200, config=EngineConfig(gamma=3, draft_budget=200, draft_selection="scored"))
