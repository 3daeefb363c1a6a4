"""Selection policies: which context rows each target KV head reads while verifying."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from sts.errors import STSError
from sts.models.transformer import Transformer
from sts.selection import oracle, quest, specpc, streaming, sts, tidal  # noqa: F401  (registers them)
from sts.selection.base import REGISTRY, RoundContext, SelectionConfig, SelectionPolicy
from sts.selection.mapping import HeadMapping

__all__ = ["REGISTRY", "RoundContext", "SelectionConfig", "SelectionPolicy", "HeadMapping", "check_options", "is_option", "make_policy",
           "split_options"]

#: Constructor arguments that make_policy fills itself: never options.
_GIVEN = ("self", "config", "mapping")


def check_options(method: str, names: Iterable[str] | Mapping[str, Any]) -> None:
    """Refuse, with an STSError naming the valid ones, any option in ``names`` that policy ``method`` does not take;
    given values too (a mapping), those STS refuses whatever the models (:func:`~sts.selection.sts.check_sts_options`):
    every check that needs no model, so that callers run it before loading one."""
    if method not in REGISTRY:
        raise STSError(f"unknown selection method {method!r} (choose from {', '.join(REGISTRY)})")
    valid = _option_names(method)
    unknown = [name for name in names if valid is not None and name not in valid]
    if unknown:
        raise STSError(f"unknown option {', '.join(map(repr, unknown))} for {method} "
                       f"(it takes {', '.join(valid) if valid else 'no options'})")
    if method == "sts" and isinstance(names, Mapping):
        sts.check_sts_options(**names)


def split_options(name: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """Return (base, options) of a method name with policy options, ``"sts/rerank=0/feedback=0.25"`` ->
    ``("sts", (("rerank", 0.0), ("feedback", 0.25)))``; an STSError when an option is not ``/key=number`` or
    is set twice (which options the method takes is :func:`check_options`'s)."""
    base, *pairs = name.split("/")
    try:
        options = tuple((k, float(v)) for k, v in (p.split("=") for p in pairs))
    except ValueError:
        raise STSError(f"method {name!r}: options must look like /key=number") from None
    if len({k for k, _ in options}) < len(options):
        raise STSError(f"method {name!r} sets an option twice")
    return base, options


def _option_names(method: str) -> list[str] | None:
    """Return the options policy ``method`` takes (its constructor's keywords), or None when it takes any."""
    params = inspect.signature(REGISTRY[method].__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword and p.name not in _GIVEN]


def is_option(name: str) -> bool:
    """Return whether some selection policy takes the option ``name``."""
    return any(valid is None or name in valid for valid in map(_option_names, REGISTRY))


def make_policy(
    method: str, config: SelectionConfig, target: Transformer, draft: Transformer, mapping: str | None = None,
    **options: Any,
) -> SelectionPolicy:
    """Return the policy named ``method`` with its options; STS uses the mapping file if given, else the default map.

    An option the policy's constructor does not name is a user error; anything else the
    constructor raises is left to surface.
    """
    check_options(method, options)
    if config.dense_layers > target.config.n_layers:
        raise STSError(f"--dense-layers {config.dense_layers} exceeds the target's {target.config.n_layers} layers")
    if method == "sts":
        # A tensor-parallel target part (sts.parallel) reads the file's rows for its own KV heads.
        head_map = (HeadMapping.load(mapping).shard(*target.config.shard) if mapping
                    else HeadMapping.default(target.config, draft.config))
        head_map.check_pair(target.config, draft.config)
        return sts.STSPolicy(config, head_map, **options)
    if mapping:
        raise STSError(f"--mapping applies to --method sts, not {method}")
    return REGISTRY[method](config, **options)
