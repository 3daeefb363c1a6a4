"""Speculative decoding: the draft proposes ``gamma`` tokens, the target verifies them in one forward.

With a selection policy the target verifies with sparse attention (STS and the baselines);
without one it is ordinary lossless speculative decoding. Acceptance is the standard rule:
accept draft token x with probability min(1, p(x) / q(x)), on rejection resample from the
normalised residual max(p - q, 0); greedy decoding is the same rule on one-hot distributions.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import Tensor

from sts.attention.backend import AttentionFn, QueryRecorder, dense_attention
from sts.decoding import Decoder, GenerationResult, PrefixCache, GenerationStats, StopState, StreamCallback, context_capacity, synchronize
from sts.errors import STSError
from sts.models.transformer import Transformer
from sts.sampling import SamplingConfig, draw, probabilities
from sts.selection.attend import SelectiveAttention
from sts.prefill import PrefillConfig, sparse_prefill
from sts.selection.base import RoundContext, SelectionConfig, SelectionPolicy
from sts.selection.mapping import HeadMapping
from sts.selection.streaming import StreamingPolicy
from sts.selection.sts import STSPolicy


def sparse_draft_attention(budget: int, sink: int = 4) -> SelectiveAttention:
    """Return the draft's attention for the steps after a round's first: sinks + the latest rows."""
    if budget <= sink:
        raise STSError(f"draft budget must exceed the {sink} sink rows, got {budget}")
    policy = StreamingPolicy(SelectionConfig(budget=budget, sink=sink, window=0))
    policy.budget = budget
    return SelectiveAttention(policy)


def check_pair(target: Transformer, draft: Transformer, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise :class:`STSError` unless draft and target share a vocabulary (and tokenizer, when known)."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise STSError(
            f"draft vocabulary ({draft.config.vocab_size}) differs from the target's ({target.config.vocab_size})"
        )
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise STSError("draft and target tokenizers differ: speculative decoding needs the same tokenizer")


def accept(draft_tokens: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Return (accepted count ``[B]``, next token ``[B]``) by speculative rejection sampling.

    ``draft_tokens`` ``[B, G]`` were drawn from ``q`` ``[B, G, V]``; ``p`` ``[B, G + 1, V]`` is
    the target's distribution at each verified position (the last one for the bonus token).
    """
    b, g = draft_tokens.shape
    p_x = p[:, :g].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(b, g, device=p.device, generator=generator)
    ok = u * q_x < p_x  # u < p/q without dividing by a zero q
    n = ok.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(b, device=p.device)
    target_at = p[rows, n]
    draft_at = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, n]
    residual = (target_at - draft_at).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # All accepted: the bonus token comes from p itself (draft_at is zero there).
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_at)
    return n, draw(residual, generator)


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
    generator: torch.Generator | None = None,
    prefill_chunk: int = 512,
    prefix_cache: PrefixCache | None = None,
    prefill: PrefillConfig | None = None,
    draft_budget: int | None = None,
) -> GenerationResult:
    """Return continuations decoded speculatively; with ``policy``, verification reads only selected rows.

    With ``prefill``, the target's prefill is sparse too (draft-chosen key blocks, see :mod:`sts.prefill`).
    With ``draft_budget``, only the first draft step of a round reads the draft's whole cache (its
    queries score the context); the others read sinks + the latest rows, ``draft_budget`` in all.
    """
    if gamma < 1:
        raise STSError(f"gamma must be >= 1, got {gamma}")
    check_pair(target, draft)
    capacity = context_capacity(target, prompts, max_new_tokens, lookahead=gamma + 1)
    context_capacity(draft, prompts, max_new_tokens, lookahead=gamma + 1)
    tdec = Decoder(target, len(prompts), capacity, prefill_chunk, prefix_cache)
    ddec = Decoder(draft, len(prompts), capacity, prefill_chunk, prefix_cache)
    device = tdec.device
    seqs = [list(p) for p in prompts]
    stop = StopState(len(seqs), max_new_tokens, eos_ids, on_tokens)
    stats = GenerationStats()
    recorder = QueryRecorder(policy.draft_layers(draft) if policy and policy.uses_draft else ())
    verify_attention = SelectiveAttention(policy, measure_recall) if policy else dense_attention
    if policy is not None:
        policy.reset()
    draft_attention = sparse_draft_attention(draft_budget) if draft_budget else dense_attention

    start = time.perf_counter()
    if prefill is None:
        first_logits = tdec.prefill(seqs)
        ddec.prefill(seqs)
    else:
        selection = policy.config if policy is not None else SelectionConfig()
        scorer = policy if isinstance(policy, STSPolicy) else STSPolicy(selection, HeadMapping.default(target.config, draft.config))
        first_logits = sparse_prefill(tdec, ddec, seqs, scorer, prefill, selection)
    first = draw(probabilities(first_logits, sampling), generator).tolist()
    for b, tok in enumerate(first):
        seqs[b].append(tok)
        stop.emit(b, [tok])
    synchronize(device)
    stats.prefill_s = time.perf_counter() - start

    while not stop.finished:
        t0 = time.perf_counter()
        context = tdec.lengths.clone()  # rows before the last (unverified) token
        drafted, draft_probs = _propose(ddec, seqs, gamma, sampling, generator, recorder, draft_attention)
        synchronize(device)
        t1 = time.perf_counter()
        if policy is not None:
            policy.budget = policy.config.tokens(int(context.max()))
            policy.prepare(RoundContext(context, target, draft, recorder.take()))
        synchronize(device)
        t2 = time.perf_counter()
        last = torch.tensor([s[-1] for s in seqs], device=device).view(-1, 1)
        logits = target(torch.cat([last, drafted], dim=1), context, verify_attention)
        n_acc, nxt = accept(drafted, draft_probs, probabilities(logits, sampling), generator)
        synchronize(device)
        stats.draft_s += t1 - t0
        stats.select_s += t2 - t1
        stats.verify_s += time.perf_counter() - t2
        stats.target_forwards += 1
        if isinstance(verify_attention, SelectiveAttention):
            verify_attention.end_step(stats)
        n_list, nxt_list, drafted_list = n_acc.tolist(), nxt.tolist(), drafted.tolist()
        for b in range(len(seqs)):
            new = drafted_list[b][: n_list[b]] + [nxt_list[b]]
            if not stop.done[b]:
                stats.accepted_per_round.append(len(new))
            seqs[b].extend(new)
            stop.emit(b, new)
        # Target: keeps the verified prefix; draft: kept what it had processed of that prefix.
        tdec.rollback(context + n_acc + 1)
        ddec.rollback(context + n_acc.clamp_max(gamma - 1) + 1)
    synchronize(device)
    stats.time_s = time.perf_counter() - start
    stats.new_tokens = sum(len(e) for e in stop.emitted)
    stats.prefill_tokens = len(seqs)
    return GenerationResult(stop.emitted, stats)


def _propose(
    ddec: Decoder,
    seqs: list[list[int]],
    gamma: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    recorder: QueryRecorder,
    later_steps: AttentionFn = dense_attention,
) -> tuple[Tensor, Tensor]:
    """Return (``[B, gamma]`` draft tokens, ``[B, gamma, V]`` their distributions).

    The first step attends densely; the later ones through ``later_steps``.
    """
    lag = [len(s) - n for s, n in zip(seqs, ddec.lengths.tolist())]
    if max(lag) > 1:
        # The draft never processed its own last token of a fully accepted round: catch up
        # first, outside the recorded steps, so every recorded step is one query per sequence.
        ddec.feed([s[:-1] for s in seqs])
    tokens: list[Tensor] = []
    dists: list[Tensor] = []
    work = [list(s) for s in seqs]
    for step in range(gamma):
        recorder.inner = dense_attention if step == 0 else later_steps
        probs = probabilities(ddec.feed(work, recorder), sampling)
        tok = draw(probs, generator)
        tokens.append(tok)
        dists.append(probs)
        for b, t in enumerate(tok.tolist()):
            work[b].append(t)
    return torch.stack(tokens, dim=1), torch.stack(dists, dim=1)
