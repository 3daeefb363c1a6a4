"""STS's ``key_bits=8``: the score pass reads an 8-bit copy of the draft's keys, centred on each prompt's mean key."""

from __future__ import annotations

import math

import pytest
import torch

from sts.costmodel import RoundModel, selection_reads
from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.models import transformer
from sts.selection import SelectionConfig, make_policy
from sts.selection.sts import STSPolicy

from test_generation import interleaved_equals_solo

FP8 = torch.float8_e4m3fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def brute_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Return ``[N]``: the max over one sequence's queries ``q`` ``[Hq, G, D]`` and heads of each query's softmax over
    ``keys`` ``[Hkv, N, D]`` (8-bit keys: the queries rounded to float8 too, as the policy's score pass does)."""
    hq, g, d = q.shape
    if keys.dtype == FP8:
        q = q.to(FP8)
    grouped = q.double().reshape(keys.shape[0], hq // keys.shape[0] * g, d)
    return (grouped @ keys.double().transpose(1, 2) / math.sqrt(d)).softmax(-1).amax(1).amax(0)


def test_the_copy_is_the_centred_keys_and_the_scores_read_it(tiny_pair, monkeypatch):
    """Round by round, with a second sequence admitted mid-way: each scored draft layer's copy holds float8(K - mean)
    of every context row, the mean is its prompt's mean key, and the score rows are the softmax of the round's queries
    over those 8-bit keys, the queries rounded alike (not over the 16-bit ones, from which they measurably differ)."""
    _, target, draft = tiny_pair
    monkeypatch.setattr(transformer, "CENTRE_ROWS", 32)  # the prompts' means and copies in several slices of rows
    policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft, key_bits=8)
    engine = Engine(target, draft, policy, slots=2, max_len=200,
                    config=EngineConfig(gamma=3, draft_budget=20, draft_selection="scored-all", verify="sparse"))
    layers = policy.draft_layers(draft)
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = STSPolicy.score_sources

    def recorded(self, layer, queries, keys, start_pos):
        rows = original(self, layer, queries, keys, start_pos)
        seen.append((layer, queries.clone(), start_pos.clone(), rows[0].clone()))
        return rows

    monkeypatch.setattr(STSPolicy, "score_sources", recorded)
    prompts = {0: [(7 * i) % 90 + 1 for i in range(120)], 1: [(3 * i) % 80 + 2 for i in range(90)]}
    means: dict[tuple[int, int], torch.Tensor] = {}  # (slot, layer) -> its prompt's mean key once prefilled

    def prefill(slot: int) -> None:
        engine.prefill(slot, prompts[slot])
        for layer in layers:  # the prompt's rows but the last (a round between prefill chunks may write that one)
            means[slot, layer] = draft.layers[layer].self_attn.cache.k[slot, :, : len(prompts[slot]) - 1].float().mean(1)

    prefill(0)
    apart = 0.0
    for r in range(6):
        if r == 2:
            prefill(1)
        seen.clear()
        engine.step()
        assert [layer for layer, *_ in seen] == list(layers)
        for layer, queries, start_pos, rows in seen:
            cache = draft.layers[layer].self_attn.cache
            for b in (s for s in range(2) if engine.host_active[s]):
                n = int(start_pos[b])
                keys = cache.k[b, :, :n].float()
                # Fixed when the prompt was read (the rounds rewrite the prompt's last row through the sparse draft).
                assert torch.allclose(cache.key_mean[b], means[b, layer], rtol=0, atol=1e-6)
                want = (keys - cache.key_mean[b][:, None]).to(FP8)
                assert torch.equal(cache.score_keys[b, :, :n].view(torch.uint8), want.view(torch.uint8))
                assert _rel(rows[b, :n], brute_scores(queries[b], want)) < 1e-5
                apart = max(apart, _rel(rows[b, :n], brute_scores(queries[b], keys)))
    assert apart > 1e-3, "8-bit and 16-bit keys scored alike: the test cannot tell which the policy read"
    # A later engine over the same draft without the option drops the copy (its score pass reads the 16-bit keys).
    plain = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft)
    Engine(target, draft, plain, slots=2, max_len=200)
    assert all(block.self_attn.cache.score_keys is None for block in draft.layers)


def test_continuous_batching_with_eight_bit_keys_is_lossless(tiny_pair):
    """Sequences admitted between rounds and prefilled chunk by chunk beside decoding ones decode the target's greedy
    tokens (a budget covering the context: the 8-bit scores choose only the sparse draft's rows)."""
    _, target, draft = tiny_pair
    policy = make_policy("sts", SelectionConfig(budget=256, sink=4, window=8), target, draft, key_bits=8)
    interleaved_equals_solo(target, draft, policy, draft_budget=24, draft_selection="scored-all")


def test_eight_bit_keys_decode_alike_alone_and_prefilled_beside_a_decoding_sequence(tiny_pair):
    """At a budget that selects, a sequence prefilled chunk by chunk while another decodes (rounds between its chunks)
    decodes the tokens it decodes alone: its mean key, hence its 8-bit keys and rankings, are the same."""
    _, target, draft = tiny_pair
    long, other = [(7 * i) % 90 + 1 for i in range(120)], [(3 * i) % 80 + 2 for i in range(40)]

    def engine() -> Engine:
        policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft, key_bits=8)
        return Engine(target, draft, policy, slots=2, max_len=200, config=EngineConfig(
            gamma=3, draft_budget=20, draft_selection="scored-all", verify="sparse", prefill_chunk=16))

    def means(slot: int) -> list[torch.Tensor]:
        return [block.self_attn.cache.key_mean[slot].clone() for block in draft.layers]

    alone = engine()
    tokens = [alone.prefill(0, long)]
    mean = means(0)
    while len(tokens) < 30:
        tokens += alone.step()[0]
    beside = engine()
    beside.prefill(0, other)
    rounds, got = 0, []
    for first in beside.prefill_steps(1, long):
        if first is None:
            beside.step()
            rounds += 1
        else:
            got.append(first)
    assert all(torch.equal(a, b) for a, b in zip(means(1), mean))
    while len(got) < 30:
        got += beside.step()[1]
    assert rounds == 2 * math.ceil(120 / 16)  # a round after every chunk of the draft and of the target
    assert got[:30] == tokens[:30]


def test_the_cost_model_counts_the_score_pass_at_one_byte_a_key(tiny_pair):
    """The modelled context row of a sparse round shrinks by exactly one byte per K element of each scored layer."""
    _, target, draft = tiny_pair
    models = []
    for bits in (16, 8):
        policy = make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft, key_bits=bits)
        models.append(RoundModel.build(target.config, draft.config, selection_reads(policy, target, draft), 2))
    scored = len(make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft).draft_layers(draft))
    cfg = draft.config
    assert models[0].context_row - models[1].context_row == scored * cfg.n_kv_heads * cfg.head_dim


def test_key_bits_other_than_8_and_16_are_refused(tiny_pair):
    _, target, draft = tiny_pair
    with pytest.raises(STSError, match="key_bits must be 8 or 16, got 4"):
        make_policy("sts", SelectionConfig(budget=48, sink=4, window=8), target, draft, key_bits=4)
