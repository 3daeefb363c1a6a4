"""String-match scoring of generated answers, as in RULER."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sts.errors import STSError
from sts.eval.tasks import PERPLEXITY, Sample

Metric = Callable[[str, Sequence[str]], float]


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Return the share of ``answers`` contained in ``prediction``, ignoring case (RULER's partial credit)."""
    found = _found(prediction, answers)
    return sum(found) / len(found)


def string_match_any(prediction: str, answers: Sequence[str]) -> float:
    """Return 1.0 if any of ``answers`` is contained in ``prediction``, ignoring case, else 0.0."""
    return float(any(_found(prediction, answers)))


METRICS: dict[str, Metric] = {
    "string_match_all": string_match_all,
    "string_match_any": string_match_any,
}


def score(sample: Sample, prediction: str) -> float:
    """Return the score in [0, 1] of ``prediction`` for ``sample``, by the sample's metric."""
    metric = METRICS.get(sample.metric)
    if metric is None:
        hint = " (teacher-forced, not scored by string)" if sample.metric == PERPLEXITY else ""
        raise STSError(
            f"sample {sample.sample_id} has metric {sample.metric!r}{hint}; "
            f"string metrics are {', '.join(sorted(METRICS))}"
        )
    return metric(prediction, sample.answers)


def _found(prediction: str, answers: Sequence[str]) -> list[bool]:
    """Return, for each answer, whether ``prediction`` contains it, ignoring case."""
    if not answers:
        raise STSError("string matching needs at least one answer")
    lowered = prediction.lower()
    return [answer.lower() in lowered for answer in answers]
