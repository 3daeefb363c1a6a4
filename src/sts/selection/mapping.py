"""Which draft heads stand in for each target KV head: the STS head mapping and its file format."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sts.errors import STSError
from sts.models.config import ModelConfig

FORMAT_VERSION = 1

#: One source: (draft layer, draft query head, weight); head -1 is the max over all the layer's heads.
Source = tuple[int, int, float]
ALL_HEADS = -1


@dataclass(frozen=True)
class HeadMapping:
    """For every target (layer, KV head), the draft (layer, head) sources whose scores rank its rows.

    ``combine`` says how several sources merge: ``max`` (the default map: max over a draft
    layer's heads) or ``sum`` (a weighted ensemble of calibrated heads).
    """

    sources: tuple[tuple[tuple[Source, ...], ...], ...]
    combine: Literal["max", "sum"]
    target: dict[str, Any]
    draft: dict[str, Any]
    criterion: str = "default"
    quality: tuple[tuple[float, ...], ...] | None = None
    #: Per target (layer, KV head): the share of its competing attention mass held by its best
    #: ``curve_step * (p + 1)`` rows, measured at calibration (for per-head budgets).
    mass_curve: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    curve_step: int = 16

    def draft_layers(self) -> tuple[int, ...]:
        """Return every draft layer some target head reads."""
        return tuple(sorted({s[0] for layer in self.sources for head in layer for s in head}))

    @classmethod
    def default(cls, target: ModelConfig, draft: ModelConfig) -> "HeadMapping":
        """Return DESIGN.md's default map: draft layer floor(l * Ld / Lt), max over that layer's heads."""
        sources = []
        for layer in range(target.n_layers):
            dl = layer * draft.n_layers // target.n_layers
            sources.append(tuple(((dl, ALL_HEADS, 1.0),) for _ in range(target.n_kv_heads)))
        return cls(tuple(sources), "max", target.identity(), draft.identity())

    def shard(self, rank: int, world: int) -> "HeadMapping":
        """Return the mapping of tensor-parallel rank ``rank`` of ``world``: its equal share of each layer's
        target KV heads, recorded for the target part that holds them (:mod:`sts.parallel`).

        Per-head budgets (STS ``head_budgets``) are then spread over the rank's own heads: each rank
        reads the same total, but not the one-process spread. Raises :class:`STSError` when a
        layer's KV heads do not split into ``world`` equal parts.
        """
        if world == 1:
            return self
        if any(len(layer) % world for layer in self.sources) or self.target.get("n_heads", 0) % world:
            raise STSError(f"mapping's target KV heads do not split evenly over {world} tensor-parallel ranks")

        def part(layers: tuple[tuple[Any, ...], ...] | None) -> Any:
            if layers is None:
                return None
            return tuple(layer[rank * len(layer) // world : (rank + 1) * len(layer) // world] for layer in layers)

        target = {**self.target, **{k: self.target[k] // world for k in ("n_heads", "n_kv_heads") if k in self.target}}
        return replace(self, sources=part(self.sources), quality=part(self.quality), mass_curve=part(self.mass_curve),
                       target=target)

    def check_pair(self, target: ModelConfig, draft: ModelConfig) -> None:
        """Raise :class:`STSError` unless this mapping was made for exactly this target and draft."""
        for role, cfg, recorded in (("target", target, self.target), ("draft", draft, self.draft)):
            if cfg.identity() != recorded:
                raise STSError(
                    f"mapping was made for {role} {recorded.get('name')!r} "
                    f"({recorded.get('n_layers')} layers), not {cfg.name!r} ({cfg.n_layers} layers)"
                )
        shape_ok = len(self.sources) == target.n_layers and all(len(layer) == target.n_kv_heads for layer in self.sources)
        in_range = all(
            0 <= dl < draft.n_layers and ALL_HEADS <= dh < draft.n_heads
            for layer in self.sources for head in layer for dl, dh, _ in head
        )
        curve_ok = self.mass_curve is None or (
            len(self.mass_curve) == target.n_layers and all(len(layer) == target.n_kv_heads for layer in self.mass_curve)
            and len({len(head) for layer in self.mass_curve for head in layer}) == 1 and self.curve_step > 0
        )
        if not (shape_ok and in_range and curve_ok and self.combine in ("max", "sum")):
            raise STSError("mapping file does not match the shapes of its recorded models")

    def save(self, path: str | Path) -> None:
        """Write the mapping as versioned JSON, atomically (no half-written file on failure)."""
        path = Path(path)
        doc = {
            "format": "sts-head-mapping",
            "version": FORMAT_VERSION,
            "target": self.target,
            "draft": self.draft,
            "criterion": self.criterion,
            "combine": self.combine,
            "sources": [[[list(s) for s in head] for head in layer] for layer in self.sources],
            "quality": [list(q) for q in self.quality] if self.quality is not None else None,
            "mass_curve": [[list(h) for h in layer] for layer in self.mass_curve] if self.mass_curve is not None else None,
            "curve_step": self.curve_step,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a mapping is an ordinary file
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "HeadMapping":
        """Return the mapping stored at ``path``; a missing, corrupt or foreign file is an error."""
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise STSError(f"mapping file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise STSError(f"mapping file {path} is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != "sts-head-mapping":
            raise STSError(f"{path} is not an sts head-mapping file")
        if doc.get("version") != FORMAT_VERSION:
            raise STSError(f"{path} has mapping format version {doc.get('version')}, expected {FORMAT_VERSION}")
        try:
            sources = tuple(
                tuple(tuple((int(s[0]), int(s[1]), float(s[2])) for s in head) for head in layer)
                for layer in doc["sources"]
            )
            quality, curve = doc.get("quality"), doc.get("mass_curve")
            return cls(
                sources=sources,
                combine=doc["combine"],
                target=doc["target"],
                draft=doc["draft"],
                criterion=doc.get("criterion", "default"),
                quality=tuple(tuple(q) for q in quality) if quality is not None else None,
                mass_curve=tuple(tuple(tuple(float(x) for x in h) for h in layer) for layer in curve) if curve is not None else None,
                curve_step=int(doc.get("curve_step", 16)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise STSError(f"mapping file {path} is malformed ({type(exc).__name__}: {exc})") from None
