"""Synthetic pairs (sts.bench.synthetic) against independent references: transformers' Llama on the
same weights, plain argmax loops, the product's speculative decoding, and the acceptance closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAMILIES, hf_config
from sts.bench.synthetic import (
    TINY_SHAPES,
    acceptance_rate,
    expected_tokens_per_round,
    fill_cache,
    next_token_maps,
    shape_config,
    sharpness_for,
    synthetic_model,
    synthetic_pair,
    top_probability,
)
from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.sampling import SamplingConfig
from sts.speculative import speculative_generate

V = TINY_SHAPES["tiny-target"]["vocab_size"]
GAMMA = 4


@pytest.fixture(scope="module")
def pairs():
    """Return agreement -> (target, draft): tiny float32 CPU pairs, seed 0."""
    return {a: synthetic_pair("tiny-target", "tiny-draft", a, dtype=torch.float32, device="cpu") for a in (0.5, 0.8, 0.95)}


def walk(successor: torch.Tensor, start: int, n: int) -> list[int]:
    """Return the ``n`` tokens after ``start`` when following ``successor``."""
    out, tok = [], start
    for _ in range(n):
        tok = int(successor[tok])
        out.append(tok)
    return out


def prompts(n: int, length: int = 6, seed: int = 1) -> list[list[int]]:
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_state(model) -> dict[str, torch.Tensor]:
    """Return our model's weights under transformers' Llama names (q/k/v and gate/up split apart)."""
    cfg, out = model.config, {}
    sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    for name, w in model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            base = name.removesuffix("qkv_proj.weight")
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), w.split(sizes)):
                out[f"model.{base}{part}.weight"] = piece
        elif name.endswith("gate_up_proj.weight"):
            base = name.removesuffix("gate_up_proj.weight")
            gate, up = w.chunk(2)
            out[f"model.{base}gate_proj.weight"], out[f"model.{base}up_proj.weight"] = gate, up
        else:
            out[name if name == "lm_head.weight" else f"model.{name}"] = w
    return out


def test_maps_are_one_cycle_and_agree_at_the_chosen_rate():
    for agreement in (0.0, 0.5, 0.8, 0.95, 1.0):
        f, g = next_token_maps(V, agreement, seed=3)
        assert len(set(walk(f, 0, V))) == V  # one cycle through the whole vocabulary
        assert sorted(g.tolist()) == list(range(V))  # the draft's map is a permutation too
        assert abs((f == g).double().mean().item() - agreement) <= 1 / V
    for vocab in (128256, 1000, 97):  # Llama-3's vocabulary (2^8 * 3 * 167), a square-full one, a prime
        f, _ = next_token_maps(vocab, 1.0, seed=5)
        assert len(set(walk(f, 7, vocab))) == vocab
    with pytest.raises(STSError, match="exactly one token"):
        next_token_maps(V, 1 - 1 / V, seed=0)
    with pytest.raises(STSError, match=r"\[0, 1\]"):
        next_token_maps(V, 1.2, seed=0)


def test_target_greedy_follows_f_in_ours_and_in_transformers(pairs):
    from transformers import LlamaForCausalLM

    target, _ = pairs[0.8]
    f, _ = next_token_maps(V, 0.8, seed=0)
    prompt = prompts(1, length=12, seed=2)[0]
    expected = walk(f, prompt[-1], 50)

    target.setup_cache(1, 64)
    tok = target(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long))[0, -1].argmax().item()
    ours = [tok]
    for i in range(49):
        tok = target(torch.tensor([[tok]]), torch.tensor([len(prompt) + i]))[0, -1].argmax().item()
        ours.append(tok)
    assert ours == expected

    hf = LlamaForCausalLM(target.config.hf_config).eval()
    hf.load_state_dict(hf_state(target), strict=True)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(50):
            seq.append(hf(torch.tensor([seq])).logits[0, -1].argmax().item())
    assert seq[len(prompt):] == expected


@pytest.mark.parametrize("agreement", [0.5, 0.8, 0.95])
def test_every_token_in_context_predicts_its_map(pairs, agreement):
    target, draft = pairs[agreement]
    f, g = next_token_maps(V, agreement, seed=0)
    tokens = torch.randperm(V, generator=torch.Generator().manual_seed(4)).view(8, V // 8)  # every token once
    start = torch.zeros(8, dtype=torch.long)
    choice = {}
    for name, model, successor in (("target", target, f), ("draft", draft, g)):
        model.setup_cache(8, V // 8)
        choice[name] = model(tokens, start).argmax(-1)
        assert torch.equal(choice[name], successor[tokens]), name
    share = (choice["target"] == choice["draft"]).double().mean().item()
    assert abs(share - agreement) <= 1 / V


def round_length_std(a: float, gamma: int) -> float:
    """Return the standard deviation of tokens per round when each draft token is accepted with probability a."""
    probs = [a ** (k - 1) * (1 - a) for k in range(1, gamma + 1)] + [a**gamma]  # k = 1 .. gamma + 1 tokens
    mean = sum(k * p for k, p in enumerate(probs, 1))
    return math.sqrt(sum((k - mean) ** 2 * p for k, p in enumerate(probs, 1)))


@pytest.mark.parametrize("agreement", [0.5, 0.8, 0.95])
def test_greedy_speculative_decoding_accepts_at_the_closed_form_rate(pairs, agreement):
    target, draft = pairs[agreement]
    f, _ = next_token_maps(V, agreement, seed=0)
    batch = prompts(16)
    out = speculative_generate(target, draft, batch, 100, gamma=GAMMA)
    assert out.tokens == [walk(f, p[-1], 100) for p in batch]  # the target's own greedy output
    rounds = len(out.stats.accepted_per_round)
    measured = out.stats.summary()["acceptance_length"]
    expected = expected_tokens_per_round(agreement, GAMMA)
    # 4 standard errors of the mean of independent rounds: 0.17 / 0.29 / 0.23 tokens here, about 350-850 rounds.
    # Evenly spaced disagreement (5.0 at 0.8) or an agreement off by 0.05 fails.
    assert abs(measured - expected) < 4 * round_length_std(agreement, GAMMA) / math.sqrt(rounds)


def test_sampled_speculative_decoding_accepts_at_the_closed_form_rate():
    agreement, temperature = 0.8, 1.0
    hidden = TINY_SHAPES["tiny-target"]["hidden_size"]
    assert TINY_SHAPES["tiny-draft"]["hidden_size"] == hidden
    sharpness = sharpness_for(0.8, temperature, V, hidden)
    target, draft = synthetic_pair("tiny-target", "tiny-draft", agreement, sharpness=sharpness,
                                   dtype=torch.float32, device="cpu")
    alpha = acceptance_rate(agreement, sharpness, temperature, V, hidden, hidden)

    # Per token, against the models' own distributions over every token of the vocabulary.
    tokens = torch.randperm(V, generator=torch.Generator().manual_seed(4)).view(8, V // 8)
    dists = []
    for model in (target, draft):
        model.setup_cache(8, V // 8)
        dists.append((model(tokens, torch.zeros(8, dtype=torch.long)) / temperature).softmax(-1))
    p, q = dists
    assert abs(p.max(-1).values.mean().item() - top_probability(sharpness, temperature, V, hidden)) < 0.01
    assert abs(torch.minimum(p, q).sum(-1).mean().item() - alpha) < 0.005

    # Per round, in the product's decode loop.
    torch.manual_seed(0)
    out = speculative_generate(target, draft, prompts(16), 100, gamma=GAMMA, sampling=SamplingConfig(temperature=temperature))
    rounds = len(out.stats.accepted_per_round)
    measured = out.stats.summary()["acceptance_length"]
    assert abs(measured - expected_tokens_per_round(alpha, GAMMA)) < 4 * round_length_std(alpha, GAMMA) / math.sqrt(rounds)


def test_prediction_ignores_a_random_cache(pairs):
    target, _ = pairs[0.8]
    f, _ = next_token_maps(V, 0.8, seed=0)
    start = fill_cache(target, 4, 1500, lookahead=8, seed=2)
    assert start.tolist() == [1500] * 4
    assert target.layers[0].self_attn.cache.k[:, :, :1500].std() > 0.5
    tokens = torch.tensor(prompts(4, length=3))
    assert torch.equal(target(tokens, start).argmax(-1), f[tokens])


@pytest.mark.parametrize("family", FAMILIES)
def test_any_family_config_follows_its_map(family):
    config = ModelConfig.from_hf(hf_config(family, vocab=1024))  # Qwen2: q/k/v biases and a tied head
    f, _ = next_token_maps(1024, 1.0, seed=6)
    model = synthetic_model(shape_config(config), f, dtype=torch.float32, device="cpu")
    model.setup_cache(2, 64)
    tokens = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(7))
    assert torch.equal(model(tokens, torch.zeros(2, dtype=torch.long)).argmax(-1), f[tokens])


def test_untied_head_and_shape_errors():
    target, draft = synthetic_pair("tiny-target", "tiny-draft", 0.8, dtype=torch.float32, device="cpu")
    for model in (target, draft):
        assert not model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    with pytest.raises(STSError, match="vocabulary"):
        synthetic_pair("tiny-target", dict(TINY_SHAPES["tiny-draft"], vocab_size=V // 2), 0.8, dtype=torch.float32, device="cpu")
    with pytest.raises(STSError, match="unknown shape"):
        synthetic_pair("tiny-target", "llama-9000", 0.8, dtype=torch.float32, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_shapes_in_bf16_on_cuda():
    """The 8B/1B shapes in bf16 follow their maps at a 32K random context, built without large float32 copies."""
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests of the session still hold
    target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.8)
    weights = sum(p.numel() * p.element_size() for m in (target, draft) for p in m.parameters())
    assert torch.cuda.max_memory_allocated() - before - weights < 2**30
    vocab = target.config.vocab_size
    f, g = (m.cuda() for m in next_token_maps(vocab, 0.8, seed=0))
    tokens = torch.randint(0, vocab, (4, 512), device="cuda")
    for model, successor in ((target, f), (draft, g)):
        start = fill_cache(model, 4, 32768, lookahead=512)
        assert torch.equal(model(tokens, start).argmax(-1), successor[tokens])
    share = (f[tokens] == g[tokens]).double().mean().item()
    assert abs(share - 0.8) < 0.03  # 2048 draws of a Bernoulli(0.8)
