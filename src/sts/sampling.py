"""Turning logits into next-token distributions and tokens: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sts.errors import STSError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy (top-k / top-p are then ignored)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise STSError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise STSError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise STSError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Return whether decoding is deterministic (argmax)."""
        return self.temperature == 0.0


def probabilities(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Return the distribution ``[..., V]`` (float32) that tokens are drawn from.

    Greedy decoding is the one-hot distribution on the argmax, so speculative acceptance
    (min(1, p/q)) needs no special case: it reduces to exact matching.
    """
    logits = logits.float()
    if config.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Return one token id per row of ``probs`` ``[..., V]`` (argmax where a row is one-hot).

    Exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks index ``i`` with
    probability ``p_i`` (the first arrival of Poisson clocks of rates ``p``). Unlike
    ``torch.multinomial`` it never synchronises with the host, so it can run in a CUDA graph.
    """
    race = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator).clamp_min_(1e-30)
    return (probs.float() / race).argmax(-1)


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
