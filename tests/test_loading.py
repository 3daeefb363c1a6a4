"""Loading checkpoints (directories, hub snapshots, GGUF files) against transformers' own models.

Each test builds a tiny random model in transformers, writes it the way users get it (``save_pretrained``,
a hub snapshot, a GGUF written as llama.cpp's converter writes one) and checks that sts loads what
transformers would: the same logits, the same end-of-generation ids, the same files, or a one-line
STSError naming the cause.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import hf_config, hf_model, perturbed
from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.loading import build_model, load_model
from sts.runner import LoadedModel, eos_ids, load, run_method

# ---------------------------------------------------------------- GGUF files, written as llama.cpp does


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Return the ``rope_freqs`` tensor ``[head_dim / 2]`` llama.cpp's ``convert_hf_to_gguf.py`` writes for llama3 RoPE.

    The converter's formula (per frequency: 1 above the high-frequency wavelength, ``factor`` below
    the low one, a smooth blend between). It reads the original context from the config's top
    level with a default of 8192; the tiny model keeps it in ``rope_parameters``, so it is read there.
    """
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Return a q/k projection in llama.cpp's interleaved-RoPE row order (its converter's ``permute``)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(hf, path: Path, arch: str, *, name: str = "tiny", tokenizer: str | None = "gpt2",
               eot: int | None = None, merges: tuple[str, ...] = ("a b", "c d")) -> Path:
    """Write a transformers model as an F32 GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` would.

    Metadata: the ``{arch}.*`` hyper-parameters transformers' GGUF loader maps, RoPE scaling as
    the converter writes it (``linear`` for Llama, ``yarn`` for Qwen2 as ``rope.scaling.*`` keys;
    ``llama3`` only as the ``rope_freqs.weight`` tensor). Tensors: GGUF names from ``gguf``'s own
    name map, Llama q/k rows permuted for llama.cpp's RoPE, no ``output.weight`` when tied.
    The smallest tokenizer transformers accepts: ``gpt2`` BPE over byte-level characters with three
    special tokens and two merges (``ab``, ``cd``), zero scores. ``tokenizer=None`` leaves the tokenizer out; any other
    string is written as ``tokenizer.ggml.model``; ``merges`` replaces the merges.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = hf.config
    rope = dict(cfg.rope_parameters)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if tokenizer is not None:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens = specials + list(bytes_to_unicode().values())[: cfg.vocab_size - len(specials) - 2] + ["ab", "cd"]
        writer.add_tokenizer_model(tokenizer)
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
        writer.add_token_scores([0.0] * len(tokens))
        # transformers 5.17 needs merges for Qwen2, and reads a one-element array as a scalar: two merges.
        writer.add_token_merges(list(merges))
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(2)
        if eot is not None:
            writer.add_eot_token_id(eot)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for key, value in hf.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        base, suffix = key.rsplit(".", 1)
        value = value.float()
        if arch == "llama" and base.endswith("self_attn.q_proj"):
            value = _permute(value, cfg.num_attention_heads)
        elif arch == "llama" and base.endswith("self_attn.k_proj"):
            value = _permute(value, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", value.numpy())
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny(family: str, rope: dict | None = None):
    """Return conftest's tiny config of a family, with other RoPE parameters when given."""
    from transformers import LlamaConfig

    if family == "llama" and rope is not None:  # conftest's Llama always has llama3 RoPE
        return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           rope_parameters=rope)
    return hf_config(family, **({"rope_parameters": rope} if rope else {}))


