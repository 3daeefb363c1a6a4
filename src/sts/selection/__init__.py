"""Selection policies: which context rows each target KV head reads while verifying."""

from __future__ import annotations

from typing import Any

from sts.errors import STSError
from sts.models.transformer import Transformer
from sts.selection import oracle, quest, specpc, streaming, sts, tidal  # noqa: F401  (registers them)
from sts.selection.base import REGISTRY, RoundContext, SelectionConfig, SelectionPolicy
from sts.selection.mapping import HeadMapping

__all__ = ["REGISTRY", "RoundContext", "SelectionConfig", "SelectionPolicy", "HeadMapping", "make_policy"]


def make_policy(
    method: str, config: SelectionConfig, target: Transformer, draft: Transformer, mapping: str | None = None,
    **options: Any,
) -> SelectionPolicy:
    """Return the policy named ``method`` with its options; STS uses the mapping file if given, else the default map."""
    if method not in REGISTRY:
        raise STSError(f"unknown selection method {method!r} (choose from {', '.join(REGISTRY)})")
    try:
        if method == "sts":
            head_map = HeadMapping.load(mapping) if mapping else HeadMapping.default(target.config, draft.config)
            head_map.check_pair(target.config, draft.config)
            return sts.STSPolicy(config, head_map, **options)
        if mapping:
            raise STSError(f"--mapping applies to --method sts, not {method}")
        return REGISTRY[method](config, **options)
    except TypeError as exc:  # an option the policy does not take
        raise STSError(f"bad option for {method}: {exc}") from None
