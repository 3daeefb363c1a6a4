"""Where results go: refuse an unusable output path before any work, not after it."""

from __future__ import annotations

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


def output_file(path: str | Path) -> Path:
    """Return ``path`` as a file that can be written (its folder created); a folder there is a user error."""
    file = Path(path)
    if file.is_dir():
        raise STSError(f"output {file} is a folder: name a file")
    output_dir(file.parent)
    return file
