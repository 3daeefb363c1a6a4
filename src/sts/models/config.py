"""Model configuration: the few numbers our transformer needs, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sts.errors import STSError

#: Families we implement, keyed by the HF ``model_type``.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def token_ids(value: Any) -> tuple[int, ...]:
    """Return a config's token-id field (an int, a list of ints or None) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value if v is not None)
    return (int(value),)


def sliding_window(hf_config: Any) -> int | None:
    """Return the window of a config's sliding-window layers, or None when no layer slides.

    Follows transformers: Mistral slides in every layer whenever ``sliding_window`` is set;
    Qwen2 slides in the layers whose ``layer_types`` entry is ``sliding_attention`` (derived,
    when absent, from ``use_sliding_window`` and ``max_window_layers``: layers at or past
    ``max_window_layers`` slide), and only when ``use_sliding_window`` is on; Llama never slides.
    """
    model_type = getattr(hf_config, "model_type", None)
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return None
    if model_type == "mistral":
        return int(window)
    if model_type != "qwen2" or not getattr(hf_config, "use_sliding_window", False):
        return None
    n_layers = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        first_sliding = getattr(hf_config, "max_window_layers", n_layers)
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(n_layers)]
    return int(window) if "sliding_attention" in layer_types else None


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
    #: Window of the layers that attend to a sliding window; None when no layer slides.
    sliding_window: int | None
    #: Every token id that ends a generation (config.json, generation_config.json or GGUF metadata).
    eos_token_ids: tuple[int, ...]
    name: str = ""
    #: The HF config, kept to compute RoPE frequencies for every scaling type transformers knows.
    hf_config: Any = field(default=None, compare=False, repr=False)
    #: Per-frequency divisors ``[head_dim / 2]`` applied on top of the config's RoPE (a GGUF's
    #: ``rope_freqs`` tensor, the only place a Llama-3.x GGUF keeps its ``llama3`` scaling).
    rope_freq_divisors: tuple[float, ...] | None = None
    #: (rank, world size) under tensor parallelism: this model holds the rank-th of ``world`` equal
    #: parts of every layer's heads and feed-forward width, and ``n_heads``, ``n_kv_heads`` and
    #: ``intermediate_size`` are that part's (:mod:`sts.parallel`); (0, 1) for a whole model.
    shard: tuple[int, int] = (0, 1)

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
            sliding_window=sliding_window(hf_config),
            eos_token_ids=token_ids(getattr(hf_config, "eos_token_id", None)),
            name=name or getattr(hf_config, "_name_or_path", "") or model_type,
            hf_config=hf_config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Return (inverse frequencies ``[head_dim / 2]``, attention scaling) for this model's RoPE."""
        # Always computed on the CPU in float32, even while the model is built on the meta device.
        with torch.device("cpu"):
            return self._rope_inv_freq()

    def _rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        inv_freq, scaling = self._config_rope()
        if self.rope_freq_divisors is not None:
            divisors = torch.tensor(self.rope_freq_divisors, dtype=torch.float32)
            if divisors.shape != inv_freq.shape:
                raise STSError(
                    f"{self.name}: {divisors.numel()} RoPE frequency factors for {inv_freq.numel()} frequencies"
                )
            inv_freq = inv_freq / divisors
        return inv_freq, scaling

    def _config_rope(self) -> tuple[torch.Tensor, float]:
        """Return (inverse frequencies, attention scaling) as the HF config's RoPE parameters define them."""
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
