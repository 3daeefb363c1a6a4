"""``sts calibrate``: map each target (layer, KV head) to the draft heads whose attention predicts it.

Both models read the same calibration text densely. The last ``queries`` positions play the
verify queries, split into rounds of ``gamma``; for every draft (layer, head) its top-k context
rows per round (sinks and window excluded: they are always kept) are compared with what each
target KV head really attends to: the share of its attention mass they cover (``recall``), or
the overlap with its own top-k (``jaccard``). The best source(s) per target head win.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from sts.attention.backend import dense_attention
from sts.attention.reference import attention_probs
from sts.decoding import Decoder
from sts.errors import STSError
from sts.eval.text import TextFile, read_token_texts
from sts.models.transformer import Transformer
from sts.runner import LoadedModel
from sts.selection.mapping import HeadMapping

log = logging.getLogger(__name__)

Criterion = Literal["recall", "jaccard"]
#: Rows per point of the stored per-head mass curves (the granularity of per-head budgets).
CURVE_STEP = 16


class ProbeAttention:
    """Dense attention that keeps each layer's probabilities over the context rows (``[B, Hq, T, N]``)."""

    def __init__(self) -> None:
        self.probs: dict[int, Tensor] = {}

    def __call__(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return dense attention and record the probabilities on rows before ``start_pos``."""
        n = int(start_pos.max())
        self.probs[layer] = attention_probs(q, k_cache, start_pos)[..., :n]
        return dense_attention(layer, q, k_cache, v_cache, start_pos)


def probe(model: Transformer, tokens: Sequence[int], n_queries: int) -> Tensor:
    """Return ``[L, Hq, Q, N]``: every layer's attention of the last ``Q`` tokens over the ``N`` before them."""
    decoder = Decoder(model, 1, len(tokens))
    decoder.feed([list(tokens[:-n_queries])])
    probe_fn = ProbeAttention()
    context = decoder.lengths
    model.hidden(torch.tensor([list(tokens[-n_queries:])], device=decoder.device), context, probe_fn)
    return torch.stack([probe_fn.probs[layer][0] for layer in range(model.config.n_layers)])


def _round_max(x: Tensor, gamma: int) -> Tensor:
    """Return ``[..., R, N]``: the max over each round of ``gamma`` consecutive queries of ``[..., Q, N]``."""
    *lead, q, n = x.shape
    r = q // gamma
    return x[..., : r * gamma, :].reshape(*lead, r, gamma, n).amax(-2)


def _round_mean(x: Tensor, gamma: int) -> Tensor:
    """Return ``[..., R, N]``: the mean over each round of ``gamma`` consecutive queries."""
    *lead, q, n = x.shape
    r = q // gamma
    return x[..., : r * gamma, :].reshape(*lead, r, gamma, n).mean(-2)


def competing_mass(target_probs: Tensor, n_kv_heads: int, sink: int, window: int, gamma: int) -> Tensor:
    """Return ``[Lt, Hkv, R, M]``: each target KV head's attention mass per round on the rows that compete
    for the budget (sinks and window excluded), averaged over the group's heads and the round's queries."""
    lt, hq, q, n = target_probs.shape
    grouped = target_probs.reshape(lt, n_kv_heads, hq // n_kv_heads, q, n).mean(2)
    return _round_mean(grouped, gamma)[..., sink : n - window]


def mass_curves(mass: Tensor, step: int) -> Tensor:
    """Return ``[Lt, Hkv, P]``: the share of a head's competing mass its best ``step * (p + 1)`` rows hold
    (the oracle's recall curve, mean over rounds): how many rows the head needs, its difficulty."""
    ranked = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    share = ranked / ranked[..., -1:].clamp_min(1e-12)
    points = share.shape[-1] // step
    return share[..., step - 1 : points * step : step].mean(-2)


def score_sources(
    mass: Tensor, draft_probs: Tensor, topk: int, sink: int, window: int,
    criterion: Criterion = "recall", gamma: int = 4,
) -> Tensor:
    """Return ``[Lt, Hkv, Ld * Hd]``: how well each draft head's top-k rows serve each target KV head.

    ``mass`` is the target's :func:`competing_mass` ``[Lt, Hkv, R, M]``, ``draft_probs``
    ``[Ld, Hq_d, Q, N]`` (same queries, same context). Only rows in ``[sink, N - window)``
    compete, since the others are always kept.
    """
    lt, n_kv_heads, n = mass.shape[0], mass.shape[1], draft_probs.shape[-1]
    lo, hi = sink, n - window
    if hi - lo < topk:
        raise STSError(f"calibration context too short: {n} rows leave fewer than --topk {topk} between sink and window")
    draft = _round_max(draft_probs.flatten(0, 1), gamma)[..., lo:hi]  # [S, R, M]
    picks = torch.topk(draft, topk, dim=-1).indices  # [S, R, k]
    if criterion == "recall":
        total = mass.sum(-1).clamp_min(1e-12)
        hit = torch.stack([mass.gather(-1, idx.expand(lt, n_kv_heads, *idx.shape)).sum(-1) for idx in picks])
        return (hit / total).mean(-1).permute(1, 2, 0)
    own = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, torch.topk(mass, topk, dim=-1).indices, True)
    inter = torch.stack([own.gather(-1, idx.expand(lt, n_kv_heads, *idx.shape)).sum(-1).float() for idx in picks])
    return (inter / (2 * topk - inter)).mean(-1).permute(1, 2, 0)


def mapping_from_scores(
    quality: Tensor, target: Transformer, draft: Transformer, n_sources: int, criterion: str,
    curves: Tensor | None = None, step: int = 16,
) -> HeadMapping:
    """Return the mapping that takes, per target head, its ``n_sources`` best draft heads (weights ∝ score)."""
    hd = draft.config.n_heads
    best = torch.topk(quality, n_sources, dim=-1)
    sources = []
    for lt in range(quality.shape[0]):
        layer = []
        for h in range(quality.shape[1]):
            vals, idx = best.values[lt, h], best.indices[lt, h]
            weights = (vals / vals.sum().clamp_min(1e-12)).tolist()
            layer.append(tuple((int(i) // hd, int(i) % hd, float(w)) for i, w in zip(idx.tolist(), weights)))
        sources.append(tuple(layer))
    return HeadMapping(
        sources=tuple(sources),
        combine="max" if n_sources == 1 else "sum",
        target=target.config.identity(),
        draft=draft.config.identity(),
        criterion=criterion,
        quality=tuple(tuple(float(x) for x in row) for row in best.values[..., 0]),
        mass_curve=None if curves is None else tuple(tuple(tuple(round(float(x), 5) for x in head) for head in layer) for layer in curves),
        curve_step=step,
    )


def calibrate(
    target: Transformer, draft: Transformer, texts: Sequence[Sequence[int]], *, criterion: Criterion = "recall",
    topk: int = 256, n_sources: int = 1, n_queries: int = 32, sink: int = 4, window: int = 64, gamma: int = 4,
    progress: bool = True,
) -> HeadMapping:
    """Return the calibrated head mapping for a pair, from token sequences of calibration text."""
    if n_sources < 1:
        raise STSError(f"--sources must be >= 1, got {n_sources}")
    if n_queries < gamma:
        raise STSError(f"--queries must be at least gamma ({gamma})")
    total: Tensor | None = None
    curves: list[Tensor] = []
    for tokens in tqdm(texts, desc="calibrate", disable=not progress, file=None):
        if len(tokens) <= n_queries + topk + sink + window:
            raise STSError(f"a calibration text of {len(tokens)} tokens is too short: it must exceed --queries {n_queries} "
                           f"+ --topk {topk} + --sink {sink} + --window {window} tokens (lower them or raise --context)")
        mass = competing_mass(probe(target, tokens, n_queries), target.config.n_kv_heads, sink, window, gamma)
        score = score_sources(mass, probe(draft, tokens, n_queries), topk, sink, window, criterion, gamma)
        total = score if total is None else total + score
        curves.append(mass_curves(mass, CURVE_STEP))
    if total is None:
        raise STSError("no calibration text given")
    points = min(c.shape[-1] for c in curves)  # texts of different lengths: the rows all of them have
    curve = torch.stack([c[..., :points] for c in curves]).mean(0)
    return mapping_from_scores(total / len(texts), target, draft, n_sources, criterion, curve, CURVE_STEP)


def calibrate_files(
    target: LoadedModel, draft: LoadedModel, text_files: Sequence[str | TextFile], out: str | Path, *,
    skip_tokens: int = 0, context: int = 2048, criterion: Criterion = "recall", topk: int = 256, n_sources: int = 1,
    n_queries: int = 32, sink: int = 4, window: int = 64,
) -> HeadMapping:
    """Return the mapping calibrated on text files (paths, or files already read: :func:`sts.eval.text.read_text_files`;
    ``context`` tokens of each, after ``skip_tokens``), after saving it to ``out``; the other settings are
    :func:`calibrate`'s."""
    from sts.eval.output import output_file

    if target.tokenizer is None:
        raise STSError("calibration needs the target's tokenizer to read the text files")
    heads = draft.model.config.n_layers * draft.model.config.n_heads
    if n_sources > heads:
        raise STSError(f"--sources {n_sources} exceeds the draft's {heads} heads")
    out = output_file(out)
    texts = read_token_texts(text_files, target.tokenizer, skip_tokens, context)
    mapping = calibrate(target.model, draft.model, texts, criterion=criterion, topk=topk, n_sources=n_sources,
                        n_queries=n_queries, sink=sink, window=window)
    mapping.save(out)
    return mapping
