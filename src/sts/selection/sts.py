"""STS (Speculative Token Sparsity, arXiv 2605.15508): the draft's attention, mapped head by head,
ranks the context rows each target KV head reads while verifying."""

from __future__ import annotations

import torch
from torch import Tensor

from sts.attention import dispatch
from sts.attention.scores import Aggregate
from sts.models.transformer import Transformer
from sts.selection.base import RoundContext, SelectionConfig, SelectionPolicy, register
from sts.selection.mapping import HeadMapping


@register
class STSPolicy(SelectionPolicy):
    """Scores each target (layer, KV head) by its mapped draft heads' attention of this round's drafts.

    Draft scores are computed once per round from the recorded draft queries and the draft's
    keys (K only) of the mapped layers, aggregated over the gamma queries (``aggregate``).
    """

    name = "sts"
    uses_draft = True

    def __init__(self, config: SelectionConfig, mapping: HeadMapping, aggregate: Aggregate = "max") -> None:
        super().__init__(config)
        self.mapping = mapping
        self.aggregate = aggregate
        self.layer_pos = {dl: i for i, dl in enumerate(mapping.draft_layers())}
        self._index = [self._layer_index(layer) for layer in mapping.sources]

    def _layer_index(self, heads) -> tuple[Tensor, Tensor, Tensor]:
        """Return (draft-layer slot, draft head, weight), each ``[Hkv, M]``, for one target layer."""
        width = max(len(h) for h in heads)
        # Pad by repeating a head's first source with weight 0: neutral for both max and sum.
        padded = [list(h) + [(h[0][0], h[0][1], 0.0)] * (width - len(h)) for h in heads]
        slot = torch.tensor([[self.layer_pos[s[0]] for s in h] for h in padded])
        head = torch.tensor([[s[1] for s in h] for h in padded])
        weight = torch.tensor([[s[2] for s in h] for h in padded], dtype=torch.float32)
        return slot, head, weight

    def draft_layers(self, draft: Transformer) -> tuple[int, ...]:
        """Return the draft layers the mapping reads."""
        return self.mapping.draft_layers()

    def prepare(self, ctx: RoundContext) -> None:
        """Score the context once per round for every mapped draft layer: ``[L_used, B, Hq_draft + 1, N]``.

        The extra last head slot holds the max over the layer's heads, which source head -1
        (:data:`~sts.selection.mapping.ALL_HEADS`) reads, so a whole-layer source costs one row.
        """
        super().prepare(ctx)
        assert ctx.draft is not None
        device = ctx.start_pos.device
        if self._index[0][0].device != device:  # moved once, before any CUDA-graph capture
            self._index = [tuple(t.to(device) for t in index) for index in self._index]
        per_layer = [
            dispatch.score_context(ctx.draft_queries[dl], ctx.draft.layers[dl].self_attn.cache.k, ctx.start_pos, self.aggregate)
            for dl in self.layer_pos
        ]
        self.draft_scores = torch.stack([torch.cat([s, s.amax(1, keepdim=True)], dim=1) for s in per_layer])

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor:
        """Return ``[B, Hkv, N]``: the mapped draft heads' scores, combined per target KV head."""
        slot, head, weight = self._index[layer]
        picked = self.draft_scores[slot, :, head]  # [Hkv, M, B, N]
        if self.mapping.combine == "max":
            combined = picked.amax(1)
        else:
            combined = (picked.clamp_min(0) * weight.view(*weight.shape, 1, 1)).sum(1)
        return combined.permute(1, 0, 2)
