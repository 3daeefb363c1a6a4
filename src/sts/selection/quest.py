"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference")."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.selection.base import SelectionConfig, SelectionPolicy, group_max, register


@register
class QuestPolicy(SelectionPolicy):
    """Pages of ``page_size`` rows ranked by an upper bound of q.k from per-page min/max keys.

    The target's own verify queries score the pages; all rows of the best pages are taken
    until the budget is full (sinks and window first, like every policy). The rows of one page
    tie, so a sequence whose own budget ends inside a page (per-sequence budgets, see
    :meth:`~sts.selection.base.SelectionPolicy.slot_rows`) may keep other rows of it than a solo
    run's top-k would.
    """

    name = "quest"

    def __init__(self, config: SelectionConfig, page_size: int = 16) -> None:
        super().__init__(config)
        self.page_size = page_size

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return each row's page bound, maxed over the group's heads and verify queries."""
        b, hkv, _, d = k_cache.shape
        n = int(start_pos.max())
        pages = -(-n // self.page_size)
        rows = pages * self.page_size
        # The last page may run past the cache's end: pad it (the padding is masked out below).
        k = torch.nn.functional.pad(k_cache[:, :, :rows].float(), (0, 0, 0, rows - min(rows, k_cache.shape[2])))
        valid = (torch.arange(rows, device=k.device).view(1, 1, rows, 1) < start_pos.view(b, 1, 1, 1))
        k_min = k.masked_fill(~valid, float("inf")).view(b, hkv, pages, self.page_size, d).amin(3)
        k_max = k.masked_fill(~valid, float("-inf")).view(b, hkv, pages, self.page_size, d).amax(3)
        hq, t = q.shape[1], q.shape[2]
        qg = q.float().reshape(b, hkv, (hq // hkv) * t, 1, d)
        bound = torch.maximum(qg * k_min.unsqueeze(2), qg * k_max.unsqueeze(2))
        bound = torch.nan_to_num(bound, nan=float("-inf"), posinf=float("-inf")).sum(-1)  # [B, Hkv, G*T, P]
        page_score = group_max(bound, hkv)
        return page_score.repeat_interleave(self.page_size, dim=-1)[..., :n]
