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
        assert speculative_generate(target, draft, prompts, 24, gamma=4, policy=policy, verify="sparse").tokens == ref
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
    recorder = QueryRecorder(policy.draft_layers(draft))
    start = torch.tensor([190, 170], device="cuda")
    for i in range(4):
        draft(torch.randint(0, 96, (2, 1), device="cuda"), start + i, recorder)
    policy.prepare(RoundContext(start, target, 48, draft, recorder.take()))
    q = torch.randn(2, target.config.n_heads, 5, target.config.head_dim, device="cuda")
    k = target.layers[1].self_attn.cache.k
    got = policy.select(1, q, k, start)
    cand, usable = (t[:, policy.combo_of[1]] for t in policy._top_candidates(policy.combined, start))  # layer 1's heads
    want = rerank.rerank_rows(q, k, cand, usable, start, 4, 8, 48, True)
    assert got.shape == want.shape
    for b in range(2):
        for h in range(target.config.n_kv_heads):
            assert set(got[b, h].tolist()) == set(want[b, h].tolist()), (b, h)


ENGINE_METHODS = ["autoregressive", "speculative", "speculative+sd", "speculative+sd-recent-all", "sts", "sts+sd",
                  "sts+sd-scored", "sts+sd-scored-all", "sts-8bit+sd-scored-all", "sts-plain", "streaming",
                  "specpc", "quest", "tidal", "oracle"]


def run_engine(target, draft, method, prompts, n, graphs, eos=(), budget=64.0, sampling=None, seed=0, slots=None,
               verify="sparse", hardware=None):
    """Return the generation of ``method`` through the engine, with or without CUDA graphs (a policy's rounds sparse
    unless ``verify="auto"``, whose cross-over is modelled on ``hardware``, default an H200's)."""
    from sts.costmodel import Hardware
    from sts.engine import Engine, EngineConfig
    from sts.sampling import SamplingConfig

    selection = method.partition("+sd-")[2] or "recent"  # sts+sd-scored(-all): the sparse draft's rows by STS's scores
    name, sparse_draft = method.partition("+sd")[0], "+sd" in method
    config = EngineConfig(gamma=4, cuda_graphs=graphs, draft_budget=24 if sparse_draft else None,
                          draft_selection=selection,
                          sampling=sampling or SamplingConfig(), seed=seed, verify=verify, hardware=hardware or Hardware())
    policy = None
    if name not in ("autoregressive", "speculative"):
        variants = {"sts-plain": ("sts", {"rerank": 0}), "sts-8bit": ("sts", {"key_bits": 8})}
        base, options = variants.get(name, (name, {}))
        policy = make_policy(base, SelectionConfig(budget=budget, sink=4, window=8), target, draft, **options)
    engine = Engine(target, None if name == "autoregressive" else draft, policy, slots=slots or len(prompts),
                    max_len=max(map(len, prompts)) + n + 8, config=config)
    return engine, engine.generate(prompts, n, eos)


@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_cuda_graph_path_equals_eager_path(cuda_pair, method):
    """Every method decodes the same tokens with its rounds in CUDA graphs as eagerly (greedy, bf16 too)."""
    _, target, draft = cuda_pair
    prompts = [[(7 * i) % 96 for i in range(300)], [5, 6, 7] * 70, list(range(1, 90))]
    engine, graphed = run_engine(target, draft, method, prompts, 40, graphs=True)
    _, eager = run_engine(target, draft, method, prompts, 40, graphs=False)
    assert graphed.tokens == eager.tokens
    expect_graphs = method.partition("+sd")[0] in ("autoregressive", "speculative", "sts", "sts-8bit", "sts-plain",
                                                   "streaming", "specpc")
    assert bool(engine._graphs) == expect_graphs
    if method.startswith(("autoregressive", "speculative")):  # lossless methods equal plain greedy
        assert graphed.tokens == generate(target, prompts, 40).tokens


