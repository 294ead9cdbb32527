"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file gpt_fn writes that a later run reads (token files, `meta.json`, checkpoints) goes
through `write_atomic`: the bytes go to a temporary file in the same folder, are flushed to
disk (`fsync`), and the temporary file is renamed over the target (`os.replace`, atomic on
POSIX). A process killed mid-write leaves only a temporary file, named
`.<target name>.<random>.tmp`, which `remove_temporaries` deletes on the next start.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(
    path: str | os.PathLike[str], content: bytes | memoryview | Callable[[Path], None]
) -> Path:
    """Write `content` to `path` atomically: bytes, or a function that writes the file it is given.

    Returns `path` as a `Path`. On any failure (an exception, KeyboardInterrupt) the temporary
    file is removed and `path` is left as it was.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temporary = Path(name)
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


def remove_temporaries(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """Delete what interrupted `write_atomic(folder / name, ...)` calls left; returns the paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted(folder.glob(f".{name}.*.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
