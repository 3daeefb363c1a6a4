"""Greedy, sampling and speculative decoding against independent references."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from conftest import hf_config, hf_model, ours, perturbed
from sts.engine import generate
from sts.errors import STSError
from sts.sampling import SamplingConfig, SamplingRows, probabilities
from sts.sampling import accept
from sts.speculative import speculative_generate

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 42], list(range(10, 35))]


def test_greedy_matches_transformers_generate(tiny_pair):
    hf, target, _ = tiny_pair
    out = generate(target, PROMPTS, 24)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert tokens == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("gamma", [1, 2, 4, 6])
def test_speculative_greedy_equals_target_greedy(tiny_pair, gamma):
    _, target, draft = tiny_pair
    ref = generate(target, PROMPTS, 30)
    out = speculative_generate(target, draft, PROMPTS, 30, gamma=gamma)
    assert out.tokens == ref.tokens
    acc = out.stats.summary()["acceptance_length"]
    assert 1.0 < acc <= gamma + 1  # the noisy draft is right sometimes, not always


def test_a_gamma_past_the_tokens_asked_for_is_cut_to_them(tiny_pair):
    """`sts generate --gamma 64 --max-new-tokens 4` drafts at most 3 tokens a round: with a draft that always agrees
    (the target's own weights) the same tokens as gamma 3 in one round of 4, not one round accepting 65."""
    from sts.runner import LoadedModel, run_method

    target, draft = LoadedModel(tiny_pair[1], None), LoadedModel(perturbed(tiny_pair[1], 0.0, seed=0), None)
    wide = run_method("speculative", target, draft, [PROMPTS[0]], 4, gamma=64)
    assert wide.tokens == run_method("speculative", target, draft, [PROMPTS[0]], 4, gamma=3).tokens
    assert len(wide.tokens[0]) == 4 and wide.stats.accepted_per_round == [4]


def test_eos_stops_each_sequence_and_streams_in_order(tiny_pair):
    _, target, draft = tiny_pair
    ref = generate(target, PROMPTS, 30).tokens
    eos = ref[1][5]  # a token sequence 1 emits at step 6
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    out = speculative_generate(target, draft, PROMPTS, 30, gamma=3, eos_ids=[eos],
                               on_tokens=lambda b, ids: streamed[b].extend(ids))
    for b in range(3):
        cut = ref[b].index(eos) + 1 if eos in ref[b] else 30
        assert out.tokens[b] == ref[b][:cut]
        assert streamed[b] == out.tokens[b]


def test_top_k_and_top_p_match_brute_force():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    ref = torch.zeros(5)
    ref[:2] = torch.softmax(logits[0, :2], 0)
    torch.testing.assert_close(p[0], ref)
    full = torch.softmax(logits[0], 0)  # 0.55, 0.20, 0.12, ...: top-p 0.7 keeps the first two
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(p[0], torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    p = probabilities(logits, SamplingConfig(temperature=0.5))
    torch.testing.assert_close(p[0], torch.softmax(logits[0] / 0.5, 0))
    # A k past the vocabulary keeps every token; a top_p that float32 rounds to 0 keeps the most likely one.
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=200_000))
    torch.testing.assert_close(p[0], full)
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=1e-300))
    torch.testing.assert_close(p[0], torch.eye(5)[0])


def test_temperatures_out_of_float32_reach_are_greedy_or_refused():
    """Below MIN_TEMPERATURE decoding is greedy (as vLLM); dividing by 1e-40 in float32 gave inf logits and token 0."""
    tiny = SamplingConfig(temperature=1e-40)
    assert tiny.greedy and tiny.temperature == 0.0
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    torch.testing.assert_close(probabilities(logits, tiny)[0], torch.tensor([0.0, 1.0, 0.0]))
    rows = SamplingRows.filled(SamplingConfig(temperature=1e-45, top_p=0.5), 1)
    torch.testing.assert_close(probabilities(logits, rows)[0], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(STSError, match=r"temperature must be in \[0, 10000\], got 1e\+39"):
        SamplingConfig(temperature=1e39)


def test_rejection_sampling_keeps_target_distribution():
    """Emitted tokens follow p exactly, whatever q proposed (chi-square, fixed seed)."""
    g = torch.Generator().manual_seed(0)
    v, n = 6, 40000
    p_rows = torch.softmax(torch.randn(3, v, generator=g) * 1.5, -1)
    q_rows = torch.softmax(torch.randn(2, v, generator=g) * 1.5, -1)
    drafted = torch.stack([torch.multinomial(q_rows[i], n, replacement=True, generator=g) for i in range(2)], 1)
    n_acc, nxt = accept(drafted, q_rows.expand(n, 2, v), p_rows.expand(n, 3, v), g)
    first = torch.where(n_acc >= 1, drafted[:, 0], nxt)
    counts = torch.bincount(first, minlength=v).float()
    assert chisquare(counts.numpy(), (p_rows[0] * n).numpy()).pvalue > 1e-3
    # The second position, among rows that got that far, follows p_rows[1] too.
    reached = n_acc >= 1
    second = torch.where(n_acc[reached] >= 2, drafted[reached, 1], nxt[reached])
    counts = torch.bincount(second, minlength=v).float()
    assert chisquare(counts.numpy(), (p_rows[1] * reached.sum()).numpy()).pvalue > 1e-3
    # And a draft that equals the target is always accepted.
    n_same, _ = accept(drafted, p_rows[:2].expand(n, 2, v), p_rows.expand(n, 3, v), g)
    assert bool((n_same == 2).all())


def test_speculative_sampling_end_to_end_distribution():
    """The second generated token's empirical distribution equals the target's exact marginal."""
    hf = hf_model(hf_config("llama", vocab=8, layers=1, hidden=32), seed=11)
    target = ours(hf)
    draft = perturbed(target, 0.5, seed=12)
    prompt = [1, 2, 3]
    n = 3000
    out = speculative_generate(target, draft, [prompt] * n, 2, gamma=2, sampling=SamplingConfig(temperature=1.0),
                               seed=5)
    second = torch.tensor([t[1] for t in out.tokens])
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        ctx = torch.tensor([prompt + [t] for t in range(8)])
        p2 = torch.softmax(hf(ctx).logits[:, -1], -1)
    marginal = (p1.unsqueeze(1) * p2).sum(0)
    counts = torch.bincount(second, minlength=8).float()
    assert chisquare(counts.numpy(), (marginal * n).numpy()).pvalue > 1e-3


def test_bad_generation_settings():
    target = ours(hf_model(hf_config("llama")))
    with pytest.raises(STSError, match="gamma"):
        speculative_generate(target, target, PROMPTS, 4, gamma=0)
    with pytest.raises(STSError, match=r"1020 tokens \+ 10 new tokens \+ 1 row a round writes past them exceeds the context"):
        generate(target, [[1] * 1020], 10)
    with pytest.raises(STSError, match="temperature"):
        SamplingConfig(temperature=-1)
    other = ours(hf_model(hf_config("llama", vocab=50)))
    with pytest.raises(STSError, match="vocabulary"):
        speculative_generate(target, other, PROMPTS, 4)


def test_stats_of_a_request_with_no_token_kept_and_counts_in_the_context_message():
    """A request aborted before its prefill's token was kept reports 0 tokens/s (it was negative); the context
    message counts one token and one row in the singular."""
    from sts.decoding import GenerationStats, context_capacity
    from sts.models.config import ModelConfig

    assert GenerationStats(new_tokens=0, prefill_tokens=1, time_s=2.0).summary()["tokens_per_s"] == 0
    assert GenerationStats(new_tokens=5, prefill_tokens=1, time_s=2.0).summary()["tokens_per_s"] == 2.0
    config = hf_config("llama", max_position_embeddings=2)
    with pytest.raises(STSError, match=r"prompt of 1 token \+ 1 new token \+ 1 row a round writes past them exceeds"):
        context_capacity([ModelConfig.from_hf(config)], [[5]], 1, 1)


def test_sparse_draft_keeps_output_lossless_and_changes_only_acceptance(tiny_pair):
    """A sparse draft proposes differently, but verification still makes the output the target's."""
    _, target, draft = tiny_pair
    prompts = [list(range(1, 80)), [5, 6, 7] * 30]
    ref = generate(target, prompts, 20).tokens
    dense_draft = speculative_generate(target, draft, prompts, 20, gamma=4)
    out = speculative_generate(target, draft, prompts, 20, gamma=4, draft_budget=12)
    assert out.tokens == ref
    assert out.stats.accepted_per_round != dense_draft.stats.accepted_per_round  # the draft really read less
    with pytest.raises(STSError, match="draft budget"):
        speculative_generate(target, draft, prompts, 4, draft_budget=3)


def interleaved_equals_solo(target, draft, policy=None, chunk: int = 16, **config) -> None:
    """Sequences admitted between rounds, their prefill chunk by chunk while others decode, each equal their solo run
    (``config``: more EngineConfig settings)."""
    from sts.engine import Engine, EngineConfig

    prompts = [list(range(1, 50)), [9, 8, 7] * 30, [(5 * i) % 90 + 1 for i in range(70)]]
    solo = [generate(target, [p], 24).tokens[0] for p in prompts]
    engine = Engine(target, draft, policy, slots=2, max_len=128,
                    config=EngineConfig(gamma=3, prefill_chunk=chunk, verify="sparse", **config))
    out: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    waiting = list(range(len(prompts)))
    jobs: dict[int, object] = {}
    while waiting or jobs or any(engine.host_active):
        for slot in engine.free_slots():
            if slot not in jobs and waiting:
                b = waiting.pop(0)
                owner[slot], out[b] = b, []
                jobs[slot] = engine.prefill_steps(slot, prompts[b])
        for slot, job in list(jobs.items()):  # one chunk per round for each prefilling slot
            first = next(job)
            if first is not None:
                out[owner[slot]].append(first)
                del jobs[slot]
        if any(engine.host_active):
            for slot, tokens in enumerate(engine.step()):
                if engine.host_active[slot]:
                    out[owner[slot]].extend(tokens)
                    if len(out[owner[slot]]) >= 24:
                        engine.release(slot)
    assert [out[b][:24] for b in range(len(prompts))] == solo


def test_continuous_batching_with_chunked_prefill_is_lossless(tiny_pair):
    _, target, draft = tiny_pair
    interleaved_equals_solo(target, draft)


def test_batch_with_early_stops_equals_each_sequence_alone(tiny_pair):
    """Issue 12's case: two sequences of one batch stop at different rounds; each equals transformers' own output."""
    hf, target, draft = tiny_pair
    prompts = [[5, 0], [5, 7], list(range(3, 40))]
    out = speculative_generate(target, draft, prompts, 200, gamma=4)
    for prompt, tokens in zip(prompts, out.tokens):
        ids = torch.tensor([prompt])  # an explicit mask: token 0 is a real token here, not padding
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=200, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        assert tokens == ref[0, len(prompt):].tolist()
    eos = out.tokens[1][7]  # sequence 1 stops after 8 tokens; the others run on (or stop where they emit it)
    early = speculative_generate(target, draft, prompts, 200, gamma=4, eos_ids=[eos])
    for full, cut in zip(out.tokens, early.tokens):
        assert cut == full[: full.index(eos) + 1] if eos in full else cut == full


def test_finished_sequences_read_nothing(tiny_pair):
    """A slot whose sequence stopped has no context: later rounds read none of its rows."""
    from sts.engine import Engine, EngineConfig

    _, target, draft = tiny_pair
    engine = Engine(target, draft, slots=2, max_len=300, config=EngineConfig(gamma=4))
    engine.prefill(0, list(range(1, 60)))
    engine.prefill(1, [5, 7])
    engine.step()
    engine.release(0)
    for _ in range(3):
        new = engine.step()
        assert new[0] == [] and new[1]
    assert int(engine.ctx[0]) == 0 and engine.host_ctx[0] == 0


class _Vocab:
    """A tokenizer's vocabulary as the pair check reads it (ids 0 .. n-1)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.n)}

    def __len__(self) -> int:
        return self.n


def test_pair_with_padded_embedding_tables_decodes_the_targets_greedy_output():
    """One tokenizer of 256 ids, a target table of 384 rows and a draft one of 256 (as Qwen2.5 0.5B -> 7B pads):
    the pair is accepted, no id past the tokenizer is proposed or emitted, and the output is the target's
    greedy decode over the tokenizer's ids (transformers with the padded ids suppressed)."""
    from sts.models.loading import build_model
    from sts.speculative import shared_vocab

    hf = hf_model(hf_config("llama", vocab=384, layers=2), seed=21)
    target = ours(hf)
    noisy = perturbed(target, 0.1, seed=22).state_dict()
    small = {k: (v[:256] if k in ("embed_tokens.weight", "lm_head.weight") else v) for k, v in noisy.items()}
    draft = build_model(ours(hf_model(hf_config("llama", vocab=256, layers=2))).config, small, torch.float32, "cpu")
    with pytest.raises(STSError, match="vocabulary"):
        shared_vocab(target, draft)  # without tokenizers the tables must match
    with pytest.raises(STSError, match="tokenizers differ"):
        shared_vocab(target, draft, _Vocab(256), _Vocab(255))
    vocab = shared_vocab(target, draft, _Vocab(256), _Vocab(256))
    assert vocab == 256
    prompts = [[1, 2, 3, 4], list(range(100, 160))]
    out = speculative_generate(target, draft, prompts, 40, gamma=4, vocab=vocab)
    for prompt, tokens in zip(prompts, out.tokens):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                          eos_token_id=None, suppress_tokens=list(range(256, 384)))
        assert tokens == ref[0, len(prompt):].tolist()
        assert max(tokens) < 256


def test_measure_recall_on_a_dense_method_reports_no_recall(tiny_pair):
    """Dense speculative decoding selects nothing: asking for recall changes nothing and reports none."""
    _, target, draft = tiny_pair
    plain = speculative_generate(target, draft, PROMPTS, 12, gamma=3)
    measured = speculative_generate(target, draft, PROMPTS, 12, gamma=3, measure_recall=True)
    assert measured.tokens == plain.tokens
    assert measured.stats.summary()["recall"] is None and measured.stats.summary()["sparsity"] is None
