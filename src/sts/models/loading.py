"""Load a :class:`Transformer` (and its tokenizer) from an HF checkpoint directory, a hub id or a GGUF file.

Whatever the source, the result must equal transformers' model on the original (safetensors)
checkpoint: same weights, same RoPE, same end-of-generation ids. Where transformers' own GGUF
loader drops something that llama.cpp keeps (the ``rope_freqs`` tensor of Llama-3.x files,
``rope.scaling.*`` metadata, end-of-turn ids), it is read here from the GGUF itself.
Every failure a user can cause (a missing or corrupt file, an unsupported architecture, an
offline hub) is an :class:`~sts.errors.STSError` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from sts.errors import STSError
from sts.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, token_ids
from sts.models.transformer import Transformer, fuse_projections

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

#: Files whose presence means a checkpoint ships a tokenizer (fast, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model")

#: What a hub download fetches besides the weights: configs (model, generation, tokenizer, chat
#: template, weight index), tokenizer files (SentencePiece ``*.model``, BPE ``vocab.json`` +
#: ``merges.txt``, ``*.tiktoken``) and chat templates (``chat_template.jinja`` and
#: ``additional_chat_templates/*.jinja``, where transformers 5 saves them).
HUB_FILES = ("*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt")
#: Weights as transformers names them (single file or the shards an index lists); PyTorch
#: ``.bin`` files are fetched only for repositories without safetensors.
HUB_SAFETENSORS = ("model*.safetensors",)
HUB_BINS = ("pytorch_model*.bin",)

#: Weight formats in the order transformers prefers them: (index file, single file, any-name glob, kind).
_WEIGHT_FORMATS = (
    ("model.safetensors.index.json", "model.safetensors", "*.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin", "bin"),
)


def parse_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a name such as ``bf16`` or ``float32``."""
    if name not in DTYPES:
        raise STSError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """Return an exception's message on one line (whitespace collapsed, at most ``limit`` characters)."""
    # Library messages often put the reason on a later line ("... one of:\n(1) ..."), so keep them all.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cause(exc: BaseException) -> str:
    """Return an exception as one line: its type and its message."""
    return f"{type(exc).__name__}: {_one_line(exc)}"


