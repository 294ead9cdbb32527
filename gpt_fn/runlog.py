"""Run logs where researchers read them: Weights & Biases and TensorBoard, next to metrics.jsonl.

`metrics.jsonl` is always written (`gpt_fn.rundir`); `open_run_logs(["wandb", "tensorboard"],
...)` adds sinks that receive every record the training loop appends there, at its step:

- every numeric field as a scalar (`loss`, `lr`, `grad_norm`, `tokens_per_s`, `mfu`,
  `val_loss`, `val_bpb`, eval scores, ...), booleans as 0/1, so `loss.png`'s curves come free
  in both UIs;
- the run's settings once, as wandb's config and TensorBoard's hparams (plus a text table);
- sample texts at their step (`text(name, value, step)`).

Resuming continues the same run: wandb with the id the run folder keeps (`resume="allow"`),
TensorBoard in the same folder. Both buffer what they are given (wandb in its own process),
so a process killed with `kill -9` may take its last records with it; a resumed run therefore
logs again every record before its step from `metrics.jsonl` (`history=`), which is complete
up to the checkpoint. TensorBoard drops what the earlier processes logged (`purge_step=0`:
every step comes from one writer); wandb keeps the first value it saw at a step, and the
records logged again are the same ones. Neither UI shows a duplicate or a missing step.

Both are optional extras: `pip install -e ".[wandb]"` / `".[tensorboard]"`.
`check_available(kinds)` says which extra is missing in one line, before a run starts.
wandb follows its own environment: `WANDB_MODE=offline` logs without a network into
`OUT/wandb/`, and `wandb sync OUT/wandb/offline-run-*` uploads it later.
"""

import importlib.util
import json
import math
import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

LOGGERS = ("wandb", "tensorboard")
"""The sinks `--log` may name (repeatable)."""
WANDB_ID_FILE = "wandb-run-id"
"""In the run folder: the wandb run's id, so a resumed run continues it."""
TENSORBOARD_DIR = "tensorboard"


class RunLogError(RuntimeError):
    """A run log was asked for but cannot be written (its extra is missing, or it failed)."""


@runtime_checkable
class RunLog(Protocol):
    name: str
    """`"wandb"` or `"tensorboard"`."""
    where: str
    """The folder it writes (wandb's run folder, TensorBoard's log dir)."""

    def record(self, record: Mapping[str, Any]) -> None:
        """One `metrics.jsonl` record, at `record["step"]`."""

    def text(self, name: str, value: str, step: int) -> None:
        """A text (a sample) at `step`."""

    def close(self) -> None: ...


def check_available(kinds: Sequence[str]) -> None:
    """`RunLogError` in one line naming the extra to install, for the first missing sink."""
    for kind in kinds:
        if kind not in LOGGERS:
            raise RunLogError(f"unknown run log {kind!r}: choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(kind) is None:
            raise RunLogError(
                f'--log {kind} needs the {kind} package: pip install -e ".[{kind}]" '
                f"(or pip install {kind})"
            )


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The fields of `record` a UI plots: numbers (booleans as 0/1), finite or not; not `step`."""
    out = {}
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float):  # bool is an int: 0/1
            out[key] = float(value)
    return out


def open_run_logs(
    kinds: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    settings: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] = (),
    project: str | None = None,
    name: str | None = None,
) -> list[RunLog]:
    """One sink per kind in `kinds` for the run in `out_dir`.

    `settings`: the run's settings (JSON-able), logged once. `history`: a resumed run's records
    before its step (`metrics.jsonl`), logged again (see the module docstring); empty for a new
    run. `project`/`name`: wandb's project (default `gpt-fn`) and display name (default: the
    folder's name); TensorBoard ignores them.
    """
    check_available(kinds)
    out = Path(out_dir)
    logs: list[RunLog] = []
    try:
        for kind in dict.fromkeys(kinds):
            if kind == "wandb":
                logs.append(_WandbLog(out, settings, project=project, name=name))
            else:
                logs.append(_TensorBoardLog(out, settings, resumed=bool(history)))
            for record in history:
                logs[-1].record(record)
    except Exception as error:
        for log in logs:
            log.close()
        if isinstance(error, RunLogError):
            raise
        raise RunLogError(f"could not open the {kind} run log: {error}") from error
    return logs


def _new_run_id() -> str:
    """A run id as wandb makes them: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class _WandbLog:
    name = "wandb"

    def __init__(
        self, out: Path, settings: Mapping[str, Any], *, project: str | None, name: str | None
    ) -> None:
        import wandb

        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()
        self.run = wandb.init(
            project=project or "gpt-fn",
            name=name or out.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=dict(settings),
            settings=wandb.Settings(silent=True, console="off"),
        )
        id_file.write_text(run_id + "\n")
        self.where = str(Path(self.run.dir).parent)  # the run folder (`wandb sync` takes it)

    def record(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def text(self, name: str, value: str, step: int) -> None:
        self.run.log({name: value}, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoardLog:
    name = "tensorboard"

    def __init__(self, out: Path, settings: Mapping[str, Any], *, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(
            log_dir=str(out / TENSORBOARD_DIR), purge_step=0 if resumed else None
        )
        self.where = self.writer.log_dir
        table = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in settings.items())
        self.writer.add_text("settings", "| setting | value |\n| --- | --- |\n" + table, 0)
        kept = {
            k: v
            for k, v in settings.items()
            if isinstance(v, bool | int | float | str)
            and not (isinstance(v, float) and not math.isfinite(v))
        }
        experiment, start, end = hparams(kept, {"val_loss": math.nan})
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)

    def record(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def text(self, name: str, value: str, step: int) -> None:
        # TensorBoard renders text as markdown: a fenced block keeps the sample's lines.
        self.writer.add_text(name, "```\n" + value + "\n```", step)

    def close(self) -> None:
        self.writer.close()
