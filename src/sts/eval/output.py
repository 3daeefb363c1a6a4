"""Where results go: refuse an unusable output path before any work, not after it, and leave nothing behind
when a run fails before writing anything."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sts.errors import STSError


def check_output_dir(path: str | Path) -> None:
    """Refuse (STSError), creating nothing, an output folder path that is a file or lies under one."""
    folder = Path(path)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise STSError(f"cannot use {folder} as the output folder: {existing} is a file, not a folder")


def output_dir(path: str | Path) -> Path:
    """Return ``path`` as a folder that exists (parents created) and takes new files; a path that cannot be one
    (not a folder, read-only, no permission) is a user error, found by creating and removing an empty file there."""
    folder = Path(path)
    check_output_dir(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sts-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise STSError(f"cannot use {folder} as the output folder: no file can be created there "
                       f"({exc.strerror or exc})") from None
    return folder


@contextmanager
def run_output_dir(path: str | Path) -> Iterator[Path]:
    """Yield ``path`` as a folder that exists (:func:`output_dir`, so an unusable path fails before any work).

    Should the body raise (an error or an interrupt) while the folders created here (``path`` and any missing
    parents) are still empty, they are removed again: a run that fails before writing anything leaves nothing.
    """
    folder = Path(path)
    created = _missing_folders(folder)
    output_dir(folder)
    try:
        yield folder
    except BaseException:
        _remove_empty(created)
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """Return ``folder`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first), stopping at the first that is not empty (or already gone)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def output_file(path: str | Path) -> Path:
    """Return ``path`` as a file that can be written (its folder created, :func:`output_dir`); a folder there is a
    user error. Call it before the work whose result goes there."""
    file = Path(path)
    if file.is_dir():
        raise STSError(f"output {file} is a folder: name a file")
    output_dir(file.parent)
    return file


def read_text(path: str | Path, what: str) -> str:
    """Return a text file's contents, read as UTF-8 (a leading byte-order mark dropped); a file that cannot be read
    or is not UTF-8 text is a one-line user error naming ``what`` (e.g. "prompt file")."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise STSError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise STSError(f"cannot read {what} {path}: not UTF-8 text (byte {exc.start} is {byte:#04x})") from None


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Return the JSON objects of a JSON-lines file (blank lines skipped), each holding the ``required`` fields
    (not null); an unreadable file or a line that is not such an object is an STSError naming the file (and line)."""
    lines = read_text(path, "JSON-lines file").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise STSError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise STSError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in required if record.get(name) is None]
        if missing:
            raise STSError(f"{where}: record lacks {', '.join(missing)}")
        records.append(record)
    return records


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` by calling ``write`` on a temporary sibling and renaming it into place."""
    # A reader (or a crash) never sees a half-written file; the pid keeps concurrent writers apart.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
