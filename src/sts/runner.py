"""One call that runs any decoding method on a loaded pair: what the CLI, the demo and eval share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from sts.decoding import GenerationResult, PrefixCache, StreamCallback, context_capacity
from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.models.loading import Partition, check_sources, load_model
from sts.models.transformer import Transformer
from sts.prefill import PrefillConfig
from sts.sampling import SamplingConfig
from sts.selection import REGISTRY, SelectionConfig, make_policy
from sts.selection.draft import DraftSelection, check_draft
from sts.speculative import check_draft_size, shared_vocab

#: Methods that need no selection policy.
DENSE_METHODS = ("autoregressive", "speculative")

#: Rows every draft step of ``--method sts``'s sparse rounds reads by default, picked by STS's own draft scores
#: (:data:`DEFAULT_DRAFT_SELECTION`): with "scored" at 128K, batch 1, on the H200 the draft phase took 0.14 ms per round
#: more than with 512 rows, and they keep more acceptance (docs/results.md, docs/benchmarks.md).
DEFAULT_DRAFT_BUDGET = 4096

#: The draft selection of ``--method sts`` with a draft budget: every draft step of a sparse round reads the rows STS
#: scored best. Against "scored" (the round's first step reads every row) it accepted 3.79 against 3.90 tokens per
#: round at 32K and 4.28 against 4.30 at 8K on the demo pair, with the same accuracy, and saves a pass over the
#: draft's whole cache per round: 1.0 ms of 13.6 at 128K, batch 1, on the H200 (docs/benchmarks.md).
DEFAULT_DRAFT_SELECTION: DraftSelection = "scored-all"

#: A draft budget as the product's entry points take it: rows, None or "dense" (a dense draft), or "auto"
#: (see :func:`draft_settings`).
DraftBudget = int | Literal["auto", "dense"] | None


def methods() -> tuple[str, ...]:
    """Return every ``--method`` name: the dense ones, then each registered selection policy."""
    return DENSE_METHODS + tuple(REGISTRY)


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """Return (device, dtype): CUDA in bfloat16 when a GPU is there and no device was given, else CPU in float32;
    a given device or dtype is kept. Raises STSError for a device torch does not know, and for CUDA without a GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise STSError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise STSError(f"device {device} asked for, but no CUDA device is available")
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


@dataclass
class LoadedModel:
    """A model with its tokenizer (None for checkpoints saved without one)."""

    model: Transformer
    tokenizer: Any


def load(source: str, dtype: torch.dtype, device: str, partition: Partition | None = None) -> LoadedModel:
    """Return the model (and tokenizer) at ``source``; with ``partition``, this process's part of the model."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise STSError(f"device {device} asked for, but no CUDA device is available")
    model, tokenizer = load_model(source, dtype=dtype, device=device, partition=partition)
    return LoadedModel(model, tokenizer)


def load_pair(
    target: str, draft: str | None, dtype: torch.dtype, device: str, partition: Partition | None = None,
) -> tuple[LoadedModel, LoadedModel | None]:
    """Return (target, draft or None), refusing a draft whose vocabulary or tokenizer differs or that is larger than the
    target (:func:`check_pair`).

    ``partition``: the target is this process's part of it (tensor parallelism); the draft is whole. A draft path
    where nothing is fails before the target loads.
    """
    check_sources(target, draft)
    tgt = load(target, dtype, device, partition)
    if draft is None:
        return tgt, None
    dft = load(draft, dtype, device)
    check_pair(tgt, dft)
    return tgt, dft


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise :class:`STSError` when ``draft`` cannot draft for ``target``: another vocabulary or tokenizer
    (:func:`~sts.speculative.shared_vocab`), or larger than the target (:func:`~sts.speculative.check_draft_size`)."""
    shared_vocab(target.model, draft.model, target.tokenizer, draft.tokenizer)
    check_draft_size(target.model.config, draft.model.config)


def eos_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """Return the token ids that end a generation (from the config, else the tokenizer; may be empty)."""
    ids = set(loaded.model.config.eos_token_ids)
    tok = loaded.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return tuple(sorted(ids))


def draft_settings(method: str, draft_budget: DraftBudget,
                   draft_selection: DraftSelection | None) -> tuple[int | None, DraftSelection | None]:
    """Return ``(draft budget, draft selection)`` for ``method``: a budget "auto" is :data:`DEFAULT_DRAFT_BUDGET` rows
    for ``sts`` and a dense draft (None) for every other method, "dense" is None; a selection left None is
    :data:`DEFAULT_DRAFT_SELECTION` for ``sts`` with a draft budget (the rows STS's scores rank best, read by every
    draft step of a sparse round: more acceptance than the latest rows, docs/results.md), else "recent";
    autoregressive decoding has neither (None, None). The engine drafts densely anyway in the rounds it verifies
    densely.

    Raises :class:`STSError`, before any model is loaded, for a budget that is none of these, a budget or a
    selection given to autoregressive decoding, a scored selection with another method than ``sts``, an unknown
    selection, one other than "recent" without a draft budget, or a budget with no row past the draft's sinks
    (:func:`~sts.selection.draft.check_draft`).
    """
    if draft_budget not in (None, "auto", "dense") and (isinstance(draft_budget, bool)
                                                        or not isinstance(draft_budget, int)):
        raise STSError(f"draft budget must be 'auto', 'dense' (or None) or a row count, got {draft_budget!r}")
    if draft_selection is not None and draft_selection.startswith("scored") and method != "sts":
        raise STSError(f"draft selection {draft_selection} reuses STS's draft scores: it needs method sts, not {method}")
    if draft_budget == "auto":
        draft_budget = DEFAULT_DRAFT_BUDGET if method == "sts" else None
    budget = draft_budget if isinstance(draft_budget, int) else None  # "dense" or None
    if method == "autoregressive":
        if budget is not None or draft_selection is not None:
            what = "budget" if budget is not None else "selection"
            raise STSError(f"a draft {what} needs a draft: use a speculative method")
        return None, None
    default: DraftSelection = DEFAULT_DRAFT_SELECTION if method == "sts" and budget is not None else "recent"
    selection = draft_selection or default
    check_draft(budget, selection)  # the engine's own check, before any model is loaded
    return budget, selection


def build_engine(
    method: str, target: LoadedModel, draft: LoadedModel | None, *, slots: int, max_len: int, gamma: int = 4,
    sampling: SamplingConfig = SamplingConfig(), selection: SelectionConfig | None = None, mapping: str | None = None,
    options: dict[str, Any] | None = None, draft_budget: DraftBudget = None, prefill: PrefillConfig | None = None,
    prefill_chunk: int | None = None, measure_recall: bool = False, prefix_cache: PrefixCache | None = None, seed: int = 0,
    verify: Literal["auto", "sparse"] = "auto", draft_selection: DraftSelection | None = None,
) -> Engine:
    """Return an engine that decodes with ``method`` (see :func:`methods`) in ``slots`` slots of ``max_len`` rows.

    The CLI (:func:`run_method`), the Python API and ``sts eval`` build their engines here; an
    engine decodes any number of :meth:`~sts.engine.Engine.generate` calls, capturing its CUDA
    graphs once. ``prefill`` makes the target's prefill sparse (speculative methods only; such
    prefills are never shared, so ``prefix_cache`` is then unused); ``options`` go to the
    selection policy (e.g. ``rerank``, ``feedback`` for STS); ``draft_budget`` makes the draft's
    steps after the first of each round read ``draft_budget`` rows: sinks and the latest rows, or with
    ``draft_selection="scored"`` (STS) sinks, the window and the rows the draft's layers scored best in the
    last sparse round (:mod:`sts.selection.draft`; "auto" and a selection left None: :func:`draft_settings`);
    ``verify`` "sparse" keeps a selection policy's
    verification sparse below the break-even context too (default "auto": :class:`~sts.engine.EngineConfig`).

    Raises :class:`STSError` for an unknown method, a method that needs a draft without one, or
    settings the method does not take.
    """
    if method not in methods():
        raise STSError(f"unknown method {method!r} (choose from {', '.join(methods())})")
    draft_budget, draft_selection = draft_settings(method, draft_budget, draft_selection)
    if method == "autoregressive":
        if prefill is not None:  # (a draft budget: refused by draft_settings)
            raise STSError("--sparse-prefill needs a draft: use a speculative method")
        config = EngineConfig(sampling=sampling, seed=seed, prefill_chunk=prefill_chunk)
        return Engine(target.model, slots=slots, max_len=max_len, config=config, prefix_cache=prefix_cache)
    if draft is None:
        raise STSError(f"--method {method} needs a --draft model")
    policy = None
    if method not in DENSE_METHODS:
        policy = make_policy(method, selection or SelectionConfig(), target.model, draft.model, mapping, **(options or {}))
    config = EngineConfig(
        gamma=gamma, sampling=sampling, draft_budget=draft_budget, draft_selection=draft_selection,
        vocab=shared_vocab(target.model, draft.model, target.tokenizer, draft.tokenizer),
        measure_recall=measure_recall, seed=seed, sparse_prefill=prefill, prefill_chunk=prefill_chunk, verify=verify,
    )
    return Engine(target.model, draft.model, policy, slots=slots, max_len=max_len, config=config,
                  prefix_cache=None if prefill else prefix_cache)


def run_gamma(gamma: int, max_new_tokens: int) -> int:
    """Return ``gamma`` cut to ``max_new_tokens - 1`` (at least 1): the prefill gives the first token, and no round can
    keep more drafts than the tokens left after it. A gamma below 1 is returned as it is (the engine refuses it)."""
    return min(gamma, max(max_new_tokens - 1, 1)) if gamma >= 1 else gamma


def lookahead(method: str, gamma: int, max_new_tokens: int) -> int:
    """Return the cache rows a round of ``method`` writes past a sequence: its drafts and the target's token
    (:func:`run_gamma` + 1), or one for autoregressive decoding."""
    return 1 if method == "autoregressive" else run_gamma(gamma, max_new_tokens) + 1


def run_method(
    method: str,
    target: LoadedModel,
    draft: LoadedModel | None,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    gamma: int = 4,
    sampling: SamplingConfig = SamplingConfig(),
    selection: SelectionConfig | None = None,
    mapping: str | None = None,
    measure_recall: bool = False,
    on_tokens: StreamCallback | None = None,
    seed: int | None = None,
    prefix_cache: PrefixCache | None = None,
    prefill: PrefillConfig | None = None,
    options: dict[str, Any] | None = None,
    draft_budget: DraftBudget = None,
    verify: Literal["auto", "sparse"] = "auto",
    draft_selection: DraftSelection | None = None,
) -> GenerationResult:
    """Return the generation of ``method`` (autoregressive, speculative or a selection policy) for ``prompts``.

    Builds one engine sized for these prompts (:func:`build_engine` describes the settings) and
    decodes them to an end-of-sequence id or ``max_new_tokens``, ``gamma`` cut to the tokens asked for
    (:func:`run_gamma`). Raises :class:`STSError` for impossible settings or prompts that do not fit a model's
    context.
    """
    gamma = run_gamma(gamma, max_new_tokens)
    configs = [m.model.config for m in (target, draft if method != "autoregressive" else None) if m is not None]
    max_len = context_capacity(configs, prompts, max_new_tokens, lookahead(method, gamma, max_new_tokens))
    engine = build_engine(
        method, target, draft, slots=len(prompts), max_len=max_len, gamma=gamma, sampling=sampling,
        selection=selection, mapping=mapping, options=options, draft_budget=draft_budget, prefill=prefill,
        measure_recall=measure_recall, prefix_cache=prefix_cache, seed=0 if seed is None else seed, verify=verify,
        draft_selection=draft_selection,
    )
    return engine.generate(prompts, max_new_tokens, eos_ids(target), on_tokens)
