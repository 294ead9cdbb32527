"""Run logs read back: TensorBoard through its own EventAccumulator, wandb offline runs through
their record files, with every record at its step, after a resume too."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from gpt_fn import runlog
from gpt_fn.rundir import read_metrics

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
    first = runlog.open_run_logs(["tensorboard"], tmp_path, settings=SETTINGS)
    for record in _records(range(5)):  # steps 3 and 4 come after the checkpoint at 3
        first[0].record(record)
    first[0].text("sample", "ROMEO:\nhello", 4)
    first[0].close()
    resumed = runlog.open_run_logs(
        ["tensorboard"], tmp_path, settings=SETTINGS, history=_records(range(3))
    )
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
    assert events.PluginTagToContent("hparams")  # the settings as TensorBoard's hparams


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
    first = runlog.open_run_logs(["wandb"], tmp_path, settings=SETTINGS, project="p", name="n")
    for record in _records(range(5)):
        first[0].record(record)
    first[0].text("sample", "ROMEO:\nhello", 4)
    first[0].close()
    run_id = (tmp_path / runlog.WANDB_ID_FILE).read_text().strip()
    time.sleep(1.1)  # wandb names an offline run's folder by the second it starts in
    resumed = runlog.open_run_logs(
        ["wandb"], tmp_path, settings=SETTINGS, history=_records(range(3))
    )
    for record in _records(range(3, 6)):
        resumed[0].record(record)
    resumed[0].close()
    wandb.teardown()  # its service process writes the files: wait until it has

    history, ids = _wandb_history(tmp_path)
    assert ids == {run_id}  # the resumed process continued the same run
    assert sorted(history) == list(range(6))
    for record in _records(range(6)):
        step = history[record["step"]]
        assert step["loss"] == record["loss"] and math.isclose(step["lr"], record["lr"])
    assert history[4]["sample"] == "ROMEO:\nhello"


# --- gpt-fn train --log ---------------------------------------------------------------------

KILL_PAST_THE_CHECKPOINT = """
import os, signal, sys
from gpt_fn import cli, rundir
append = rundir.RunDir.append_metrics
def append_then_die(self, record):
    append(self, record)
    if record["step"] == 5:  # steps 4 and 5 run past the checkpoint at step 4
        os.kill(os.getpid(), signal.SIGKILL)
rundir.RunDir.append_metrics = append_then_die
cli.main(sys.argv[1:])
"""
# Fields whose values a resumed run repeats exactly (the timing fields are measured anew).
EXACT = ("loss", "lr", "muon_lr", "grad_norm", "val_loss", "val_bpb", "choices_acc", "text_bpb")


def test_train_logs_every_record_to_both_after_a_kill_and_resume(corpus, tmp_path):
    out = tmp_path / "run"
    items = tmp_path / "items.jsonl"
    items.write_text('{"ctx": "ROMEO:", "endings": ["But, soft!", "Hello"], "label": 0}\n')
    args = [
        "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}", f"--out-dir={out}",
        "--preset=cpu-tiny", "--n-layer=1", "--n-embd=32", "--block-size=16",
        "--batch-size=4", "--eval-batches=1", "--sample-tokens=4", "--max-steps=8",
        "--eval-interval=2", "--sample-every=2", "--log=tensorboard", "--log=wandb",
        f"--eval-choices={items}", f"--eval-text={corpus}",
    ]  # fmt: skip
    # Not this process's wandb service (WANDB_SERVICE, set by the tests above): each run
    # starts its own, as a user's would.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONPATH=str(Path.cwd())
    )
    killed = subprocess.run(
        [sys.executable, "-c", KILL_PAST_THE_CHECKPOINT, *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run(
        [sys.executable, "-m", "gpt_fn", "train", f"--out-dir={out}", "--resume"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "wandb: logging to" in resumed.stdout + resumed.stderr  # the run folder is named

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(8))
    assert "choices_acc" in records[1] and "text_bpb" in records[1]
    tensorboard = _tensorboard_scalars(out / runlog.TENSORBOARD_DIR)
    history, ids = _wandb_history(out)
    assert len(ids) == 1 and sorted(history) == list(range(9))  # the final sample at step 8
    for record in records:
        step = record["step"]
        for key in runlog.scalars(record):
            assert set(tensorboard[key]) >= {step}
            assert key in history[step]
            if key in EXACT:
                assert tensorboard[key][step] == pytest.approx(record[key], rel=1e-6)
                assert history[step][key] == pytest.approx(record[key], rel=1e-12)
    for key, steps in tensorboard.items():  # each step once: the killed tail was purged
        assert sorted(steps) == sorted({r["step"] for r in records if key in r})
    # Samples are texts, not records: the resumed process's are there (a killed one's may not).
    assert all("sample" in history[step] for step in (6, 8))
