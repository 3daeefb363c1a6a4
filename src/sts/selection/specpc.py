"""SpecPC-style selection (Sengupta et al., 2025, "Draft-based Approximate Inference for LLMs"):
one set of rows for every target head, from the draft's attention maxed over all its layers and heads."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.attention import dispatch
from sts.models.transformer import Transformer
from sts.selection.base import RoundContext, SelectionPolicy, register


@register
class SpecPCPolicy(SelectionPolicy):
    """The draft's attention of this round's queries, maxed over all draft layers and heads."""

    name = "specpc"
    uses_draft = True
    graph_safe = True

    def draft_layers(self, draft: Transformer) -> tuple[int, ...]:
        """Return every draft layer."""
        return tuple(range(draft.config.n_layers))

    def prepare(self, ctx: RoundContext) -> None:
        """Compute the single global score vector ``[B, 1, N]`` for this round."""
        super().prepare(ctx)
        assert ctx.draft is not None
        per_layer = [
            dispatch.score_context(q, ctx.draft_keys(layer), ctx.start_pos).amax(1)
            for layer, q in ctx.draft_queries.items()
        ]
        self.global_scores = torch.stack(per_layer).amax(0).unsqueeze(1)

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return the global scores for every KV head of the layer."""
        return self.global_scores.expand(k_cache.shape[0], k_cache.shape[1], -1)
