"""Turning logits into next-token distributions and tokens: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sts.errors import STSError


#: top-k values from here on are refused (any k past the vocabulary already keeps every token).
TOP_K_LIMIT = 2**31
#: Temperatures below this decode greedily, as in vLLM (its ``_SAMPLING_EPS``): dividing float32 logits by a
#: smaller one overflows them to inf (1e-40 drew token 0 every step).
MIN_TEMPERATURE = 1e-5
#: Temperatures above this are refused: at 1e4 a distribution over logits tens apart is already nearly uniform,
#: and past float32's range (3.4e38) the temperature itself overflows.
MAX_TEMPERATURE = 1e4


def check_seed(seed: int) -> None:
    """Raise STSError unless ``seed`` is a seed torch's generators take: a 64-bit integer, -2^63 <= seed < 2^64."""
    if not -(2**63) <= seed < 2**64:
        raise STSError(f"seed must be a 64-bit integer (-2^63 <= seed < 2^64), got {seed}")


def sampling_problem(temperature: float, top_k: int, top_p: float) -> tuple[str, str] | None:
    """Return (setting, message) for the first sampling setting out of its range, None when all are in range:
    ``temperature`` in [0, :data:`MAX_TEMPERATURE`], ``top_k`` in [0, 2^31), ``top_p`` in (0, 1] (NaN in none)."""
    for name, value, ok, rule in (("temperature", temperature, 0 <= temperature <= MAX_TEMPERATURE,
                                   f"in [0, {MAX_TEMPERATURE:g}]"),
                                  ("top_k", top_k, 0 <= top_k < TOP_K_LIMIT, "in [0, 2^31)"),
                                  ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")):
        if not ok:
            return name, f"{name} must be {rule}, got {value}"
    return None


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy (top-k / top-p are then ignored), and so is any temperature
    below :data:`MIN_TEMPERATURE` (stored as 0). Raises :class:`~sts.errors.STSError` for a setting out of range
    (:func:`sampling_problem`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        problem = sampling_problem(self.temperature, self.top_k, self.top_p)
        if problem is not None:
            raise STSError(problem[1])
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)

    @property
    def greedy(self) -> bool:
        """Return whether decoding is deterministic (argmax)."""
        return self.temperature == 0.0


@dataclass
class SamplingRows:
    """Per-sequence sampling settings as tensors ``[B]`` (the engine keeps one row per batch slot).

    ``temperature == 0`` rows are greedy; ``top_k == 0`` and ``top_p == 1`` rows are unfiltered.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor

    @classmethod
    def filled(cls, config: SamplingConfig, rows: int, device: torch.device | str = "cpu") -> "SamplingRows":
        """Return ``rows`` copies of one config."""
        def full(value: float, dtype: torch.dtype) -> Tensor:
            return torch.full((rows,), value, dtype=dtype, device=device)

        return cls(full(config.temperature, torch.float32), full(config.top_k, torch.long), full(config.top_p, torch.float32))

    def set(self, row: int, config: SamplingConfig) -> None:
        """Give row ``row`` the settings of ``config`` (in place: safe while CUDA graphs read these tensors)."""
        self.temperature[row], self.top_k[row], self.top_p[row] = config.temperature, config.top_k, config.top_p


def probabilities(logits: Tensor, config: SamplingConfig | SamplingRows, filtered: bool | None = None) -> Tensor:
    """Return the distributions ``[B, ..., V]`` (float32) that tokens are drawn from, row ``b`` under row ``b``'s settings.

    Greedy rows get the one-hot distribution on the argmax, so speculative acceptance
    (min(1, p/q)) needs no special case: it reduces to exact matching. ``filtered=False``
    skips the top-k / top-p pass (a sort of the vocabulary) when no row uses them; by default
    it runs when some row might.
    """
    logits = logits.float()
    if isinstance(config, SamplingConfig):
        if config.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        filtered = config.top_k > 0 or config.top_p < 1.0
        config = SamplingRows.filled(config, logits.shape[0], logits.device)
    shape = (-1,) + (1,) * (logits.dim() - 1)
    greedy = (config.temperature == 0).view(shape)
    scaled = logits / torch.where(greedy, 1.0, config.temperature.view(shape))
    if filtered is None or filtered:
        scaled = _top_k_top_p(scaled, config.top_k.view(shape), config.top_p.view(shape))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.where(greedy, one_hot, torch.softmax(scaled, dim=-1))


def _top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Return ``logits`` with tokens outside each row's top ``k`` (when k > 0) and top-``p`` nucleus set to ``-inf``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    last = logits.shape[-1] - 1  # a k past the vocabulary keeps every token
    kth = sorted_logits.gather(-1, (top_k - 1).clamp(0, last).expand(*logits.shape[:-1], 1))
    sorted_logits = sorted_logits.masked_fill((top_k > 0) & (sorted_logits < kth), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the mass before it already reaches top_p; the first token always stays (a top_p below
    # float32's smallest number, e.g. 1e-300, is 0 here and would otherwise drop every token).
    drop_sorted = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
    drop_sorted[..., 0] = False
    drop_sorted |= torch.isinf(sorted_logits)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


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
