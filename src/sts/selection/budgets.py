"""Per-head budgets: the same total rows per layer set, spread over target KV heads by calibrated difficulty.

A head whose attention sits on a few rows needs few; a diffuse head needs many. Calibration
stores, per target (layer, KV head), the oracle's recall curve: the share of the head's
competing attention mass (sinks and window excluded) held by its best ``step``, ``2 step``, ...
rows (:func:`sts.calibrate.mass_curves`). Because each curve is concave (sorted masses), giving
rows ``step`` at a time to the head that gains most is optimal for the summed recall, and that
greedy choice is a single top-k over every head's marginal gains.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sts.errors import STSError


def allocate(curve: Tensor, step: int, free: int, cap: float) -> Tensor:
    """Return ``[L, H]`` free rows per head (besides sinks and window) summing to ``L * H * free``.

    ``curve`` is ``[L, H, P]`` (share of mass at ``step * (p + 1)`` rows). Every head keeps at
    least a quarter of ``free`` and at most ``cap * free`` rows; rows beyond the curve's end
    count as no gain. ``free`` not a multiple of ``step``: every head gets the remainder on top.
    """
    if cap < 1:
        raise STSError(f"per-head budget cap must be >= 1 (x the mean), got {cap}")
    n_layers, n_heads, points = curve.shape
    blocks, extra = divmod(free, step)
    lo, hi = blocks // 4, max(blocks, int(cap * free) // step)
    # gains[..., j]: what block j (rows step*j .. step*(j+1)) adds; nothing past the curve.
    padded = torch.cat([curve.new_zeros(n_layers, n_heads, 1), curve.float()], dim=-1)
    gains = padded.diff(dim=-1)
    gains = torch.cat([gains, gains.new_zeros(n_layers, n_heads, max(hi - points, 0))], dim=-1)[..., :hi]
    # Blocks below lo are given; the rest of the total goes to the largest gains at or above lo.
    # (Ties between a head's equal gains keep the chosen blocks a prefix in count, which is all we use.)
    open_gains = gains[..., lo:].flatten()
    spare = n_layers * n_heads * (blocks - lo)
    chosen = torch.zeros_like(open_gains, dtype=torch.long)
    chosen[torch.topk(open_gains, spare).indices] = 1
    per_head = lo + chosen.view(n_layers, n_heads, -1).sum(-1)
    return per_head * step + extra


def limit_rows(rows: Tensor, widths: Tensor, invalid: int) -> Tensor:
    """Return ``rows`` ``[B, H, W]`` (in rank order) with slots at or past ``widths`` ``[H]`` set to ``invalid``."""
    slot = torch.arange(rows.shape[-1], device=rows.device)
    return torch.where(slot.view(1, 1, -1) < widths.view(1, -1, 1), rows, invalid)
