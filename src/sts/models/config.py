"""Model configuration: the few numbers our transformer needs, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sts.errors import STSError

#: Families we implement, keyed by the HF ``model_type``.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer of the Llama / Qwen2 / Mistral family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    name: str = ""
    #: The HF config, kept to compute RoPE frequencies for every scaling type transformers knows.
    hf_config: Any = field(default=None, compare=False, repr=False)

    @property
    def group_size(self) -> int:
        """Return how many query heads share one KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf_config: Any, name: str = "") -> "ModelConfig":
        """Return our config for a transformers ``PretrainedConfig``; unsupported families are an error."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise STSError(
                f"unsupported model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        n_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        bias = bool(getattr(hf_config, "attention_bias", False))
        sliding = None
        if model_type == "mistral" or getattr(hf_config, "use_sliding_window", False):
            sliding = getattr(hf_config, "sliding_window", None)
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            n_layers=hf_config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=hf_config.rms_norm_eps,
            # Qwen2 always has q/k/v biases and no o bias; Llama's flag covers all four.
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            name=name or getattr(hf_config, "_name_or_path", "") or model_type,
            hf_config=hf_config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Return (inverse frequencies ``[head_dim / 2]``, attention scaling) for this model's RoPE."""
        # Always computed on the CPU in float32, even while the model is built on the meta device.
        with torch.device("cpu"):
            return self._rope_inv_freq()

    def _rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = float(params.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0)))
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            return 1.0 / (theta**exponent), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise STSError(f"unsupported RoPE type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)

    def identity(self) -> dict[str, Any]:
        """Return what identifies this architecture in files made for it (e.g. a head mapping)."""
        return {
            "name": self.name,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }
