"""Speculative decoding: the draft proposes ``gamma`` tokens, the target verifies them in one forward.

With a selection policy the target verifies with sparse attention (STS and the baselines);
without one it is ordinary lossless speculative decoding. Acceptance is the standard rule
(:func:`sts.sampling.accept`). The round itself is :class:`sts.engine.Engine`'s; this module
checks that a pair fits together and offers the one-call API.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from sts.decoding import GenerationResult, PrefixCache, StreamCallback, context_capacity
from sts.engine import Engine, EngineConfig
from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer
from sts.prefill import PrefillConfig
from sts.sampling import SamplingConfig
from sts.selection.base import SelectionPolicy


def shared_vocab(target: Transformer, draft: Transformer, target_tokenizer: Any = None, draft_tokenizer: Any = None) -> int:
    """Return how many token ids draft and target share; raise :class:`STSError` when they cannot pair.

    Models of one family often pad their embedding tables differently with one tokenizer
    (Qwen2.5 0.5B-3B have 151936 rows, 7B and up 152064): with both tokenizers known and
    equal, the shared ids are the tokenizer's (``len(tokenizer)``), and ids past them are
    never proposed nor accepted. Without tokenizers the tables must have the same size.
    """
    sizes = (target.config.vocab_size, draft.config.vocab_size)
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise STSError("draft and target tokenizers differ: speculative decoding needs the same tokenizer")
        n = len(target_tokenizer)
        if n > min(sizes):
            raise STSError(f"the tokenizer has {n} ids but a model has only {min(sizes)} embedding rows")
        return n
    if sizes[0] != sizes[1]:
        raise STSError(f"draft vocabulary ({sizes[1]}) differs from the target's ({sizes[0]})")
    return sizes[0]


def check_draft_size(target: ModelConfig, draft: ModelConfig) -> None:
    """Raise :class:`STSError` when the draft is larger than the target: at least as deep and as wide (hidden
    size), and deeper or wider; the pair was most likely given the wrong way round (a draft larger than its
    target makes speculative decoding slower than decoding with the target alone)."""
    t, d = (target.n_layers, target.hidden_size), (draft.n_layers, draft.hidden_size)
    if d[0] >= t[0] and d[1] >= t[1] and d != t:
        raise STSError(f"the draft ({d[0]} layers, hidden size {d[1]}) is larger than the target ({t[0]} layers, hidden "
                       f"size {t[1]}): the small model is the draft, the large one the target (swapped?)")


def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    gamma: int = 4,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    policy: SelectionPolicy | None = None,
    measure_recall: bool = False,
    on_tokens: StreamCallback | None = None,
    seed: int = 0,
    prefix_cache: PrefixCache | None = None,
    prefill: PrefillConfig | None = None,
    draft_budget: int | None = None,
    vocab: int | None = None,
    prefill_chunk: int | None = None,
    verify: Literal["auto", "sparse"] = "auto",
) -> GenerationResult:
    """Return continuations decoded speculatively; with ``policy``, verification reads only selected rows.

    ``prompts``: lists of token ids, one per sequence (each sequence gets its own batch slot).
    ``prefill``: the target's prefill is sparse too (draft-chosen key blocks, :mod:`sts.prefill`).
    ``draft_budget``: only the first draft step of a round reads the draft's whole cache (its
    queries score the context); the others read sinks + the latest rows, ``draft_budget`` in all.
    ``vocab``: shared token ids (:func:`shared_vocab`); by default the tables must match.
    ``prefill_chunk``: prompt tokens per prefill forward (default: the engine's).
    ``verify``: with a policy, "auto" verifies densely in rounds whose contexts are below the break-even
    (:mod:`sts.costmodel`), "sparse" always over the policy's rows (see :class:`~sts.engine.EngineConfig`).
    Raises :class:`STSError` for impossible settings or prompts that do not fit the context.
    """
    if vocab is None:
        vocab = shared_vocab(target, draft)
    config = EngineConfig(gamma=gamma, sampling=sampling, draft_budget=draft_budget, vocab=vocab,
                          measure_recall=measure_recall, seed=seed, sparse_prefill=prefill,
                          prefill_chunk=prefill_chunk, verify=verify)
    capacity = context_capacity((target.config, draft.config), prompts, max_new_tokens, lookahead=gamma + 1)
    engine = Engine(target, draft, policy, slots=len(prompts), max_len=capacity, config=config, prefix_cache=prefix_cache)
    return engine.generate(prompts, max_new_tokens, eos_ids, on_tokens)
