"""Teacher-forced verification: perplexity of known text when the target verifies with a policy's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sts.decoding import GenerationStats, PrefixCache
from sts.engine import Engine, EngineConfig
from sts.models.transformer import Transformer
from sts.selection.base import SelectionPolicy
from sts.selection.draft import DraftSelection


@dataclass
class TeacherForced:
    """Mean negative log-likelihood of the scored tokens, and the verification stats behind it."""

    nll: float
    n_tokens: int
    stats: GenerationStats


def teacher_forced(
    target: Transformer,
    draft: Transformer,
    tokens: Sequence[int],
    context: int,
    gamma: int,
    policy: SelectionPolicy | None,
    measure_recall: bool = False,
    prefix_cache: PrefixCache | None = None,
    draft_budget: int | None = None,
    draft_selection: DraftSelection = "recent",
) -> TeacherForced:
    """Return the NLL of ``tokens[context + 1:]`` verified ``gamma + 1`` at a time, as STS would verify them.

    The engine's own round runs teacher-forced (:meth:`~sts.engine.Engine.forced_step`): the draft
    reads the true continuation (as if it had guessed every token), so the policy's draft scores come
    from the queries a perfect draft would produce; the target's KV rows for verified tokens come
    from its sparse forward, as in decoding. ``policy=None`` verifies densely (the reference).
    ``draft_budget``, ``draft_selection``: the draft's steps after a round's first read that many rows,
    chosen as in decoding with that sparse draft (:mod:`sts.selection.draft`).
    """
    tokens = list(tokens)
    engine = Engine(target, draft, policy, max_len=len(tokens) + gamma + 2,
                    config=EngineConfig(gamma=gamma, measure_recall=measure_recall, draft_budget=draft_budget,
                                        draft_selection=draft_selection),
                    prefix_cache=prefix_cache)
    engine.prefill(0, tokens[:context])
    total, count, start = 0.0, 0, context
    while start + gamma + 2 <= len(tokens):
        logits = engine.forced_step([tokens[start : start + gamma + 2]])
        labels = torch.tensor(tokens[start + 1 : start + gamma + 2], device=logits.device)
        total += float(torch.nn.functional.cross_entropy(logits[0], labels, reduction="sum"))
        count += gamma + 1
        start += gamma + 1
    return TeacherForced(total / max(count, 1), count, engine.stats)