def test_cuda_eight_bit_score_keys_are_the_centred_keys(cuda_pair):
    """With STS's key_bits=8, every row the graphed rounds and the prefill wrote holds float8(K - the prompt's mean
    key) in the copy (the compiled cache write against PyTorch's own cast), the rows the generation reached included."""
    _, target, draft = cuda_pair
    prompts = [[(7 * i) % 96 for i in range(300)], [5, 6, 7] * 70]
    engine, _ = run_engine(target, draft, "sts-8bit+sd-scored-all", prompts, 40, graphs=True)
    assert engine._graphs
    for layer in engine.policy.draft_layers(draft):
        cache = draft.layers[layer].self_attn.cache
        for b, prompt in enumerate(prompts):
            n = len(prompt) + 40
            want = (cache.k[b, :, :n].float() - cache.key_mean[b][:, None]).to(torch.float8_e4m3fn)
            assert torch.equal(cache.score_keys[b, :, :n].view(torch.uint8), want.view(torch.uint8)), (layer, b)


@pytest.mark.parametrize("method", ["sts", "sts+sd-scored-all"])
def test_cuda_early_scoring_on_a_side_stream_equals_scoring_after_the_draft(cuda_pair, monkeypatch, method):
    """STS's score passes on a second stream during the draft's last step (in the draft phase's graph) decode the same
    tokens as scores computed eagerly in the select phase, on one stream, after the whole draft."""
    from sts.engine import Engine

    _, target, draft = cuda_pair
    prompts = [[(7 * i) % 96 for i in range(300)], [5, 6, 7] * 70]
    engine, graphed = run_engine(target, draft, method, prompts, 40, graphs=True)
    assert engine.early_scoring and engine._side is not None
    init = Engine.__init__
    monkeypatch.setattr(Engine, "__init__",
                        lambda self, *a, **k: init(self, *a, **k) or setattr(self, "early_scoring", False))
    _, late = run_engine(target, draft, method, prompts, 40, graphs=False)
    assert graphed.tokens == late.tokens


@pytest.mark.parametrize("method", ["sts", "sts+sd", "specpc"])
def test_cuda_dense_crossover_rounds_graphed_equal_eager(cuda_pair, method):
    """Below the break-even (these tiny models never reach the H200's) a policy's rounds verify densely in their own
    graphs: graphed equals eager equals dense speculative decoding; no select phase is captured."""
    _, target, draft = cuda_pair
    prompts = [[(7 * i) % 96 for i in range(300)], [5, 6, 7] * 70]
    engine, graphed = run_engine(target, draft, method, prompts, 40, graphs=True, verify="auto")
    _, eager = run_engine(target, draft, method, prompts, 40, graphs=False, verify="auto")
    _, dense = run_engine(target, draft, method.replace(method.removesuffix("+sd"), "speculative"), prompts, 40, graphs=True)
    assert graphed.tokens == eager.tokens == dense.tokens
    assert graphed.stats.dense_rounds == graphed.stats.target_forwards and graphed.stats.select_s == 0
    assert set(engine._graphs) == {(0, "greedy")} and len(engine._graphs[0, "greedy"]) == 2  # draft, verify


def test_cuda_crossing_the_break_even_mid_generation_graphed_equals_eager(cuda_pair):
    """Counting bytes only, the slots cross the break-even while decoding: dense and sparse rounds each replay their
    own graphs, and the tokens equal the eager path's."""
    from sts.costmodel import Hardware

    _, target, draft = cuda_pair
    bytes_only = Hardware(bandwidth=1.0, round_s=0.0, rerank_layer_s=0.0, score_s=0.0, forward_s=0.0)
    prompts = [[(7 * i) % 96 for i in range(320)], [5, 6, 7] * 110]
    engine, graphed = run_engine(target, draft, "sts", prompts, 60, graphs=True, verify="auto", hardware=bytes_only)
    _, eager = run_engine(target, draft, "sts", prompts, 60, graphs=False, verify="auto", hardware=bytes_only)
    assert graphed.tokens == eager.tokens
    assert 0 < graphed.stats.dense_rounds == eager.stats.dense_rounds < graphed.stats.target_forwards
    assert set(engine._graphs) == {(0, "greedy"), (64, "greedy")}


