"""Tests for gpt_fn.files: atomic writes of files and folders, their permissions, the folder lock."""

import os
import stat
import threading
import time

import pytest

from gpt_fn.files import lock_folder, write_atomic, write_folder_atomic


@pytest.fixture
def umask():
    """Set the process's umask for a test, and put the old one back."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_get_the_umasks_permissions(tmp_path, umask, mask):
    """Invariant: what is written has the mode `open`/`mkdir` would give it (0666/0777 less
    the umask), so another user reads an exported model when the umask lets them."""
    umask(mask)
    write_atomic(tmp_path / "bytes.bin", b"abc")
    write_atomic(tmp_path / "filled.bin", lambda path: path.write_bytes(b"abc"))
    write_folder_atomic(tmp_path / "folder", lambda path: (path / "a.txt").write_text("a"))
    assert mode(tmp_path / "bytes.bin") == mode(tmp_path / "filled.bin") == 0o666 & ~mask
    assert mode(tmp_path / "folder") == 0o777 & ~mask
    assert mode(tmp_path / "folder" / "a.txt") == 0o666 & ~mask


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    def fail_half_way(path):
        (path / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(tmp_path / "model", fail_half_way)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("mine")
    (tmp_path / "model" / "config.json").write_text("old")
    with pytest.raises(OSError):
        write_folder_atomic(tmp_path / "model", fail_half_way)
    assert (tmp_path / "model" / "config.json").read_text() == "old"
    write_folder_atomic(tmp_path / "model", lambda path: (path / "config.json").write_text("new"))
    assert (tmp_path / "model" / "config.json").read_text() == "new"
    assert (tmp_path / "model" / "README.md").read_text() == "mine"  # other files left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_folder_lock_makes_a_second_holder_wait(tmp_path):
    events = []
    entered = threading.Event()

    def second():
        with lock_folder(tmp_path / "data"):
            events.append("second")

    with lock_folder(tmp_path / "data"):
        thread = threading.Thread(target=lambda: (entered.set(), second()))
        thread.start()
        entered.wait()
        time.sleep(0.2)
        events.append("first")
    thread.join(timeout=10)
    assert events == ["first", "second"]
