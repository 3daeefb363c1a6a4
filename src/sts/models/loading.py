"""Load a :class:`Transformer` (and its tokenizer) from an HF checkpoint directory, a hub id or a GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer, fuse_projections

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a name such as ``bf16`` or ``float32``."""
    if name not in DTYPES:
        raise STSError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def build_model(config: ModelConfig, state_dict: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """Return a model of ``config`` holding the given HF-named weights, cast to ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = Transformer(config)
    weights = fuse_projections({k.removeprefix("model."): v for k, v in state_dict.items()})
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - weights.keys())
    if missing:
        raise STSError(f"checkpoint of {config.name} lacks {len(missing)} weights, e.g. {missing[0]}")
    weights = {k: weights[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = config.rope_inv_freq()[0].to(device)
    return model.eval().requires_grad_(False)


def _read_safetensors(directory: Path) -> dict[str, Tensor]:
    """Return every tensor of the checkpoint's safetensors (single file or shards) or PyTorch bin files."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    try:
        if files:
            out: dict[str, Tensor] = {}
            for f in files:
                out.update(load_file(str(f)))
            return out
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if bins:
            out = {}
            for f in bins:
                out.update(torch.load(f, map_location="cpu", weights_only=True))
            return out
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        raise STSError(f"cannot read the weights in {directory}: {exc}".splitlines()[0]) from exc
    raise STSError(f"{directory} has a config.json but no *.safetensors or pytorch_model*.bin weights")


def _load_tokenizer(source: Path, **kwargs: Any):
    """Return the HF tokenizer stored with a checkpoint, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), **kwargs)
    except Exception as exc:  # a checkpoint without tokenizer files is legal: use --prompt-ids then
        log.info("no tokenizer loaded from %s (%s)", source, exc)
        return None


def _load_directory(directory: Path, dtype: torch.dtype, device) -> tuple[Transformer, Any]:
    """Return (model, tokenizer) from an HF checkpoint directory."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise STSError(f"{directory} is not a model directory (no config.json)")
    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise STSError(f"cannot read {directory / 'config.json'}: {exc}".splitlines()[0]) from exc
    config = ModelConfig.from_hf(hf_config, name=_model_name(directory, hf_config))
    model = build_model(config, _read_safetensors(directory), dtype, device)
    return model, _load_tokenizer(directory)


def _model_name(directory: Path, hf_config: Any) -> str:
    """Return a stable model name: the checkpoint's recorded name, else its directory name."""
    recorded = getattr(hf_config, "_name_or_path", "") or ""
    return recorded if recorded and not Path(recorded).is_absolute() else directory.name


def _load_gguf(path: Path, dtype: torch.dtype, device) -> tuple[Transformer, Any]:
    """Return (model, tokenizer) from a GGUF file, dequantised by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise STSError(f"cannot load GGUF {path}: {exc}".splitlines()[0]) from exc
    config = ModelConfig.from_hf(hf_config, name=path.stem)
    model = build_model(config, hf_model.state_dict(), dtype, device)
    return model, _load_tokenizer(path.parent, gguf_file=path.name)


def _download(repo_id: str) -> Path:
    """Return a local snapshot of a hub checkpoint; offline (or unknown id) is a clear error."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise STSError(f"{repo_id!r} is not a local path and could not be fetched from the hub ({type(exc).__name__})") from exc


def load_model(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Transformer, Any]:
    """Return (model, tokenizer or None) from a checkpoint directory, a ``.gguf`` file or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise STSError(f"{path} is a file but not a .gguf model")
        return _load_gguf(path, dtype, device)
    if path.is_dir():
        return _load_directory(path, dtype, device)
    looks_like_id = isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_id:
        return _load_directory(_download(source), dtype, device)
    raise STSError(f"model path {source} does not exist")
