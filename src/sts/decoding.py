"""Autoregressive decoding and the pieces every decode loop shares: cache bookkeeping, stops, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from sts.attention.backend import AttentionFn, dense_attention
from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.transformer import Transformer

#: Called with (sequence index, newly emitted token ids) as soon as tokens are final.
StreamCallback = Callable[[int, list[int]], None]


class PrefixCache:
    """Keeps the KV rows and last logits of prefilled prompts, so that many runs share one prefill.

    An evaluation decodes the same prompt with many methods and budgets; prefill dominates on
    long prompts, so each (model, prompt) is prefilled once and restored into any batch slot.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[list[tuple[Tensor, Tensor]], Tensor]] = {}

    @staticmethod
    def key(model: Transformer, prompt: Sequence[int]) -> tuple:
        """Return the cache key of a model and a prompt."""
        return (id(model), tuple(prompt))

    def store(self, model: Transformer, prompt: Sequence[int], slot: int, logits: Tensor) -> None:
        """Keep a copy of the rows the prompt filled in batch slot ``slot`` and the logits ``[1, V]`` after it."""
        n = len(prompt)
        rows = [tuple(c[:, :, :n].clone() for c in blk.self_attn.cache.rows(slot)) for blk in model.layers]
        self.entries[self.key(model, prompt)] = (rows, logits.clone())  # type: ignore[misc]

    def restore(self, model: Transformer, prompt: Sequence[int], slot: int) -> Tensor | None:
        """Write the stored rows into batch slot ``slot``; return the stored logits, or None if absent."""
        entry = self.entries.get(self.key(model, prompt))
        if entry is None:
            return None
        rows, logits = entry
        for blk, stored in zip(model.layers, rows):
            for cache, saved in zip(blk.self_attn.cache.rows(slot), stored):
                cache[:, :, : saved.shape[2]].copy_(saved)
        return logits.clone()


