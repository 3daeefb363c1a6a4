"""TidalDecode-style selection (Yang et al., 2024, "TidalDecode: Fast and Accurate LLM Decoding with
Position Persistent Sparse Attention"): a few full-attention layers choose rows for the layers after them."""

from __future__ import annotations

from torch import Tensor

from sts.selection.base import SelectionConfig, SelectionPolicy, dense_scores, register


def default_select_layers(n_layers: int) -> tuple[int, ...]:
    """Return TidalDecode's selection layers for a target of ``n_layers``: layer 2 and again mid-way."""
    return tuple(sorted({min(2, n_layers - 1), n_layers // 2}))


@register
class TidalPolicy(SelectionPolicy):
    """Layers before ``select_layers[0]`` and the selection layers attend densely; the others reuse
    the rows chosen by the latest selection layer's true attention."""

    name = "tidal"

    def __init__(self, config: SelectionConfig, select_layers: tuple[int, ...] | None = None) -> None:
        super().__init__(config)
        self.select_layers = select_layers
        self.chosen: Tensor | None = None

    def prepare(self, ctx) -> None:  # type: ignore[override]
        """Default to TidalDecode's layout for this target (:func:`default_select_layers`)."""
        super().prepare(ctx)
        if self.select_layers is None:
            self.select_layers = default_select_layers(ctx.target.config.n_layers)
        self.chosen = None

    def scores(self, layer: int, q: Tensor, k_cache: Tensor, start_pos: Tensor) -> Tensor | None:
        """Return None (dense) on and before selection layers; else the last selection's scores."""
        assert self.select_layers is not None
        if layer in self.select_layers:
            self.chosen = dense_scores(q, k_cache, start_pos)
            return None
        return self.chosen
