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


def utf8_problem(path: str | os.PathLike, error: UnicodeDecodeError) -> str:
    """Where ``path`` first breaks UTF-8: "<reason> at byte N, line L", counted from the file's start.

    ``error`` came from a text reader, which decodes in chunks of a few KB and counts its offset from
    the chunk it was decoding: wrong anywhere past the first. Lines end in b"\\n", which never falls
    inside a UTF-8 character, so each line decodes on its own.
    """
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as in_line:
                return f"{in_line.reason} at byte {offset + in_line.start}, line {number}"
            offset += len(line)
    return error.reason  # the file changed since it was read


FILE_SUFFIXES = (".md", ".csv", ".tsv", ".txt", ".json", ".jsonl", ".yaml", ".png", ".svg", ".pdf", ".html")
"""A new name ending in one of these is a file the user meant: made where a folder goes, it would become a
folder named like a file (`report --out new.md`)."""


def check_writable_folder(folder: str | os.PathLike, option: str) -> None:
    """One sentence, before any work, when ``folder`` cannot hold the files a command will write.

    ``option`` names where the folder came from: ``--out`` reads "--out FOLDER", ``output_dir=``
    reads "output_dir=FOLDER".
    """
    folder = Path(folder)
    named = _named(option, folder)
    if folder.exists() and not folder.is_dir():
        raise DynbertError(f"{named} is a file: pass a folder to write into")
    if not folder.exists() and folder.suffix.lower() in FILE_SUFFIXES:
        raise DynbertError(f"{named} names a file ({folder.suffix}), but {option.rstrip('=')} is the folder "
                           "to write into: pass a folder name (it is created)")
    _check_nearest_folder(folder, named)


def check_writable_file(path: str | os.PathLike, option: str, suffixes: tuple[str, ...]) -> None:
    """One sentence, before any work, when ``path`` cannot be written as a file of one of ``suffixes``."""
    path = Path(path)
    named = _named(option, path)
    wanted = " or ".join(suffixes)
    if path.is_dir():
        raise DynbertError(f"{named} is a folder: pass a file name ending in {wanted}")
    if path.suffix.lower() not in suffixes:
        raise DynbertError(f"{named} must end in {wanted}")
    _check_nearest_folder(path.parent, named)


def _named(option: str, path: Path) -> str:
    return f"{option}{path}" if option.endswith("=") else f"{option} {path}"


def _check_nearest_folder(folder: Path, named: str) -> None:
    """The folder, or the nearest one above it that exists (the rest is created), must take new files.

    os.access, not the mode bits: it also says no on a read-only file system, where even root cannot write.
    Checked before any work, so a result is never computed only to fail at its temporary file.
    """
    for existing in (folder.absolute(), *folder.absolute().parents):
        if existing.exists():
            if not existing.is_dir():
                raise DynbertError(f"{named} cannot be created: {existing} is a file")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise DynbertError(f"{named} cannot be written: {existing} is not writable (pass another "
                                   "folder, or make it writable)")
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