class Decoder:
    """One model's KV cache state for a batch: how many tokens of each sequence it has processed.

    The token lists live with the caller; :meth:`feed` processes whatever each sequence has
    that the cache has not seen yet, and returns the logits after each sequence's last token.
    """

    def __init__(self, model: Transformer, batch_size: int, max_len: int, prefill_chunk: int = 512) -> None:
        if prefill_chunk < 1:
            raise STSError(f"prefill chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.chunk = prefill_chunk
        self.device = model.embed_tokens.weight.device
        model.setup_cache(batch_size, max_len, slack=prefill_chunk)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def feed(self, seqs: Sequence[Sequence[int]], attention: AttentionFn = dense_attention) -> Tensor:
        """Return logits ``[B, V]`` after each sequence's last token, processing its unseen tokens in chunks.

        A sequence with nothing unseen only carries padding (its row of the result is meaningless).
        """
        lengths = self.lengths.tolist()
        pending = [len(s) - n for s, n in zip(seqs, lengths)]
        if max(pending) < 1 or min(pending) < 0:
            raise ValueError("feed() needs unprocessed tokens and no sequence behind its cache")
        last: list[Tensor | None] = [None] * len(seqs)
        while max(pending) > 0:
            t = min(self.chunk, max(pending))
            rows = [list(s[n : n + min(p, t)]) for s, n, p in zip(seqs, lengths, pending)]
            tokens = torch.tensor([r + [0] * (t - len(r)) for r in rows], device=self.device)
            hidden = self.model.hidden(tokens, torch.tensor(lengths, device=self.device), attention)
            for b, r in enumerate(rows):
                if r and len(r) == pending[b]:
                    last[b] = hidden[b, len(r) - 1]
                lengths[b] += len(r)
                pending[b] -= len(r)
        self.lengths = torch.tensor(lengths, device=self.device)
        filler = torch.zeros_like(next(h for h in last if h is not None))
        return self.model.lm_head(torch.stack([filler if h is None else h for h in last])).float()

    def rollback(self, lengths: Tensor) -> None:
        """Forget every row at or past ``lengths[b]`` (they become scratch)."""
        self.lengths = lengths.clone()


@dataclass
class GenerationStats:
    """What a generation call measured; ``--json`` prints it."""

    new_tokens: int = 0
    #: Seconds spent compiling kernels and capturing CUDA graphs (once per shape set), excluded from time_s.
    compile_s: float = 0.0
    #: Tokens that came out of the prefill forward (one per sequence), excluded from decode speed.
    prefill_tokens: int = 0
    time_s: float = 0.0
    prefill_s: float = 0.0
    target_forwards: int = 0
    #: Tokens each round produced per decoding sequence (accepted drafts + 1): the acceptance length's samples. Tokens
    #: past ``max_new_tokens`` or an end-of-sequence id count too: they measure the draft's agreement, not the output.
    accepted_per_round: list[int] = field(default_factory=list)
    #: Seconds in each phase of the speculative rounds. STS scores the context during the draft's last step
    #: (:meth:`sts.engine.Engine._score_early`), so its score passes count in ``draft_s`` and ``select_s`` holds the
    #: ranking of the rows alone.
    draft_s: float = 0.0
    select_s: float = 0.0
    verify_s: float = 0.0
    #: Rounds of a selection policy that verified densely: sparse verification did not pay at their contexts
    #: (:mod:`sts.costmodel`); their sparsity is 0 (every row read).
    dense_rounds: int = 0
    sparsity: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    recall_context: list[float] = field(default_factory=list)
    #: Per verification step: target layer -> mass recall over context mass.
    recall_layers: list[dict[int, float]] = field(default_factory=list)
    #: "32", "64", "budget" -> per-step share of the oracle's top-k rows that were selected.
    set_recall: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | None]:
        """Return the headline numbers: tokens/s, acceptance length, sparsity, recall, phase times."""
        decode_s = max(self.time_s - self.prefill_s, 1e-9)
        mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
        return {
            "new_tokens": self.new_tokens,
            "time_s": round(self.time_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "compile_s": round(self.compile_s, 4),
            # A request aborted before its prefill's token was kept has fewer new tokens than that: 0, not negative.
            "tokens_per_s": round(max(self.new_tokens - self.prefill_tokens, 0) / decode_s, 3),
            "target_forwards": self.target_forwards,
            "acceptance_length": mean(self.accepted_per_round),
            "draft_s": round(self.draft_s, 4),
            "select_s": round(self.select_s, 4),
            "verify_s": round(self.verify_s, 4),
            "dense_rounds": self.dense_rounds,
            "sparsity": mean(self.sparsity),
            "recall": mean(self.recall),
            "recall_context": mean(self.recall_context),
            "set_recall": {k: mean(v) for k, v in self.set_recall.items()} or None,
        }

    def recall_per_layer(self) -> list[float] | None:
        """Return the mean recall over context mass of each target layer, over all steps."""
        if not self.recall_layers:
            return None
        layers = sorted(self.recall_layers[0])
        return [sum(step[layer] for step in self.recall_layers) / len(self.recall_layers) for layer in layers]


@dataclass
class GenerationResult:
    """New token ids per sequence (prompt excluded) and the run's stats."""

    tokens: list[list[int]]
    stats: GenerationStats


class StopState:
    """Tracks, per sequence, the emitted tokens and whether EOS or the token limit ended it."""

    def __init__(self, n_seqs: int, max_new_tokens: int, eos_ids: Sequence[int], on_tokens: StreamCallback | None) -> None:
        if max_new_tokens < 1:
            raise STSError(f"max new tokens must be >= 1, got {max_new_tokens}")
        self.max_new = max_new_tokens
        self.eos = set(eos_ids)
        self.on_tokens = on_tokens
        self.emitted: list[list[int]] = [[] for _ in range(n_seqs)]
        self.done = [False] * n_seqs

    def emit(self, b: int, tokens: Sequence[int]) -> None:
        """Record tokens produced for sequence ``b``, cutting at EOS (kept) or the limit."""
        if self.done[b]:
            return
        out = []
        for tok in tokens:
            out.append(int(tok))
            if tok in self.eos or len(self.emitted[b]) + len(out) >= self.max_new:
                self.done[b] = True
                break
        self.emitted[b].extend(out)
        if self.on_tokens and out:
            self.on_tokens(b, out)

    @property
    def finished(self) -> bool:
        """Return whether every sequence has stopped."""
        return all(self.done)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_capacity(
    configs: Sequence[ModelConfig], prompts: Sequence[Sequence[int]], max_new_tokens: int, lookahead: int,
) -> int:
    """Return the cache rows a run needs: the longest prompt + ``max_new_tokens`` + ``lookahead`` (the rows a round
    writes past its context: gamma + 1 for speculative decoding, 1 for autoregressive).

    Raises STSError for an empty prompt, a run past the context of any model of ``configs``, or token ids outside
    any one's vocabulary. Configs alone suffice, so the CLI checks a prompt before it reads any weights.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise STSError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    need = longest + max_new_tokens + lookahead
    for config in configs:
        limit = config.max_position_embeddings
        if need > limit:
            raise STSError(
                f"prompt of {longest} token{'s' * (longest != 1)} + {max_new_tokens} new token"
                f"{'s' * (max_new_tokens != 1)} + {lookahead} "
                f"row{'s' if lookahead > 1 else ''} a round writes past them exceeds the context of "
                f"{config.name} ({limit} tokens)"
            )
        vocab = config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise STSError(f"prompt token ids must be in [0, {vocab})")
    return need