def test_cuda_graphed_sampling_keeps_the_target_distribution():
    """Rejection sampling inside CUDA graphs: the second token's empirical law is the target's exact marginal."""
    from scipy.stats import chisquare
    from sts.sampling import SamplingConfig

    hf = hf_model(hf_config("llama", vocab=8, layers=1, hidden=64), seed=11)  # head dim 16: the kernels' smallest
    target = ours(hf)
    draft = perturbed(target, 0.5, seed=12)
    prompt, n = [1, 2, 3], 4000
    engine, out = run_engine(on_cuda(target), on_cuda(draft), "speculative", [prompt] * n, 2, graphs=True,
                             sampling=SamplingConfig(temperature=1.0), seed=5)
    assert engine._graphs
    second = torch.tensor([t[1] for t in out.tokens])
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        p2 = torch.softmax(hf(torch.tensor([prompt + [t] for t in range(8)])).logits[:, -1], -1)
    marginal = (p1.unsqueeze(1) * p2).sum(0)
    counts = torch.bincount(second, minlength=8).float()
    assert chisquare(counts.numpy(), (marginal * n).numpy()).pvalue > 1e-3


def test_cuda_heads_the_kernels_do_not_take_fall_back_to_the_reference():
    """Head dim 8 (under the kernels' 16): the PyTorch paths serve it, eagerly, and greedy stays lossless."""
    hf = hf_model(hf_config("llama", vocab=64, layers=2, hidden=32), seed=4)
    target = on_cuda(ours(hf))
    draft = on_cuda(perturbed(ours(hf), 0.2, seed=5))
    prompts = [list(range(1, 40)), [3, 4] * 20]
    engine, out = run_engine(target, draft, "sts", prompts, 20, graphs=True, budget=16)
    assert not engine._graphs
    assert run_engine(target, draft, "speculative", prompts, 20, graphs=True)[1].tokens == generate(target, prompts, 20).tokens
    assert all(len(t) == 20 for t in out.tokens)


def test_cuda_batch_of_four_lengths_with_early_eos_equals_each_alone(cuda_pair):
    """Sequences stop at different rounds (EOS, limit); every one equals its own solo greedy decode."""
    _, target, draft = cuda_pair
    prompts = [[5, 0], [5, 7], list(range(1, 60)), [9, 8] * 40]
    solo = [generate(target, [p], 60).tokens[0] for p in prompts]
    eos = solo[1][3]  # stops sequence 1 early (and any other that emits it)
    for method in ("speculative", "sts"):
        _, out = run_engine(target, draft, method, prompts, 60, graphs=True, eos=[eos], budget=1024)
        for b, ref in enumerate(solo):
            cut = ref.index(eos) + 1 if eos in ref else 60
            assert out.tokens[b] == ref[:cut], (method, b)


@pytest.mark.parametrize("method", ["sts", "sts-plain", "streaming", "specpc"])
def test_cuda_per_slot_budgets_graphed_equal_eager_and_each_alone(cuda_pair, method):
    """Slots at their own budgets (24 rows, the policy's 64, 0.3 of the context) share graphed rounds of the largest:
    the tokens equal the eager path's, and each slot's equal its graphed solo run at its budget."""
    from sts.engine import Engine, EngineConfig

    _, target, draft = cuda_pair
    prompts = [[(7 * i) % 90 + 1 for i in range(150)], [(11 * i) % 93 + 2 for i in range(300)],
               [(5 * i + 3) % 95 for i in range(500)]]
    budgets = [24, None, 0.3]
    n = 30

    def decode(graphs: bool, batch: list[list[int]], own: list[float | None], budget: float = 64):
        base, options = ("sts", {"rerank": 0}) if method == "sts-plain" else (method, {})
        policy = make_policy(base, SelectionConfig(budget=budget, sink=4, window=8), target, draft, **options)
        engine = Engine(target, draft, policy, slots=len(batch), max_len=max(map(len, batch)) + n + 16,
                        config=EngineConfig(gamma=4, cuda_graphs=graphs, verify="sparse"))
        out = [[engine.prefill(s, p, budget=b)] for s, (p, b) in enumerate(zip(batch, own))]
        engine._rows()
        rows = engine.slot_budgets.tolist()  # the first round's, on the device
        while any(engine.host_active):
            for s, tokens in enumerate(engine.step()):
                out[s] += tokens
                if len(out[s]) >= n and engine.host_active[s]:
                    engine.release(s)
        return engine, [o[:n] for o in out], rows

    engine, graphed, rows = decode(True, prompts, budgets)
    assert engine._graphs and rows == [24, 64, SelectionConfig(0.3).tokens(500)]
    assert graphed == decode(False, prompts, budgets)[1]
    for p, b, tokens in zip(prompts, budgets, graphed):
        assert decode(True, [p], [None], 64 if b is None else b)[1][0] == tokens, b


