"""sts: Speculative Token Sparsity, draft-guided sparse verification for fast long-context decoding.

``from sts import LLM`` is the Python API (:mod:`sts.api`); it is imported on first use, so that
``import sts`` stays cheap (no torch, no transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sts.api import LLM, Completion

__all__ = ["LLM", "Completion"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sts import api

        return getattr(api, name)
    raise AttributeError(f"module 'sts' has no attribute {name!r}")
