"""95% confidence intervals for an evaluation's scores: a mean score, a paired difference of mean scores, a mean.

Scores lie in [0, 1]: 0 or 1 for exact-match tasks, partial credit for tasks with several
answers. The score intervals are the Wilson score interval (Wilson 1927) for a mean score and
Newcombe's square-and-add interval for the difference of two paired means (Newcombe 1998,
"Improved confidence intervals for the difference between binomial proportions based on paired
data", method 10), written with means and covariances instead of counts: for 0/1 scores they are
exactly the textbook intervals, and for partial credit they are conservative, because a score in
[0, 1] with mean p has a variance of at most p (1 - p), the variance they assume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from sts.errors import STSError

#: The confidence level of every interval in the reports.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval ``[low, high]``, in the unit of the values."""

    estimate: float
    low: float
    high: float


def wilson_interval(scores: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Return the mean of ``scores`` (each in [0, 1]) and its Wilson score interval.

    Raises :class:`STSError` for no scores or a score outside [0, 1].
    """
    x = _scores(scores)
    return _wilson(float(x.mean()), len(x), _z(confidence))


def paired_difference_interval(scores: Sequence[float], reference: Sequence[float],
                               confidence: float = CONFIDENCE) -> Interval:
    """Return mean(scores) - mean(reference) over paired samples and Newcombe's square-and-add interval.

    ``scores[i]`` and ``reference[i]`` are one sample's scores (each in [0, 1]) under two methods.
    The correlation of the pairs narrows the interval; it carries Newcombe's continuity correction
    (a covariance up to 1 / (2n) counts as none) and is 0 when either mean is 0 or 1.
    Raises :class:`STSError` for no pairs, unequal lengths or a score outside [0, 1].
    """
    x, y = _scores(scores), _scores(reference)
    if len(x) != len(y):
        raise STSError(f"paired scores need equal lengths, got {len(x)} and {len(y)}")
    n, z = len(x), _z(confidence)
    one, two = _wilson(float(x.mean()), n, z), _wilson(float(y.mean()), n, z)
    p1, p2 = one.estimate, two.estimate
    spread = p1 * (1 - p1) * p2 * (1 - p2)
    cov = float((x * y).mean()) - p1 * p2  # (ad - bc) / n^2 for 0/1 scores
    corrected = cov - 1 / (2 * n) if cov > 1 / (2 * n) else min(cov, 0.0)
    psi = corrected / math.sqrt(spread) if spread > 0 else 0.0
    d = p1 - p2
    below = math.sqrt((p1 - one.low) ** 2 + (two.high - p2) ** 2 - 2 * psi * (p1 - one.low) * (two.high - p2))
    above = math.sqrt((p2 - two.low) ** 2 + (one.high - p1) ** 2 - 2 * psi * (p2 - two.low) * (one.high - p1))
    return Interval(d, d - below, d + above)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                  bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval | None:
    """Return the mean of ``values`` and its Student t interval, cut to ``bounds``, the range the true mean is
    known to lie in (a score difference in points within +-100, an acceptance length of at least 1: at a few
    values the t interval reaches far past them); None for fewer than two values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    mean = float(x.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]))


def _scores(scores: Sequence[float]) -> np.ndarray:
    """Return ``scores`` as an array after checking that there are some and each lies in [0, 1]."""
    x = np.asarray(scores, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise STSError("a confidence interval needs at least one score")
    if not ((x >= 0) & (x <= 1)).all():
        raise STSError("scores must lie in [0, 1] for a score interval")
    return x


def _z(confidence: float) -> float:
    """Return the two-sided standard normal quantile of ``confidence`` (1.96 for 0.95)."""
    if not 0 < confidence < 1:
        raise STSError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.norm.ppf(0.5 + confidence / 2))


def _wilson(p: float, n: int, z: float) -> Interval:
    """Return the Wilson score interval of a mean ``p`` over ``n`` scores at normal quantile ``z``."""
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clipped only against rounding: the interval lies in [0, 1].
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))
