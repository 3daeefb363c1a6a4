"""Teacher-forced verification: perplexity of known text when the target verifies with a policy's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sts.decoding import Decoder, GenerationStats, PrefixCache
from sts.models.transformer import Transformer
from sts.selection.attend import SelectiveAttention
from sts.selection.base import RoundContext, SelectionPolicy
from sts.attention.backend import QueryRecorder


@dataclass
class TeacherForced:
    """Mean negative log-likelihood of the scored tokens, and the verification stats behind it."""

    nll: float
    n_tokens: int
    stats: GenerationStats


def draft_reads_truth(ddec: Decoder, tokens: Sequence[int], start: int, gamma: int, recorder: QueryRecorder) -> None:
    """Make the draft read the true tokens up to ``start``, then ``gamma`` recorded steps of the true continuation."""
    if int(ddec.lengths[0]) < start:
        ddec.feed([list(tokens[:start])])
    for i in range(gamma):
        ddec.feed([list(tokens[: start + i + 1])], recorder)


def teacher_forced(
    target: Transformer,
    draft: Transformer,
    tokens: Sequence[int],
    context: int,
    gamma: int,
    policy: SelectionPolicy | None,
    measure_recall: bool = False,
    prefix_cache: PrefixCache | None = None,
) -> TeacherForced:
    """Return the NLL of ``tokens[context + 1:]`` verified ``gamma + 1`` at a time, as STS would verify them.

    The draft reads the true continuation (as if it had guessed every token), so the policy's
    draft scores come from the same queries a perfect draft would produce; the target's KV rows
    for verified tokens come from its sparse forward, as in decoding.
    """
    tokens = list(tokens)
    tdec = Decoder(target, 1, len(tokens) + gamma + 1)
    ddec = Decoder(draft, 1, len(tokens) + gamma + 1)
    tdec.prefill(tokens[:context], prefix_cache)
    ddec.prefill(tokens[:context], prefix_cache)
    recorder = QueryRecorder(policy.draft_layers(draft) if policy is not None and policy.uses_draft else ())
    attention = SelectiveAttention(policy, measure_recall) if policy is not None else None
    if policy is not None:
        policy.reset()
    stats = GenerationStats()
    total, count, start = 0.0, 0, context
    while start + gamma + 2 <= len(tokens):
        if policy is not None:
            if policy.uses_draft:
                draft_reads_truth(ddec, tokens, start, gamma, recorder)
            start_pos = torch.tensor([start], device=tdec.device)
            policy.prepare(RoundContext(start_pos, target, policy.config.tokens(start), draft, recorder.take()))
        block = torch.tensor([tokens[start : start + gamma + 1]], device=tdec.device)
        kwargs = {} if attention is None else {"attention": attention}
        logits = target(block, torch.tensor([start], device=tdec.device), **kwargs)
        labels = torch.tensor(tokens[start + 1 : start + gamma + 2], device=tdec.device)
        total += float(torch.nn.functional.cross_entropy(logits[0], labels, reduction="sum"))
        count += gamma + 1
        if attention is not None:
            attention.end_step(stats)
        start += gamma + 1
    stats.target_forwards = count // (gamma + 1)
    return TeacherForced(total / max(count, 1), count, stats)
