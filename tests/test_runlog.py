"""Run logs read back: TensorBoard through its own EventAccumulator, wandb offline runs through
their record files, with every record at its step, after a resume too."""

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from gpt_fn import runlog

SETTINGS = {"lr": 0.001, "batch_size": 4, "compile": None, "data": "c.txt"}


def _records(steps):
    return [
        {"step": s, "loss": 5.0 - s, "lr": 1e-3 * (s + 1), "skipped": s == 2, "note": "x"}
        for s in steps
    ]


def test_scalars_keep_numbers_and_booleans():
    assert runlog.scalars({"step": 3, "loss": 2.5, "skipped": True, "note": "x", "n": 4}) == {
        "loss": 2.5,
        "skipped": 1.0,
        "n": 4.0,
    }


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(runlog.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(runlog.RunLogError, match=r'pip install -e "\.\[tensorboard\]"'):
        runlog.check_available(["tensorboard"])
    with pytest.raises(runlog.RunLogError, match="unknown run log 'mlflow'"):
        runlog.check_available(["mlflow"])


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_record_at_its_step_after_a_resume(tmp_path):
    first = runlog.open_run_logs(["tensorboard"], tmp_path, settings=SETTINGS, start_step=0)
    for record in _records(range(5)):  # steps 3 and 4 come after the checkpoint at 3
        first[0].record(record)
    first[0].text("sample", "ROMEO:\nhello", 4)
    first[0].close()
    resumed = runlog.open_run_logs(["tensorboard"], tmp_path, settings=SETTINGS, start_step=3)
    for record in _records(range(3, 6)):
        resumed[0].record(record)
    resumed[0].close()

    scalars = _tensorboard_scalars(tmp_path / runlog.TENSORBOARD_DIR)
    assert set(scalars) == {"loss", "lr", "skipped"}
    assert scalars["loss"] == {s: 5.0 - s for s in range(6)}  # once per step, none missing
    assert scalars["skipped"][2] == 1.0
    events = EventAccumulator(str(tmp_path / runlog.TENSORBOARD_DIR))
    events.Reload()
    assert "settings" in " ".join(events.Tags()["tensors"])
    assert "hparams" in events.PluginTagToContent("hparams") or events.PluginTagToContent("hparams")


def _wandb_records(path: Path):
    """The records of a wandb run file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB
    blocks of records: crc32 (4), length (2, little-endian), type (1: full, 2/3/4: first,
    middle, last piece), payload), each payload a `wandb_internal_pb2.Record`."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(out: Path) -> tuple[dict[int, dict[str, object]], set[str]]:
    """Every logged step's values over all of the run's files, and the run ids seen; a value
    logged twice at a step must be the same both times."""
    history: dict[int, dict[str, object]] = {}
    ids = set()
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            if kind == "history":
                values = {}
                for item in record.history.item:
                    key = item.key or ".".join(item.nested_key)
                    if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                        values[key] = json.loads(item.value_json)
                step = history.setdefault(record.history.step.num, {})
                assert all(step[key] == value for key, value in values.items() if key in step)
                step.update(values)
    return history, ids


def test_wandb_offline_holds_every_record_at_its_step_after_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = runlog.open_run_logs(
        ["wandb"], tmp_path, settings=SETTINGS, start_step=0, project="p", name="n"
    )
    for record in _records(range(5)):
        first[0].record(record)
    first[0].text("sample", "ROMEO:\nhello", 4)
    first[0].close()
    run_id = (tmp_path / runlog.WANDB_ID_FILE).read_text().strip()
    resumed = runlog.open_run_logs(["wandb"], tmp_path, settings=SETTINGS, start_step=3)
    for record in _records(range(3, 6)):
        resumed[0].record(record)
    resumed[0].close()

    history, ids = _wandb_history(tmp_path)
    assert ids == {run_id}  # the resumed process continued the same run
    assert sorted(history) == list(range(6))
    for record in _records(range(6)):
        step = history[record["step"]]
        assert step["loss"] == record["loss"] and math.isclose(step["lr"], record["lr"])
    assert history[4]["sample"] == "ROMEO:\nhello"
