"""Oracle top-k: the target's own dense attention picks its rows (the upper bound for any selection)."""

from __future__ import annotations

from torch import Tensor

from sts.selection.base import SelectionPolicy, dense_scores, register


@register
class OraclePolicy(SelectionPolicy):
    """Rows with the highest true attention probability (max over the group's heads and verify queries).

    It reads the whole cache with the verify queries, so it is only for evaluation.
    """

    name = "oracle"

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the target's dense attention over the context, maxed per KV head."""
        return dense_scores(q, k_cache, start_pos)