GGUF_CASES = {
    # Llama-3.x: llama3 scaling only as the rope_freqs tensor (conftest's Llama has it).
    "llama-llama3": ("llama", "llama", None),
    "llama-linear": ("llama", "llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "qwen2": ("qwen2", "qwen2", None),
    "qwen2-yarn": ("qwen2", "qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                      "rope_theta": 1000000.0}),
    # llama.cpp writes Mistral as "llama"; transformers tells it apart by the name.
    "mistral": ("mistral", "llama", None),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_matches_transformers_on_the_original_weights(case, tmp_path):
    """A GGUF of each family and RoPE scaling gives the logits of transformers on the original model."""
    family, arch, rope = GGUF_CASES[case]
    hf = hf_model(_tiny(family, rope), seed=21)
    path = write_gguf(hf, tmp_path / "model.gguf", arch, name="Mistral tiny" if family == "mistral" else "tiny")
    model, tokenizer = load_model(path)
    # transformers reads a llama-architecture GGUF as Mistral only when general.name is exactly
    # "mistral" (it tests list membership); as Llama it is the same network without a sliding window.
    assert model.config.model_type == ("llama" if family == "mistral" else family)
    tokens = torch.randint(0, 96, (2, 300), generator=torch.Generator().manual_seed(3))
    model.setup_cache(2, 300)
    with torch.no_grad():
        ref = hf(tokens).logits
        out = model(tokens, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    ids = tokenizer("hello_abcd")["input_ids"]
    assert tokenizer.decode(ids) == "hello_abcd" and ids[-2:] == [94, 95]  # "ab" and "cd" merged
    if rope is not None or family == "llama":
        # The test can fail: the same weights with the RoPE transformers' GGUF loader sees are far off.
        from transformers import AutoConfig

        plain = ModelConfig.from_hf(AutoConfig.from_pretrained(tmp_path, gguf_file="model.gguf"))
        unscaled = build_model(plain, hf.state_dict(), torch.float32, "cpu")
        unscaled.setup_cache(2, 300)
        with torch.no_grad():
            assert (unscaled(tokens, torch.zeros(2, dtype=torch.long)) - ref).abs().max() > 1e-3  # 10x the tolerance


def test_gguf_rope_freqs_are_divisors_of_the_inverse_frequencies(tmp_path):
    """llama.cpp divides each inverse frequency by its rope_freqs entry: the result is transformers' llama3."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_model(hf_config("llama"))
    model, _ = load_model(write_gguf(hf, tmp_path / "m.gguf", "llama"))
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, torch.device("cpu"))
    torch.testing.assert_close(model.inv_freq, reference.float(), atol=0, rtol=1e-6)
    factors = llama3_rope_factors(hf.config.rope_parameters, 16)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0  # all three branches are tested


def test_gguf_ends_generation_where_llama_cpp_does(tmp_path):
    """A GGUF keeps no generation config; llama.cpp ends generation on its eos, eot and eom ids and on
    tokens spelled like end markers (``<|endoftext|>``, ``<|im_end|>``, ...): so does sts."""
    hf = hf_model(hf_config("llama"), seed=9)
    prompt = [5, 17, 33, 8]
    free = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    k = next(i for i in range(3, 40) if free[i] not in free[:i] and free[i] > 2)
    eot = free[k]
    loaded = LoadedModel(*load_model(write_gguf(hf, tmp_path / "m.gguf", "llama", eot=eot)))
    assert loaded.tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert loaded.model.config.eos_token_ids == (0, 2, eot)  # <|endoftext|>, <|im_end|> (also eos), the eot id
    assert eos_ids(loaded) == (0, 2, eot)
    out = run_method("autoregressive", loaded, None, [prompt], 40).tokens[0]
    end = next(i for i, t in enumerate(free) if t in (0, 2, eot))
    assert out == free[: end + 1] and end <= k


def test_gguf_without_tokenizer_loads_without_one(tmp_path):
    hf = hf_model(hf_config("qwen2"))
    model, tokenizer = load_model(write_gguf(hf, tmp_path / "m.gguf", "qwen2", tokenizer=None))
    assert tokenizer is None and model.config.n_layers == 2


def test_gguf_with_a_broken_tokenizer_is_an_error(tmp_path):
    hf = hf_model(hf_config("qwen2"))
    path = write_gguf(hf, tmp_path / "m.gguf", "qwen2", merges=("x y", "p q"))  # "xy", "pq" are not tokens
    with pytest.raises(STSError, match=r"tokenizer of .*m\.gguf fails to load: \w+") as info:
        load_model(path)
    assert "\n" not in str(info.value) and info.value.__cause__ is not None


def test_gguf_of_another_architecture_is_refused_before_loading(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(STSError, match="holds a 'phi3' model; sts loads llama, qwen2, mistral"):
        load_model(tmp_path / "phi.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "phi.gguf").read_bytes()[:30])
    with pytest.raises(STSError, match="cannot load GGUF"):
        load_model(tmp_path / "cut.gguf")


def test_a_truncated_gguf_is_named_truncated(tmp_path):
    data = write_gguf(hf_model(hf_config("llama")), tmp_path / "m.gguf", "llama").read_bytes()
    for cut in (len(data) - 100, len(data) // 2):  # the last tensor, or half the tensors, past the end
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(STSError, match=f"cut.gguf: the file is truncated \\({cut} bytes: a tensor's data runs past"):
            load_model(tmp_path / "cut.gguf")
    # Cut in its header or metadata, the reader fails on empty or odd-sized arrays: named as ending early.
    for cut in (100, 1000):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(STSError, match=f"cut.gguf: the file ends early or is damaged \\({cut} bytes; "):
            load_model(tmp_path / "cut.gguf")


# ---------------------------------------------------------------- end of generation


def _save_with_generation_eos(tmp_path: Path, seed: int) -> tuple[Path, list[int], int, int]:
    """Return (checkpoint, prompt, eos, k): a tiny Llama whose greedy output's k-th token (first use) is
    the end token that only its generation_config.json names."""
    hf = hf_model(hf_config("llama", layers=2), seed=seed)
    prompt = [5, 17, 33, 8]
    free = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    k = next(i for i in range(4, 30) if free[i] not in free[:i])
    hf.config.eos_token_id = None
    hf.generation_config.eos_token_id = free[k]
    hf.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()).get("eos_token_id") is None
    assert json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())["eos_token_id"] == free[k]
    return tmp_path / "ckpt", prompt, free[k], k


def test_generation_config_eos_stops_where_transformers_stops(tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, prompt, eos, k = _save_with_generation_eos(tmp_path, seed=11)
    reference = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ref = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    ref = ref[0, len(prompt):].tolist()
    assert len(ref) == k + 1 and ref[-1] == eos  # transformers stops at the generation config's eos

    target = load(str(ckpt), torch.float32, "cpu")
    assert eos in eos_ids(target)
    assert run_method("autoregressive", target, None, [prompt], 30).tokens[0] == ref
    draft = LoadedModel(perturbed(target.model, 0.15, seed=1), None)
    assert run_method("speculative", target, draft, [prompt], 30, gamma=3).tokens[0] == ref


def test_eos_ids_union_config_generation_config_and_tokenizer(tmp_path):
    from transformers import GenerationConfig

    hf = hf_model(hf_config("qwen2"))
    hf.config.eos_token_id = 7
    hf.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[7, 9, 11]).save_pretrained(tmp_path)

    class Tokenizer:
        eos_token_id = 13

    model, _ = load_model(tmp_path)
    assert model.config.eos_token_ids == (7, 9, 11)
    assert eos_ids(LoadedModel(model, Tokenizer())) == (7, 9, 11, 13)
    (tmp_path / "generation_config.json").write_text("{ not json")
    with pytest.raises(STSError, match="cannot read .*generation_config.json"):
        load_model(tmp_path)


# ---------------------------------------------------------------- hub downloads


@pytest.fixture(scope="module")
def smollm2_tokenizer(sts_cache_dir):
    """Return SmolLM2's real tokenizer (a fast BPE tokenizer with a chat template), from the offline demo cache."""
    import os

    from transformers import AutoTokenizer

    from sts.models import demo

    os.environ.setdefault("STS_CACHE", str(sts_cache_dir))
    return AutoTokenizer.from_pretrained(demo.ensure_model(demo.SMOLLM2, progress=False))


def _transformers_files(tmp_path: Path, tokenizer) -> list[str]:
    """Return every file transformers writes for a checkpoint (model sharded and whole, tokenizer with
    several chat templates) and the tokenizer files it reads that this tokenizer does not write."""
    import transformers
    from transformers.tokenization_utils_base import ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    template = tokenizer.chat_template
    tokenizer.chat_template = {"default": template, "tool_use": template}
    try:
        tokenizer.save_pretrained(tmp_path / "whole")
    finally:
        tokenizer.chat_template = template
    written = {str(p.relative_to(d)) for d in (tmp_path / "whole", tmp_path / "sharded") for p in d.rglob("*") if p.is_file()}
    assert any(name.startswith("additional_chat_templates/") for name in written)
    read = {WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_INDEX_NAME, "chat_template.json", "tokenizer.tiktoken"}
    for cls in ("LlamaTokenizer", "Qwen2Tokenizer", "GPT2Tokenizer", "PreTrainedTokenizerFast"):
        read.update(getattr(getattr(transformers, cls), "vocab_files_names", {}).values())
    read.update({ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE})
    return sorted(written | read)


def test_hub_download_keeps_every_file_transformers_loads(tmp_path, monkeypatch, smollm2_tokenizer):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    files = _transformers_files(tmp_path / "saved", smollm2_tokenizer)
    assert {"chat_template.jinja", "generation_config.json", "tokenizer.json", "model.safetensors"} <= set(files)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tmp_path / "saved" / "whole", snapshot)
    calls: list[list[str]] = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, tokenizer = load_model("some-org/some-model")
    assert len(calls) == 1  # safetensors found: no second call for .bin files
    fetched = set(filter_repo_objects(files, allow_patterns=calls[0]))
    assert fetched == set(files) - {"pytorch_model.bin"}
    assert model.config.name == "some-org/some-model"
    assert tokenizer is not None and tokenizer.chat_template is not None


def test_hub_download_falls_back_to_bin_weights(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    hf = hf_model(hf_config("qwen2"))
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    calls: list[list[str]] = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load_model("some-org/bin-only")
    assert len(calls) == 2 and list(filter_repo_objects(["pytorch_model.bin"], allow_patterns=calls[1]))
    assert not list(filter_repo_objects(["pytorch_model.bin"], allow_patterns=calls[0]))
    model.setup_cache(1, 8)
    tokens = torch.arange(8).view(1, 8)
    torch.testing.assert_close(model(tokens, torch.zeros(1, dtype=torch.long)), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("error, says", [
    ("offline", "offline"),
    ("gated", "gated"),
    ("other", "PermissionError: disk full of secrets"),
])
def test_hub_failure_names_its_cause(monkeypatch, error, says):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    if error == "offline":  # what snapshot_download raises without network or with HF_HUB_OFFLINE=1
        cause = LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore text")
    elif error == "gated":  # an HTTP error: only the response's headers and request are read
        cause = GatedRepoError("Access to model x/y is restricted.\nmore text",
                               response=SimpleNamespace(headers={}, request=None))
    else:
        cause = PermissionError("disk full of secrets")

    def failing(repo_id, allow_patterns=None, **kwargs):
        raise cause

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(STSError, match="could not be fetched from the hub") as info:
        load_model("x/y")
    assert says in str(info.value) and "\n" not in str(info.value)
    assert info.value.__cause__ is cause
    assert str(cause).splitlines()[0] in str(info.value)


def test_hub_repository_without_config_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns=None, **kw: str(tmp_path))
    with pytest.raises(STSError, match="has no config.json.*GGUF"):
        load_model("someone/model-GGUF")


# ---------------------------------------------------------------- Qwen2 sliding-window flags


def test_qwen2_sliding_flags_where_no_layer_slides_decode_past_the_window(tmp_path):
    """use_sliding_window with max_window_layers = n_layers: no layer slides (transformers' layer_types)."""
    config = hf_config("qwen2", layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert config.layer_types == ["full_attention"] * 2
    hf = hf_model(config, seed=5)
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.sliding_window is None
    model.setup_cache(1, 64)
    tokens = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(4))
    pieces = [model(tokens[:, :20], torch.tensor([0]))]
    pieces += [model(tokens[:, p : p + 1], torch.tensor([p])) for p in range(20, 48)]  # decode past the window
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(pieces, dim=1), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_qwen2_explicit_layer_types_decide_sliding(tmp_path):
    config = hf_config("qwen2", layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=0,
                       layer_types=["full_attention", "full_attention"])
    hf_model(config).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.sliding_window is None
    model.setup_cache(1, 64)


def test_a_sliding_layer_refuses_runs_longer_than_its_window(tmp_path):
    """A layer that slides (max_window_layers < n_layers) limits runs to its window; within it, logits match."""
    config = hf_config("qwen2", layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    hf = hf_model(config, seed=6)
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.sliding_window == 16
    with pytest.raises(STSError, match="sliding window"):
        model.setup_cache(1, 17)
    model.setup_cache(1, 16)
    tokens = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, torch.tensor([0])), hf(tokens).logits, atol=1e-5, rtol=1e-5)
    mistral = hf_model(hf_config("mistral"))
    mistral.config.sliding_window = 16
    mistral.save_pretrained(tmp_path / "mistral")
    with pytest.raises(STSError, match="sliding window"):
        load_model(tmp_path / "mistral")[0].setup_cache(1, 17)


# ---------------------------------------------------------------- tokenizers


def test_checkpoint_without_tokenizer_files_has_no_tokenizer(tmp_path):
    hf_model(hf_config("llama")).save_pretrained(tmp_path)
    assert load_model(tmp_path)[1] is None


def test_tokenizer_files_that_fail_to_load_are_an_error(tmp_path, smollm2_tokenizer):
    hf_model(hf_config("llama", vocab=len(smollm2_tokenizer))).save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    assert load_model(tmp_path)[1].encode("hello") == smollm2_tokenizer.encode("hello")
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(STSError, match="tokenizer of .* fails to load: ") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value) and info.value.__cause__ is not None


# ---------------------------------------------------------------- broken checkpoints


def test_corrupt_or_unsupported_config_is_an_error(tmp_path):
    hf_model(hf_config("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(STSError, match="cannot read .*config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(STSError, match="unsupported model type 'gpt2'"):
        load_model(tmp_path)


def test_weights_that_disagree_with_the_config_are_an_error(tmp_path):
    hf_model(hf_config("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(STSError, match=r"weight layers\.0\.mlp\.\w+\.weight of .* has shape"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    with pytest.raises(STSError, match=r"has shape|inconsistent"):
        load_model(tmp_path)


def test_safetensors_index_naming_a_missing_shard_is_an_error(tmp_path):
    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    model, _ = load_model(tmp_path)  # the complete set loads and equals transformers
    model.setup_cache(1, 8)
    tokens = torch.arange(8).view(1, 8)
    torch.testing.assert_close(model(tokens, torch.zeros(1, dtype=torch.long)), hf(tokens).logits, atol=1e-5, rtol=1e-5)
    shards[1].unlink()
    with pytest.raises(STSError, match=f"names 1 shard.* missing .*{shards[1].name}"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(STSError, match="cannot read the weight index"):
        load_model(tmp_path)


def test_the_cli_says_a_gguf_is_dequantized_before_the_slow_load(tmp_path, capsys):
    """sts generate on a GGUF: one line on stderr before transformers dequantizes it (minutes for real models)."""
    from sts.cli import main

    path = write_gguf(hf_model(hf_config("llama")), tmp_path / "m.gguf", "llama", tokenizer=None)
    assert main(["generate", "--target", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                 "--method", "autoregressive"]) == 0
    err = capsys.readouterr().err
    assert f"[sts] loading {path}: a GGUF is dequantized on every load" in err, err
