"""The engine's logits against transformers' own models on the same weights."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, hf_config, hf_model, ours
from sts.errors import STSError
from sts.models.loading import load_model, source_kind


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    hf = hf_model(hf_config(family))
    model = ours(hf)
    model.setup_cache(2, 64)
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = hf(tokens).logits
    out = model(tokens, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_match_one_pass(family):
    hf = hf_model(hf_config(family), seed=3)
    model = ours(hf)
    model.setup_cache(1, 64)
    tokens = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = hf(tokens).logits
    pieces, pos = [], 0
    for size in (11, 7, 1, 1, 10):  # prefill chunks, then one-token decode steps, then a verify-sized block
        pieces.append(model(tokens[:, pos : pos + size], torch.tensor([pos])))
        pos += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_batch_of_different_lengths_matches_each_alone():
    hf = hf_model(hf_config("qwen2"), seed=4)
    model = ours(hf)
    model.setup_cache(3, 64)
    start = torch.tensor([15, 3, 11])  # three sequences at different cache lengths
    prefix = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(9))
    model(prefix, torch.zeros(3, dtype=torch.long))  # rows 0..19 for everyone
    new = torch.randint(0, 96, (3, 4), generator=torch.Generator().manual_seed(10))
    out = model(new, start)  # each sequence continues after its own length
    for b in range(3):
        ctx = torch.cat([prefix[b, : start[b]], new[b]]).unsqueeze(0)
        ref = hf(ctx).logits[0, -4:]
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp32():
    hf = hf_model(hf_config("llama"), seed=5)
    model32, model16 = ours(hf), ours(hf, torch.bfloat16)
    for m in (model32, model16):
        m.setup_cache(1, 32)
    tokens = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(6))
    a = model32(tokens, torch.zeros(1, dtype=torch.long))
    b = model16(tokens, torch.zeros(1, dtype=torch.long))
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_load_from_checkpoint_directory(tmp_path):
    hf = hf_model(hf_config("mistral"), seed=7)
    hf.save_pretrained(tmp_path / "ckpt")
    model, tokenizer = load_model(tmp_path / "ckpt")
    assert tokenizer is None
    model.setup_cache(1, 16)
    tokens = torch.arange(10).view(1, 10)
    torch.testing.assert_close(model(tokens, torch.zeros(1, dtype=torch.long)), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_a_missing_draft_path_fails_before_the_target_loads(tmp_path, monkeypatch):
    from sts import runner

    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path / "target")
    loaded = []
    monkeypatch.setattr(runner, "load", lambda source, *args: loaded.append(source))
    for draft, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "target" / "config.json", "not a .gguf")):
        with pytest.raises(STSError, match=message):
            runner.load_pair(str(tmp_path / "target"), str(draft), torch.float32, "cpu")
    assert loaded == []
    assert [source_kind(s) for s in (tmp_path / "target", "owner/name")] == ["directory", "hub"]


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(STSError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(STSError, match="not a model directory"):
        load_model(tmp_path)
    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path / "ckpt")
    weights = next((tmp_path / "ckpt").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(STSError, match="cannot read the weights"):
        load_model(tmp_path / "ckpt")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(STSError, match="cannot load GGUF"):
        load_model(tmp_path / "bad.gguf")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(STSError, match="could not be fetched"):
        load_model("no-such-org/no-such-model-sts-test")


def test_context_overflow_is_refused():
    model = ours(hf_model(hf_config("llama")))
    with pytest.raises(STSError, match="exceed the context"):
        model.setup_cache(1, 5000)


@pytest.mark.slow
def test_real_gguf_model_matches_transformers(sts_cache_dir, monkeypatch):
    """SmolLM2-135M from its GGUF file: our logits and greedy output equal transformers' on real text."""
    from transformers import AutoModelForCausalLM

    from sts.engine import generate
    from sts.models import demo

    monkeypatch.setenv("STS_CACHE", str(sts_cache_dir))
    gguf = demo.fetch_gguf(demo.SMOLLM2, progress=False)
    model, tokenizer = load_model(gguf)
    reference = AutoModelForCausalLM.from_pretrained(demo.ensure_model(demo.SMOLLM2, progress=False), dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three prime numbers."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([prompt])
    model.setup_cache(1, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.zeros(1, dtype=torch.long)), reference(ids).logits, atol=2e-4, rtol=1e-4)
    ours_out = generate(model, [prompt], 16).tokens[0]
    ref_out = reference.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert ours_out == ref_out.tolist()