def long_model(layers: int = 2):
    """Return a small-width random Llama (bf16, CUDA) whose context reaches 80K tokens."""
    hf = hf_model(hf_config("llama", layers=layers, heads=4, kv_heads=2, hidden=256, vocab=512,
                            max_position_embeddings=80_000), seed=3)
    return hf, build_model(ours(hf).config, hf.state_dict(), torch.bfloat16, "cuda")


@pytest.mark.parametrize("context,budget", [(65_536, 0.1), (32_768, 8192.0)])
def test_cuda_long_context_budgets_run_to_the_end(context, budget):
    """Budgets past the fused re-rank kernel's candidate limit, and fractions at 64K, decode to the end in graphs."""
    _, target = long_model()
    draft = build_model(target.config, {k: v + 0.01 * torch.randn_like(v) for k, v in target.state_dict().items()},
                        torch.bfloat16, "cuda")
    prompt = torch.randint(0, 512, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    for method in ("sts", "sts-plain"):
        engine, out = run_engine(target, draft, method, [prompt], 24, graphs=True, budget=budget)
        assert len(out.tokens[0]) == 24 and engine._graphs
        sparsity = out.stats.summary()["sparsity"]
        rows = SelectionConfig(budget=budget, sink=4, window=8).tokens(context)
        assert sparsity == pytest.approx(1 - rows / context, abs=0.01)


def test_cuda_chunked_prefill_matches_a_single_forward_at_long_context():
    """The prefill path (lower-right causal SDPA per chunk) equals transformers' one-shot forward."""
    from sts.engine import Engine, EngineConfig

    hf, _ = long_model(layers=1)
    target = build_model(ours(hf).config, hf.state_dict(), torch.float32, "cuda")
    hf = hf.cuda()
    tokens = torch.randint(0, 512, (1, 5000), device="cuda")
    engine = Engine(target, slots=2, max_len=5100, config=EngineConfig(prefill_chunk=1536))
    engine.prefill(1, tokens[0].tolist())
    logits = engine._prefill_logits[1]
    with torch.no_grad():
        ref = hf(tokens).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=2e-3)


def test_cuda_sparse_prefill_is_refused_before_any_work(cuda_pair):
    from sts.engine import Engine, EngineConfig
    from sts.errors import STSError
    from sts.prefill import PrefillConfig

    _, target, draft = cuda_pair
    with pytest.raises(STSError, match="CPU only"):
        Engine(target, draft, slots=1, max_len=64, config=EngineConfig(sparse_prefill=PrefillConfig()))


@pytest.mark.parametrize("method", ["speculative", "sts", "sts+sd-scored", "sts+sd-scored-all"])
def test_cuda_continuous_batching_with_chunked_prefill_is_lossless(cuda_pair, method):
    from test_generation import interleaved_equals_solo

    _, target, draft = cuda_pair
    policy = make_policy("sts", SelectionConfig(budget=256, sink=4, window=8), target, draft) if "sts" in method else None
    scored = dict(draft_budget=24, draft_selection=method.partition("+sd-")[2]) if "scored" in method else {}
    interleaved_equals_solo(target, draft, policy, **scored)
