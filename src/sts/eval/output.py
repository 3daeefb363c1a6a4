"""Where results go: refuse an unusable output path before any work, not after it, and leave nothing behind
when a run fails before writing anything."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sts.errors import STSError


def output_dir(path: str | Path) -> Path:
    """Return ``path`` as a folder that exists (parents created); a path that cannot be one is a user error."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise STSError(f"cannot use {folder} as the output folder: {exc.strerror or exc}") from None
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
    """Return ``path`` as a file that can be written (its folder created); a folder there is a user error."""
    file = Path(path)
    if file.is_dir():
        raise STSError(f"output {file} is a folder: name a file")
    output_dir(file.parent)
    return file


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` by calling ``write`` on a temporary sibling and renaming it into place."""
    # A reader (or a crash) never sees a half-written file; the pid keeps concurrent writers apart.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
