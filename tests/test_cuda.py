"""The engine on a CUDA device (Triton kernels, CUDA graphs). CPU-only machines run the same paths'
references in the other test files; these run where a GPU is (the GPU machine's test command)."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_config, hf_model, ours, perturbed
from sts.engine import generate
from sts.models.loading import build_model
from sts.selection import SelectionConfig, make_policy
from sts.speculative import speculative_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda(model, dtype=torch.float32):
    return build_model(model.config, model.state_dict(), dtype, "cuda")


@pytest.fixture(scope="module")
def cuda_pair():
    hf = hf_model(hf_config("llama", layers=3, heads=8, kv_heads=2, hidden=256), seed=0)
    target = ours(hf)
    return hf, on_cuda(target), on_cuda(perturbed(target, 0.1, seed=1))


def test_cuda_logits_match_transformers(cuda_pair):
    hf, target, _ = cuda_pair
    hf = hf.cuda()
    target.setup_cache(2, 128)
    tokens = torch.randint(0, 96, (2, 70), device="cuda")
    start = torch.zeros(2, dtype=torch.long, device="cuda")
    prefill = target(tokens[:, :60], start)  # SDPA
    steps = [target(tokens[:, 60 + i : 61 + i], start + 60 + i) for i in range(5)]  # Triton decode
    verify = target(tokens[:, 65:], start + 65)  # Triton, 5 queries
    ours_logits = torch.cat([prefill, *steps, verify], dim=1)
    torch.testing.assert_close(ours_logits, hf(tokens).logits, atol=2e-3, rtol=2e-3)


def test_cuda_speculative_and_full_budget_sts_equal_greedy(cuda_pair):
    _, target, draft = cuda_pair
    prompts = [list(range(1, 80)), [5, 6, 7] * 30]
    ref = generate(target, prompts, 24).tokens
    assert speculative_generate(target, draft, prompts, 24, gamma=4).tokens == ref
    for options in ({"rerank": 0}, {}):  # the paper's plain rule, the default (re-ranking)
        policy = make_policy("sts", SelectionConfig(budget=256, sink=4, window=16), target, draft, **options)
        assert speculative_generate(target, draft, prompts, 24, gamma=4, policy=policy).tokens == ref
    for options in ({"rerank": 0}, {}):
        small = make_policy("sts", SelectionConfig(budget=32, sink=4, window=8), target, draft, **options)
        out = speculative_generate(target, draft, prompts, 24, gamma=4, policy=small, measure_recall=True)
        assert 0 < out.stats.summary()["recall"] < 1


def test_cuda_rerank_rows_equal_the_reference_in_a_decode_round(cuda_pair):
    """The fused kernel serves STS re-ranking on CUDA and picks the reference path's rows."""
    from sts.attention import rerank
    from sts.attention.backend import QueryRecorder
    from sts.selection.base import RoundContext

    _, target, draft = cuda_pair
    prompts = [[(7 * i) % 96 for i in range(199)], [5, 6, 7] * 60]
    speculative_generate(target, draft, prompts, 1, gamma=4)  # fills both caches
    policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft)  # default: re-ranking
    policy.budget = 48
    recorder = QueryRecorder(policy.draft_layers(draft))
    start = torch.tensor([190, 170], device="cuda")
    for i in range(4):
        draft(torch.randint(0, 96, (2, 1), device="cuda"), start + i, recorder)
    policy.prepare(RoundContext(start, target, draft, recorder.take()))
    q = torch.randn(2, target.config.n_heads, 5, target.config.head_dim, device="cuda")
    k = target.layers[1].self_attn.cache.k
    got = policy.select(1, q, k, start)
    cand, usable = (t[:, policy.combo_of[1]] for t in policy.candidates)
    want = rerank.rerank_rows(q, k, cand, usable, start, 4, 8, 48, True)
    assert got.shape == want.shape
    for b in range(2):
        for h in range(target.config.n_kv_heads):
            assert set(got[b, h].tolist()) == set(want[b, h].tolist()), (b, h)


@pytest.mark.parametrize("options", [{"rerank": 0}, {}], ids=["plain", "rerank"])
def test_cuda_graph_replay_of_an_sts_round_matches_eager(cuda_pair, options):
    from sts.bench.e2e import Setup, _accept, _draft_steps, graphed
    from sts.attention.backend import QueryRecorder
    from sts.selection.attend import SelectiveAttention
    from sts.selection.base import RoundContext

    _, target, draft = cuda_pair
    with torch.no_grad():
        for m in (target, draft):
            m.setup_cache(2, 300)
            for blk in m.layers:
                blk.self_attn.cache.k.normal_()
                blk.self_attn.cache.v.normal_()
        s = Setup(target, draft, 2, 256, 4, torch.tensor([256, 200], device="cuda"), torch.tensor([[3], [4]], device="cuda"))
        policy = make_policy("sts", SelectionConfig(budget=64, sink=4, window=16), target, draft, **options)
        policy.budget = 64
        recorder = QueryRecorder(policy.draft_layers(draft))
        out: dict[str, torch.Tensor] = {}

        def sts_round() -> None:
            drafted = _draft_steps(s, recorder)
            policy.prepare(RoundContext(s.start, target, draft, recorder.take()))
            logits = target(torch.cat([s.last, drafted], 1), s.start, SelectiveAttention(policy))
            out["logits"], out["n"] = logits, _accept(drafted, logits)

        sts_round()
        eager = out["logits"].clone()
        replay = graphed(sts_round)
        out["logits"].zero_()
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out["logits"], eager, atol=1e-4, rtol=1e-4)
