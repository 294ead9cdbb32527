"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file gpt_fn writes that a later run reads (token files, `meta.json`, checkpoints) goes
through `write_atomic`: the bytes go to a temporary file in the same folder, are flushed to
disk (`fsync`), and the temporary file is renamed over the target (`os.replace`, atomic on
POSIX). A process killed mid-write leaves only a temporary file, named
`.<target name>.<random>.tmp`, which `remove_temporaries` deletes on the next start. A folder
of files (an exported model) is written the same way by `write_folder_atomic`. What is
written gets the permissions any new file gets (0666 or 0777 less the umask), as `open` and
`mkdir` give them.

`lock_folder` holds a folder's lock (`.lock`, flock) for a block, waiting for another process
that holds it: two processes preparing one data folder take turns.
"""

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

LOCK = ".lock"
_Made = TypeVar("_Made")


def write_atomic(
    path: str | os.PathLike[str], content: bytes | memoryview | Callable[[Path], None]
) -> Path:
    """Write `content` to `path` atomically: bytes, or a function that writes the file it is given.

    Returns `path` as a `Path`. On any failure (an exception, KeyboardInterrupt) the temporary
    file is removed and `path` is left as it was.
    """
    target = Path(path)
    temporary, fd = _create_temporary(
        target, lambda name: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    )
    try:
        if callable(content):
            os.close(fd)
            content(temporary)
        else:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def write_folder_atomic(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Write a folder's files atomically: `fill` writes them into a temporary folder beside
    `path`, which then becomes `path` (renamed; into a folder that exists already, each file
    is renamed over its namesake, other files left alone). On any failure the temporary
    folder is removed and `path` is left as it was."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary, _ = _create_temporary(target, lambda name: os.mkdir(name, 0o777))
    try:
        fill(temporary)
        for file in temporary.iterdir():
            with open(file, "rb") as written:
                os.fsync(written.fileno())
        if target.is_dir():
            for file in sorted(temporary.iterdir()):
                os.replace(file, target / file.name)
        else:
            os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def _create_temporary(target: Path, create: Callable[[str], _Made]) -> tuple[Path, _Made]:
    """A new `.<target name>.<random>.tmp` beside `target`, made by `create` (which must fail
    with `FileExistsError` on a name taken), and what `create` returned."""
    while True:
        name = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return name, create(str(name))
        except FileExistsError:
            continue


def remove_temporaries(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """Delete what interrupted `write_atomic(folder / name, ...)` calls left; returns the paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted(folder.glob(f".{name}.*.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `folder`'s lock (`folder/.lock`, created with the folder) for the block, first
    waiting for any other process that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing
