"""A training run's folder: its lock, its checkpoint, its metrics log and its loss plot.

    out/
      .lock                    held (flock) by the one process training into out/
      checkpoint.safetensors   params + optimizer state + step + settings (gpt_fn.checkpoint)
      checkpoint.dcp/          the same, sharded by an FSDP run (torch.distributed.checkpoint)
      metrics.jsonl            one JSON object per step (strict JSON: a NaN is written null)
      loss.png                 train and val loss against steps

A new run refuses a folder that holds one (`start_fresh`) unless told to overwrite it, so a
run is never erased by accident; two runs never write into one folder at once (`lock`). On
start, what a killed process left half-written is removed (`clean`), and a torn last line of
`metrics.jsonl` (the process died mid-write) is dropped; any other bad line is an error
naming the file and line. A resumed run cuts the log back to its checkpoint's step by an
atomic rewrite (`truncate_metrics`) and refuses a log that ends before that step.
"""

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt_fn.checkpoint import FILENAME, SHARDED, recover_sharded
from gpt_fn.files import remove_temporaries, write_atomic

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, one run per folder is up to the user
    fcntl = None

METRICS = "metrics.jsonl"
PLOT = "loss.png"
LOCK = ".lock"


class RunDirError(RuntimeError):
    """The run folder is in use, holds a run that must not be overwritten, or is unreadable."""


class RunDir:
    """The folder of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / FILENAME
        self.sharded_checkpoint = self.path / SHARDED
        self.metrics = self.path / METRICS
        self.plot = self.path / PLOT

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock for the block; `RunDirError` if another process holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out-dir {str(self.path)!r} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a+") as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise RunDirError(
                        f"{self.path} is in use by another run ({holder}); wait for it to "
                        "finish or pick another --out-dir"
                    ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()

    def holds_checkpoint(self) -> bool:
        return self.checkpoint.exists() or self.sharded_checkpoint.exists()

    def holds_run(self) -> bool:
        return self.holds_checkpoint() or self.metrics.exists()

    def start_fresh(self, *, overwrite: bool) -> None:
        """Make the folder ready for a new run: refuse one that holds a run unless `overwrite`."""
        if not self.holds_run():
            return
        if not overwrite:
            found = [
                p.name
                for p in (self.checkpoint, self.sharded_checkpoint, self.metrics)
                if p.exists()
            ]
            raise RunDirError(
                f"{self.path} already holds a run ({', '.join(found)}): pass --resume to "
                "continue it, or --overwrite to delete it and start a new one"
            )
        for path in (self.checkpoint, self.metrics, self.plot):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.sharded_checkpoint, ignore_errors=True)

    def clean(self) -> list[Path]:
        """Delete the temporary files a killed save left behind; returns what was removed."""
        return remove_temporaries(self.path, FILENAME) + recover_sharded(self.path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(_strict(record), allow_nan=False)
        with self.metrics.open("a") as f:
            f.write(line + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    def truncate_metrics(self, start_step: int, *, allow_missing: bool = False) -> list[int]:
        """Keep only steps before `start_step` (a resumed run logs the later ones again).

        The log is rewritten atomically: a kill mid-rewrite leaves the old log. A run logs
        each step before it saves the step's checkpoint, so its log reaches `start_step - 1`:
        one that ends earlier (cut short, emptied, deleted) raises `RunDirError` unless
        `allow_missing`. Returns the steps missing from its end.
        """
        records = self.read_metrics() if self.metrics.exists() else []
        kept = [r for r in records if r["step"] < start_step]
        last = max((r["step"] for r in kept), default=-1)
        missing = list(range(last + 1, start_step))
        if missing and not allow_missing:
            ends = f"ends at step {last}" if kept else "holds no step"
            raise RunDirError(
                f"{self.metrics} {ends}, but the checkpoint is at step {start_step}: the log was "
                "cut short or deleted; restore it, or pass --allow-changes to resume with steps "
                f"{missing[0]} to {missing[-1]} missing from it"
            )
        if records:
            lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept)
            write_atomic(self.metrics, lines.encode())
        return missing


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`; a torn last line (a killed write) is dropped."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RunDirError(f"{path}, line {line}: not UTF-8 text (byte {error.start})") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
            step = record["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"its step is {step!r}, not a whole number >= 0")
        except ValueError as error:
            if number == len(lines) and not text.endswith("\n"):
                break  # the process died while writing this line
            raise RunDirError(f"{path}, line {number}: not a metrics record ({error})") from None
        records.append(record)
    return records


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Train loss per step and val loss at evals, on one axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [r for r in records if r.get("loss") is not None]
    ax.plot([r["step"] + 1 for r in train], [r["loss"] for r in train], label="train", lw=1)
    evals = [r for r in records if r.get("val_loss") is not None]
    ax.plot([r["step"] + 1 for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="gpt_fn training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _strict(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with NaN/inf numbers as None: JSON has no NaN."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
