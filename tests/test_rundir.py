"""The run folder: one run at a time, no accidental overwrite, strict and crash-tolerant metrics."""

import json
import math

import pytest

from gpt_fn.rundir import RunDir, RunDirError, read_metrics


def test_a_second_process_cannot_take_the_lock(tmp_path):
    # A second open file description of the same lock, as another process would hold.
    with (
        RunDir(tmp_path / "run").lock(),
        pytest.raises(RunDirError, match="in use by another run \\(pid \\d+\\)"),
        RunDir(tmp_path / "run").lock(),
    ):
        pass
    with RunDir(tmp_path / "run").lock():  # released when the first run ended
        pass


def test_an_out_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with (
        pytest.raises(RunDirError, match="is a file, not a folder"),
        RunDir(tmp_path / "out").lock(),
    ):
        pass


def test_a_folder_holding_a_run_is_not_overwritten_without_being_told(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.append_metrics({"step": 0, "loss": 1.0})
    with pytest.raises(RunDirError, match="--resume to continue it, or --overwrite"):
        run_dir.start_fresh(overwrite=False)
    assert run_dir.metrics.exists()
    run_dir.start_fresh(overwrite=True)
    assert not run_dir.metrics.exists()


def test_metrics_are_strict_json_with_nan_as_null(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.append_metrics({"step": 0, "loss": math.nan, "mfu": math.inf})

    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")

    line = run_dir.metrics.read_text()
    assert json.loads(line, parse_constant=no_constants) == {"step": 0, "loss": None, "mfu": None}


def test_a_torn_last_line_is_dropped_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 0, "loss": 2.0}]
    path.write_text('{"step": 0, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl, line 2: not a metrics record"):
        read_metrics(path)


def test_temporaries_of_a_killed_save_are_removed(tmp_path):
    stale = tmp_path / ".checkpoint.safetensors.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("mine")
    assert RunDir(tmp_path).clean() == [stale]
    assert not stale.exists() and unrelated.exists()


def _log(run_dir: RunDir, steps: range) -> None:
    for step in steps:
        run_dir.append_metrics({"step": step, "loss": 1.0 + step / 1000, "note": "x" * 40})


def test_truncating_the_log_is_atomic(tmp_path, file_size_limit):
    run_dir = RunDir(tmp_path)
    _log(run_dir, range(60))
    before = run_dir.metrics.read_bytes()
    # A write that fails half-way (a full disk) must leave the whole old log, never a cut one.
    with file_size_limit(len(before) // 4), pytest.raises(OSError):
        run_dir.truncate_metrics(50)
    assert run_dir.metrics.read_bytes() == before
    assert run_dir.truncate_metrics(50) == []
    assert [r["step"] for r in run_dir.read_metrics()] == list(range(50))


def test_a_log_that_ends_before_the_checkpoint_is_refused(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.metrics.write_bytes(b"")  # a rewrite killed before it wrote anything
    with pytest.raises(
        RunDirError, match="holds no step, but the checkpoint is at step 4.*--allow"
    ):
        run_dir.truncate_metrics(4)
    _log(run_dir, range(2))
    with pytest.raises(RunDirError, match="ends at step 1, but .* with steps 2 to 3 missing"):
        run_dir.truncate_metrics(4)
    assert run_dir.truncate_metrics(4, allow_missing=True) == [2, 3]
    assert [r["step"] for r in run_dir.read_metrics()] == [0, 1]
    _log(run_dir, range(4, 6))  # resumed with the gap allowed: later resumes go on
    assert run_dir.truncate_metrics(6) == []


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b'{"step": 0}\n{"step": "x"}\n', "line 2: .*its step is 'x'"),
        (b'{"step": 0}\n{"step": -1}\n', "line 2: .*its step is -1"),
        (b'{"step": 0}\n{"step": 1, "note": "\xff"}\n', "line 2: not UTF-8"),
    ],
)
def test_bad_steps_and_bytes_are_named_with_the_file_and_line(tmp_path, content, pattern):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with pytest.raises(RunDirError, match=f"metrics.jsonl, {pattern}"):
        read_metrics(path)