def build_model(config: ModelConfig, state_dict: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """Return a model of ``config`` holding the given HF-named weights, cast to ``dtype`` on ``device``.

    Raises STSError when a weight is missing or its shape disagrees with the config.
    """
    with torch.device("meta"):
        model = Transformer(config)
    try:
        weights = fuse_projections({k.removeprefix("model."): v for k, v in state_dict.items()})
    except RuntimeError as exc:  # q/k/v or gate/up of different widths cannot be concatenated
        raise STSError(f"checkpoint of {config.name} has inconsistent projection shapes: {_cause(exc)}") from exc
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k for k in shapes if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - weights.keys())
    if missing:
        raise STSError(f"checkpoint of {config.name} lacks {len(missing)} weights, e.g. {missing[0]}")
    for k in sorted(expected):
        if weights[k].shape != shapes[k]:
            raise STSError(
                f"weight {k} of {config.name} has shape {tuple(weights[k].shape)}, "
                f"but its config implies {tuple(shapes[k])}"
            )
    weights = {k: weights[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = config.rope_inv_freq()[0].to(device)
    return model.eval().requires_grad_(False)


class Partition(Protocol):
    """The part of a model this process holds: :class:`sts.parallel.Shard` under tensor parallelism.

    Given one, :func:`load_model` reads only the part of each weight it names (a safetensors
    slice read lazily, so no process reads the whole checkpoint) and builds the model from them.
    """

    def take(self, config: ModelConfig, name: str, tensor: Any) -> Tensor:
        """Return this part of checkpoint weight ``name`` of a ``config`` model (``tensor``: a Tensor or a safetensors slice)."""
        ...

    def build(self, config: ModelConfig, weights: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device) -> Transformer:
        """Return the model part of a ``config`` model holding ``weights``, the parts :meth:`take` returned."""
        ...


#: Returns the part of a named checkpoint weight (a Tensor or a safetensors slice) that a process keeps.
Take = Callable[[str, Any], Tensor]


def _index_shards(index: Path) -> list[Path]:
    """Return the shard files a weight index (``*.index.json``) names; a missing shard is an error."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise STSError(f"cannot read the weight index {index}: {_cause(exc)}") from exc
    shards = [index.parent / name for name in names]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise STSError(
            f"{index.name} names {len(absent)} shard(s) missing from {index.parent}, e.g. {absent[0]} "
            "(an incomplete download?)"
        )
    return shards


def _read_weights(directory: Path, take: Take | None = None) -> dict[str, Tensor]:
    """Return every tensor of the checkpoint's weights: safetensors, else PyTorch ``.bin`` files.

    Follows the weight index when there is one (as transformers does), else the single
    ``model.safetensors`` / ``pytorch_model.bin``, else every file of that format in the directory.
    With ``take``, each tensor is what ``take(name, tensor)`` keeps of it (from safetensors, only
    that part is read).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    for index_name, single, pattern, kind in _WEIGHT_FORMATS:
        if (directory / index_name).is_file():
            files = _index_shards(directory / index_name)
        elif (directory / single).is_file():
            files = [directory / single]
        else:
            files = sorted(directory.glob(pattern))
        if not files:
            continue
        out: dict[str, Tensor] = {}
        for f in files:
            try:
                if kind == "safetensors" and take is not None:
                    with safe_open(str(f), "pt") as handle:
                        out.update({name: take(name, handle.get_slice(name)) for name in handle.keys()})
                elif kind == "safetensors":
                    out.update(load_file(str(f)))
                else:
                    state = torch.load(f, map_location="cpu", weights_only=True)
                    out.update(state if take is None else {name: take(name, t) for name, t in state.items()})
            except STSError:  # ``take``'s own (a model that does not split over the tensor-parallel ranks)
                raise
            except Exception as exc:  # corrupt or truncated files surface as many exception types
                raise STSError(f"cannot read the weights in {f}: {_cause(exc)}") from exc
        return out
    raise STSError(f"{directory} has a config.json but no *.safetensors or pytorch_model*.bin weights")


def has_tokenizer_files(directory: Path) -> bool:
    """Return whether a checkpoint directory ships tokenizer files (see :data:`TOKENIZER_FILES`)."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES) or any(directory.glob("*.tiktoken"))


def _load_tokenizer(source: Path, **kwargs: Any) -> Any:
    """Return the HF tokenizer stored at ``source`` (a directory; ``gguf_file=`` for a GGUF in it).

    Call it only for a checkpoint that has a tokenizer: files that fail to load raise STSError
    naming the cause (a checkpoint *without* a tokenizer is legal and never gets here).
    """
    from transformers import AutoTokenizer

    where = source / kwargs["gguf_file"] if "gguf_file" in kwargs else source
    try:
        return AutoTokenizer.from_pretrained(str(source), **kwargs)
    except Exception as exc:  # tokenizers fail in many ways: bad JSON, missing sentencepiece, unknown class
        raise STSError(f"the tokenizer of {where} fails to load: {_cause(exc)}") from exc


def _generation_eos(directory: Path) -> tuple[int, ...]:
    """Return the end-of-generation ids of ``directory/generation_config.json`` (empty when there is none).

    Llama-3 and Qwen2.5 instruct checkpoints list their end-of-turn ids only there.
    """
    from transformers import GenerationConfig

    if not (directory / "generation_config.json").is_file():
        return ()
    try:
        generation = GenerationConfig.from_pretrained(str(directory))
    except Exception as exc:  # a corrupt file would silently lose the end-of-turn ids: refuse it
        raise STSError(f"cannot read {directory / 'generation_config.json'}: {_cause(exc)}") from exc
    return token_ids(generation.eos_token_id)


def _with_eos(config: ModelConfig, *extra: tuple[int, ...]) -> ModelConfig:
    """Return ``config`` ending generations at its own eos ids and every id in ``extra``."""
    ids = set(config.eos_token_ids)
    for more in extra:
        ids.update(more)
    return dataclasses.replace(config, eos_token_ids=tuple(sorted(ids)))


def _model_config(hf_config: Any, name: str, source: Path) -> ModelConfig:
    """Return our config for a transformers config read from ``source``; nonsense in it is an STSError."""
    try:
        return ModelConfig.from_hf(hf_config, name=name)
    except STSError as exc:
        raise STSError(f"{source}: {exc}") from exc
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise STSError(f"{source} has an unusable model config: {_cause(exc)}") from exc


def _build(config: ModelConfig, weights: dict[str, Tensor], dtype: torch.dtype, device, partition: Partition | None) -> Transformer:
    """Return the model (or, with ``partition``, its part) holding ``weights``."""
    return (partition.build if partition is not None else build_model)(config, weights, dtype, device)


def _load_directory(
    directory: Path, dtype: torch.dtype, device, name: str | None = None, partition: Partition | None = None,
) -> tuple[Transformer, Any]:
    """Return (model or its ``partition``, tokenizer or None) from an HF checkpoint directory; ``name`` overrides
    the model name."""
    config = _directory_config(directory, name)
    take = (lambda key, tensor: partition.take(config, key, tensor)) if partition is not None else None
    model = _build(config, _read_weights(directory, take), dtype, device, partition)
    return model, _directory_tokenizer(directory)


def _directory_tokenizer(directory: Path) -> Any:
    """Return the tokenizer a checkpoint directory ships, or None for one without tokenizer files."""
    return _load_tokenizer(directory) if has_tokenizer_files(directory) else None


def _directory_config(directory: Path, name: str | None = None) -> ModelConfig:
    """Return the config of the HF checkpoint directory ``directory`` (``name`` overrides the model name)."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise STSError(f"{directory} is not a model directory (no config.json)")
    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise STSError(f"cannot read {directory / 'config.json'}: {_cause(exc)}") from exc
    config = _model_config(hf_config, name or _model_name(directory, hf_config), directory / "config.json")
    return _with_eos(config, _generation_eos(directory))


def _model_name(directory: Path, hf_config: Any) -> str:
    """Return a stable model name: the checkpoint's recorded name, else its directory name."""
    recorded = getattr(hf_config, "_name_or_path", "") or ""
    return recorded if recorded and not Path(recorded).is_absolute() else directory.name


#: Token texts llama.cpp ends generation on in any GGUF (``llama-vocab.cpp``, ``special_eog_ids``).
GGUF_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
                   "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


@dataclass(frozen=True)
class GGUFExtras:
    """What a GGUF file says that transformers' GGUF loader drops (all read with ``gguf.GGUFReader``).

    Attributes:
        architecture: ``general.architecture`` (llama.cpp's name: ``llama`` also covers Mistral).
        rope_scaling: RoPE parameters rebuilt from ``{arch}.rope.scaling.*`` (linear or YaRN), or None.
        rope_freq_divisors: the ``rope_freqs.weight`` tensor ``[head_dim / 2]``: llama.cpp divides
            each inverse frequency by its entry (how Llama-3.x files keep ``llama3`` scaling), or None.
        eos_ids: end-of-generation ids, as llama.cpp finds them: the ``tokenizer.ggml.*_token_id``
            of eos, eot, eom and the FIM pad/rep/sep tokens, and every token spelled as one of
            :data:`GGUF_END_TOKENS` (a GGUF keeps no generation config: this recovers, e.g.,
            Qwen2.5's ``<|endoftext|>`` and Llama-3's ``<|eot_id|>``/``<|eom_id|>``).
        has_tokenizer: whether the file carries a tokenizer (``tokenizer.ggml.model``).
    """

    architecture: str
    rope_scaling: dict[str, Any] | None
    rope_freq_divisors: tuple[float, ...] | None
    eos_ids: tuple[int, ...]
    has_tokenizer: bool


def _gguf_scalar(reader: Any, key: str) -> Any:
    """Return a scalar (number or string) metadata value of a GGUF file, or None when absent."""
    import gguf

    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _gguf_rope_scaling(reader: Any, arch: str, path: Path) -> dict[str, Any] | None:
    """Return transformers RoPE parameters for a GGUF's ``rope.scaling.*`` metadata (None: unscaled)."""
    kind = _gguf_scalar(reader, f"{arch}.rope.scaling.type")
    factor = _gguf_scalar(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = _gguf_scalar(reader, f"{arch}.rope.scaling.original_context_length")
        if factor is None or original is None:
            raise STSError(f"{path}: YaRN RoPE scaling without a factor or an original context length")
        params: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor),
                                  "original_max_position_embeddings": int(original)}
        for key in ("beta_fast", "beta_slow"):
            value = _gguf_scalar(reader, f"{arch}.rope.scaling.yarn_{key}")
            if value is not None:
                params[key] = float(value)
        return params
    raise STSError(f"{path}: RoPE scaling {kind!r} in a GGUF is not supported (linear and yarn are)")


def _gguf_error(path: Path, exc: BaseException) -> STSError:
    """Return the one-line error of a GGUF that failed to load. A tensor whose data runs past the end of the file
    (numpy cannot shape the short memory map) is named as a truncated file; the reader's other numpy errors (a
    header or metadata cut short reads as empty or odd-sized arrays) as a file that ends early or is damaged."""
    size = path.stat().st_size
    if isinstance(exc, ValueError) and "cannot reshape array" in str(exc):
        return STSError(f"cannot load GGUF {path}: the file is truncated ({size} bytes: a tensor's "
                        "data runs past its end); download or copy it again")
    if isinstance(exc, (ValueError, IndexError)) and "GGUF magic" not in str(exc):
        return STSError(f"cannot load GGUF {path}: the file ends early or is damaged ({size} bytes; {_cause(exc)}); "
                        "download or copy it again")
    return STSError(f"cannot load GGUF {path}: {_cause(exc)}")


def read_gguf_extras(path: Path) -> GGUFExtras:
    """Return the :class:`GGUFExtras` of a GGUF file; a file that is not GGUF raises STSError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = _gguf_scalar(reader, "general.architecture")
    except Exception as exc:  # bad magic, truncated header, unreadable file
        raise _gguf_error(path, exc) from exc
    if not isinstance(arch, str):
        raise STSError(f"cannot load GGUF {path}: it has no general.architecture")
    divisors = None
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            values = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
            divisors = tuple(float(v) for v in values)
    eos: set[int] = set()
    for key in ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep"):
        value = _gguf_scalar(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            eos.add(int(value))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        ends = {text.encode() for text in GGUF_END_TOKENS}
        sizes = {len(end) for end in ends}  # compare lengths first: bytes() of 150K memory-mapped parts is slow
        for i, part in enumerate(tokens.data):
            text = tokens.parts[part]
            if text.shape[0] in sizes and bytes(text) in ends:
                eos.add(i)
    return GGUFExtras(
        architecture=arch,
        rope_scaling=_gguf_rope_scaling(reader, arch, path),
        rope_freq_divisors=divisors,
        eos_ids=tuple(sorted(eos)),
        has_tokenizer=_gguf_scalar(reader, "tokenizer.ggml.model") is not None,
    )


def _apply_gguf_rope(hf_config: Any, extras: GGUFExtras) -> tuple[float, ...] | None:
    """Put the GGUF's RoPE scaling into ``hf_config``; return the per-frequency divisors still to apply.

    transformers' GGUF loader reads ``rope.freq_base`` only: it drops ``rope.scaling.*`` and the
    ``rope_freqs`` tensor, so a Llama-3.x GGUF would run unscaled (0.88 max logit error).
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if extras.rope_scaling is not None and params.get("rope_type", "default") == "default":
        params.update(extras.rope_scaling)
        hf_config.rope_parameters = params
    if extras.rope_freq_divisors is not None and params.get("rope_type") == "llama3":
        # A transformers that rebuilds llama3 parameters itself has used the factors already.
        return None
    return extras.rope_freq_divisors


def _gguf_config(path: Path) -> tuple[ModelConfig, GGUFExtras]:
    """Return the config of the GGUF file ``path`` and what transformers' loader drops from it (tensors unread)."""
    from transformers import AutoConfig

    extras = read_gguf_extras(path)
    # llama.cpp names Mistral "llama"; refuse other families before the slow tensor load.
    if extras.architecture not in SUPPORTED_MODEL_TYPES:
        raise STSError(
            f"GGUF {path} holds a {extras.architecture!r} model; sts loads {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise _gguf_error(path, exc) from exc
    divisors = _apply_gguf_rope(hf_config, extras)
    config = _model_config(hf_config, path.stem, path)
    config = _with_eos(dataclasses.replace(config, rope_freq_divisors=divisors), extras.eos_ids)
    config.rope_inv_freq()  # a bad rope_freqs length fails here, before the slow tensor load
    return config, extras


def _load_gguf(path: Path, dtype: torch.dtype, device, partition: Partition | None = None) -> tuple[Transformer, Any]:
    """Return (model or its ``partition``, tokenizer or None) from a GGUF file, dequantised (whole) by transformers."""
    from transformers import AutoModelForCausalLM

    config, extras = _gguf_config(path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise _gguf_error(path, exc) from exc
    state = hf_model.state_dict()
    if partition is not None:
        state = {key: partition.take(config, key, tensor) for key, tensor in state.items()}
    model = _build(config, state, dtype, device, partition)
    tokenizer = _load_tokenizer(path.parent, gguf_file=path.name) if extras.has_tokenizer else None
    return model, tokenizer


def _hub_failure(exc: BaseException) -> str:
    """Return why a hub download failed, in a few words, followed by the hub library's own message (one line)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "GatedRepoError" in names:
        why = "gated repository (accept its terms on the hub and log in, e.g. HF_TOKEN)"
    elif "RepositoryNotFoundError" in names:
        why = "no such repository, or it is private (log in, e.g. HF_TOKEN)"
    elif "RevisionNotFoundError" in names:
        why = "no such revision"
    elif "DisabledRepoError" in names:
        why = "repository disabled"
    elif "HFValidationError" in names:
        why = "not a valid repository id"
    elif names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        why = "offline (or the hub is unreachable) and not in the local cache"
    elif "HfHubHTTPError" in names:
        why = "the hub answered with an error"
    elif names & {"ConnectionError", "TimeoutError", "ConnectError"}:
        why = "the hub is unreachable"
    else:
        why = type(exc).__name__
    return f"{why}: {_one_line(exc)}"


def _download(repo_id: str) -> Path:
    """Return a local snapshot of a hub checkpoint with what transformers would load from it.

    Fetches :data:`HUB_FILES` and the safetensors weights (the ``.bin`` weights only when the
    repository has no safetensors). Offline, unknown, gated... is an STSError saying which.
    """
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, *HUB_SAFETENSORS]))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, *HUB_BINS]))
    except Exception as exc:
        raise STSError(f"{repo_id!r} is not a local path and could not be fetched from the hub: {_hub_failure(exc)}") from exc
    if not (snapshot / "config.json").is_file():
        raise STSError(
            f"hub repository {repo_id!r} has no config.json, so it is no transformers checkpoint "
            "(for a GGUF repository, download one .gguf file and pass its path)"
        )
    return snapshot


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    partition: Partition | None = None,
) -> tuple[Transformer, Any]:
    """Return (model, tokenizer or None) from a checkpoint directory, a ``.gguf`` file or a hub id.

    The model's ``config.eos_token_ids`` holds every end-of-generation id the checkpoint names
    (config.json, generation_config.json, GGUF metadata). The tokenizer is None only for a
    checkpoint without tokenizer files; tokenizer files that fail to load raise STSError.
    With ``partition``, the model is this process's part of it (tensor parallelism, see
    :func:`sts.parallel.load_sharded`); from safetensors only that part of each weight is read.
    """
    path = Path(source).expanduser()
    kind = source_kind(source)
    if kind == "gguf":
        return _load_gguf(path, dtype, device, partition)
    if kind == "directory":
        return _load_directory(path, dtype, device, partition=partition)
    return _load_directory(_download(str(source)), dtype, device, name=str(source), partition=partition)


def check_sources(*sources: str | Path | None) -> None:
    """Refuse (:func:`source_kind`) every model source given, None skipped: callers that load two models check both
    first, so that a wrong second path fails before the first model loads."""
    for source in sources:
        if source is not None:
            source_kind(source)


def source_kind(source: str | Path) -> str:
    """Return what a model source is, reading nothing from it: "gguf" (a ``.gguf`` file), "directory" (a model
    directory) or "hub" (an ``owner/name`` id); raises STSError for a path where nothing is, a file that is not a
    ``.gguf`` or a directory without a ``config.json``."""
    kind = _local_kind(Path(source).expanduser())
    if kind is not None:
        return kind
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub"
    raise STSError(f"model path {source} does not exist")


def _local_kind(path: Path) -> str | None:
    """Return "gguf" for a .gguf file, "directory" for a model directory, None when nothing is at ``path``; raises
    STSError for another kind of file, or a directory without a ``config.json``."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise STSError(f"{path} is a file but not a .gguf model")
        return "gguf"
    if path.is_dir() and not (path / "config.json").is_file():
        raise STSError(f"{path} is not a model directory (no config.json)")
    return "directory" if path.is_dir() else None


def read_tokenizer(source: str | Path) -> Any:
    """Return the tokenizer of the checkpoint directory at ``source`` without reading its weights; None for a
    directory without tokenizer files and for any other source (a ``.gguf`` file, whose tokenizer transformers
    rebuilds from its metadata in seconds, comes with its weights). Raises STSError as :func:`load_model` does for
    tokenizer files that fail to load."""
    path = Path(source).expanduser()
    return _directory_tokenizer(path) if _local_kind(path) == "directory" else None


def read_config(source: str | Path) -> ModelConfig | None:
    """Return the config of the local checkpoint at ``source`` (an HF directory or a ``.gguf`` file) without reading
    its weights; None for anything else (a hub id, or no such path: :func:`load_model` says which).
    Raises STSError as :func:`load_model` does for an unreadable config."""
    path = Path(source).expanduser()
    kind = _local_kind(path)
    if kind == "gguf":
        return _gguf_config(path)[0]
    return _directory_config(path) if kind == "directory" else None
