"""sts: Speculative Token Sparsity, draft-guided sparse verification for fast long-context decoding.

``from sts import LLM`` is the Python API (:mod:`sts.api`); it is imported on first use, so that
``import sts`` stays cheap (no torch, no transformers). Its errors: :class:`STSError` for settings, models
and prompts it cannot take, and its subclass :class:`RequestError` for one request that cannot be served
as asked (the server's 4xx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sts.errors import STSError

if TYPE_CHECKING:
    from sts.api import LLM, Completion, RequestError

__all__ = ["LLM", "Completion", "RequestError", "STSError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sts import api

        return getattr(api, name)
    raise AttributeError(f"module 'sts' has no attribute {name!r}")
