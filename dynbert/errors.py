"""User-facing errors and atomic file writes, shared by every command."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class DynbertError(Exception):
    """A mistake the user can fix. The CLI prints its one-sentence message, with no traceback."""


MESSAGE_LIMIT = 600
"""The most characters a message quotes from anything else (a line of a file, a library's error)."""


def shorten(text: str, limit: int = 80) -> str:
    """``text`` as it may appear in a message: control characters escaped, cut to ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[: limit * 4])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (libraries' messages run to many lines), capped."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return shorten(lines[0], MESSAGE_LIMIT) if lines else type(error).__name__


def check_writable_folder(folder: str | os.PathLike, option: str) -> None:
    """One sentence, before any work, when ``folder`` cannot hold the files a command will write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DynbertError(f"{option} {folder} is a file: pass a folder to write into")
    for parent in folder.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DynbertError(f"{option} {folder} cannot be created: {parent} is a file")
            return


def check_writable_file(path: str | os.PathLike, option: str, suffixes: tuple[str, ...]) -> None:
    """One sentence, before any work, when ``path`` cannot be written as a file of one of ``suffixes``."""
    path = Path(path)
    wanted = " or ".join(suffixes)
    if path.is_dir():
        raise DynbertError(f"{option} {path} is a folder: pass a file name ending in {wanted}")
    if path.suffix.lower() not in suffixes:
        raise DynbertError(f"{option} {path} must end in {wanted}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DynbertError(f"{option} {path} cannot be created: {parent} is a file")
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""The mode the user's umask gives a new file: what every result dynbert writes gets."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a result should be as readable as any file the user makes.
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
