"""Tiny random models of each family, built by transformers (the reference) and loaded into sts."""

from __future__ import annotations

import http.client
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sts.models.config import ModelConfig
from sts.models.loading import build_model
from sts.models.transformer import Transformer

FAMILIES = ("llama", "qwen2", "mistral")


def hf_config(family: str, vocab: int = 96, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, **extra):
    """Return a tiny transformers config of a family (Llama with Llama-3 RoPE scaling, tied Qwen2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=extra.pop("max_position_embeddings", 1024))
    if family == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128, "rope_theta": 500000.0}
        return LlamaConfig(**common, rope_parameters=rope, **extra)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, **extra)
    return MistralConfig(**common, sliding_window=None, **extra)


def hf_model(config, seed: int = 0):
    """Return a transformers causal LM with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def ours(hf, dtype: torch.dtype = torch.float32) -> Transformer:
    """Return our model holding the same weights as a transformers model."""
    return build_model(ModelConfig.from_hf(hf.config), hf.state_dict(), dtype, "cpu")


def perturbed(model: Transformer, scale: float, seed: int) -> Transformer:
    """Return a copy of ``model`` with Gaussian noise on every weight: a draft that agrees often, not always."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) * v.std() for k, v in model.state_dict().items()}
    return build_model(model.config, state, torch.float32, "cpu")


def read_weights(model: Transformer) -> int:
    """Return the bytes of a model's weights a forward reads, from its tensors: every parameter (a tied table is one)
    and row-parallel bias (a buffer under tensor parallelism), less an untied embedding table."""
    tensors = [*model.parameters(), *(b for name, b in model.named_buffers() if name.endswith("reduced_bias"))]
    table = 0 if model.config.tie_word_embeddings else model.embed_tokens.weight.numel()
    return sum(t.numel() * t.element_size() for t in tensors) - table * model.embed_tokens.weight.element_size()


@pytest.fixture(scope="session")
def tiny_pair():
    """Return (hf target, our target, our draft): a 3-layer Llama target and a noisy copy as draft."""
    hf = hf_model(hf_config("llama", layers=3), seed=0)
    target = ours(hf)
    return hf, target, perturbed(target, 0.15, seed=1)


@pytest.fixture(scope="session")
def sts_cache_dir(tmp_path_factory) -> Path:
    """Return the cache directory for real-weight tests: $STS_CACHE if set (CI reuses it), else a temp dir."""
    return Path(os.environ.get("STS_CACHE") or tmp_path_factory.mktemp("sts-cache"))


def wait_until_serving(proc: subprocess.Popen, port: int, log: Path, seconds: float, what: str = "sts serve") -> None:
    """Return once the server process ``proc`` answers GET /health on ``port`` with 200; fail the test (with the
    server's log) if it exits first or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.3)
