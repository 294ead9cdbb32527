"""Checkpoints round-trip exactly, are written atomically, and bad files give clear errors."""

import dataclasses
import os
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt_fn
from gpt_fn import init_params
from gpt_fn.checkpoint import (
    FILENAME,
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    KeepSchedule,
    load_checkpoint,
    load_series,
    read_checkpoint_info,
    save_checkpoint,
    save_sharded_checkpoint,
    series_path,
    series_steps,
    tensors_sha256,
)


def _checkpoint(config, step=7):
    params = init_params(config, seed=0)
    state = {
        "step": torch.tensor(step),
        **{f"m.{k}": torch.randn_like(v) for k, v in params.items()},
    }
    return Checkpoint(params, state, step, config, {"lr": 3e-4, "seed": 1})


def test_round_trip_is_exact(tmp_path, tiny_config):
    saved = _checkpoint(tiny_config)
    path = save_checkpoint(tmp_path, saved)
    assert path == tmp_path / FILENAME
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 7 and loaded.model_config == tiny_config
    assert loaded.train_settings == {"lr": 3e-4, "seed": 1}
    for saved_part, loaded_part in (
        (saved.params, loaded.params),
        (saved.optimizer_state, loaded.optimizer_state),
    ):
        assert saved_part.keys() == loaded_part.keys()
        assert all(torch.equal(saved_part[k], loaded_part[k]) for k in saved_part)


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, tiny_config, monkeypatch):
    save_checkpoint(tmp_path, _checkpoint(tiny_config, step=3))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _checkpoint(tiny_config, step=4))
    assert load_checkpoint(tmp_path).step == 3
    assert os.listdir(tmp_path) == [FILENAME]  # no temporary file left behind


def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path, _checkpoint(tiny_config))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_missing_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")
    import safetensors.torch

    foreign = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a gpt_fn checkpoint"):
        load_checkpoint(foreign)


def test_a_flipped_data_byte_is_caught_by_the_checksum(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path, _checkpoint(tiny_config))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data, past the JSON header
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt: its tensors do not match the sha256"):
        load_checkpoint(path)


def test_params_that_do_not_fit_the_recorded_config_are_named(tmp_path, tiny_config):
    checkpoint = _checkpoint(tiny_config)
    missing = {k: v for k, v in checkpoint.params.items() if k != "ln_f.bias"}
    save_checkpoint(tmp_path / "missing", checkpoint._replace(params=missing))
    with pytest.raises(CheckpointError, match="missing 1 key.*'ln_f.bias'"):
        load_checkpoint(tmp_path / "missing")
    extra = {**checkpoint.params, "lm_head.weight": checkpoint.params["wte.weight"].clone()}
    save_checkpoint(tmp_path / "extra", checkpoint._replace(params=extra))
    with pytest.raises(CheckpointError, match="unexpected key.*'lm_head.weight'"):
        load_checkpoint(tmp_path / "extra")


def test_non_finite_params_are_never_written(tmp_path, tiny_config):
    save_checkpoint(tmp_path, _checkpoint(tiny_config, step=3))
    bad = _checkpoint(tiny_config, step=4)
    bad.params["h.0.mlp.c_fc.weight"][0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite params: 'h.0.mlp.c_fc.weight'"):
        save_checkpoint(tmp_path, bad)
    assert load_checkpoint(tmp_path).step == 3


def test_metadata_reads_without_the_tensors(tmp_path, tiny_config):
    save_checkpoint(tmp_path, _checkpoint(tiny_config, step=9))
    info = read_checkpoint_info(tmp_path)
    assert (info.step, info.model_config, info.train_settings["seed"]) == (9, tiny_config, 1)


# --- checkpoint series ----------------------------------------------------------------------


def test_keep_schedules_keep_log_spaced_steps_every_n_and_the_last():
    assert KeepSchedule.parse("log").steps(0, 40) == [1, 2, 4, 8, 16, 32, 40]
    assert KeepSchedule.parse("every:10").steps(0, 35) == [10, 20, 30, 35]
    both = KeepSchedule.parse("log+every:10")
    assert both == KeepSchedule.parse("every:10+log") == KeepSchedule(log=True, every=10)
    assert both.steps(0, 40) == [1, 2, 4, 8, 10, 16, 20, 30, 32, 40]
    assert both.steps(16, 40) == [20, 30, 32, 40]  # a resumed run keeps the steps it takes


@given(st.integers(1, 2**40))
def test_log_schedule_keeps_exactly_the_powers_of_two(step):
    assert (step in KeepSchedule(log=True)) == (step == 2 ** (step.bit_length() - 1))


@pytest.mark.parametrize(
    "spec",
    ["", "every", "every:0", "every:-1", "every:x", "log+log", "lin", "log+", "every:2+every:3"],
)
def test_a_bad_keep_spec_is_one_clear_error(spec):
    with pytest.raises(ValueError, match="not one of every:N"):
        KeepSchedule.parse(spec)


def _series(tmp_path, config, steps):
    """A run folder keeping a checkpoint of each of `steps`, params drifting with the step."""
    base = init_params(config, seed=0)
    for step in steps:
        params = {k: v + 0.01 * step * torch.randn_like(v) for k, v in base.items()}
        save_checkpoint(series_path(tmp_path, step), Checkpoint(params, {}, step, config, {}))
    return tmp_path


def test_series_stacks_the_kept_checkpoints_along_a_step_axis(tmp_path, tiny_config):
    run = _series(tmp_path, tiny_config, [4, 1, 2])
    (run / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert series_steps(run) == [1, 2, 4]
    series = load_series(run)
    assert series.steps == [1, 2, 4] and series.model_config == tiny_config
    for i, step in enumerate(series.steps):
        single = load_checkpoint(series_path(run, step)).params
        assert all(torch.equal(series.params[k][i], single[k]) for k in single)
    picked = load_series(run, steps=[4, 1])
    assert picked.steps == [4, 1] and torch.equal(
        picked.params["wte.weight"][1], series.params["wte.weight"][0]
    )


def test_vmapped_analysis_of_a_series_equals_a_loop_over_its_checkpoints(tmp_path, tiny_config):
    run = _series(tmp_path, tiny_config, [1, 2, 4, 8])
    series = load_series(run)
    tokens = torch.randint(
        0, tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    names = ["h.1.attn.pattern", "h.0.resid_post", "ln_f.scale"]

    def analyse(params):
        return gpt_fn.run_with_cache(params, tokens, tiny_config, names=names, attention="manual")

    logits, cache = torch.func.vmap(analyse)(series.params)
    assert logits.shape == (4, 2, 9, tiny_config.vocab_size)
    for i, step in enumerate(series.steps):
        one_logits, one_cache = analyse(load_checkpoint(series_path(run, step)).params)
        # vmap batches the same fp32 ops along a new axis; the issue allows 1e-6, and the
        # batched matmuls may sum in another order, so a few ulps of these O(1) values.
        torch.testing.assert_close(logits[i], one_logits, atol=1e-6, rtol=0)
        for name in names:
            torch.testing.assert_close(cache[name][i], one_cache[name], atol=1e-6, rtol=0)


def test_an_empty_or_mixed_series_and_a_missing_step_are_named(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="no kept checkpoints .* --keep-checkpoints"):
        load_series(tmp_path)
    run = _series(tmp_path, tiny_config, [1, 2])
    with pytest.raises(
        CheckpointError, match=r"no checkpoint of steps \[3\]; it keeps steps \[1, 2\]"
    ):
        load_series(run, steps=[1, 3])
    wider = dataclasses.replace(tiny_config, n_embd=30)
    save_checkpoint(series_path(run, 4), Checkpoint(init_params(wider, seed=0), {}, 4, wider, {}))
    with pytest.raises(CheckpointError, match="step 4 is of another model config"):
        load_series(run)


def test_an_empty_list_of_steps_is_refused_in_its_own_words(tmp_path, tiny_config):
    run = _series(tmp_path, tiny_config, [1, 2])
    with pytest.raises(CheckpointError, match=r"steps is empty: .* kept steps \[1, 2\]"):
        load_series(run, steps=[])


def test_a_changed_metadata_byte_is_caught_by_the_checksum(tmp_path, tiny_config):
    path = save_checkpoint(tmp_path, _checkpoint(tiny_config))
    raw = path.read_bytes()
    assert raw.count(b'seed\\": 1') == 1  # the settings are JSON inside the JSON header
    path.write_bytes(raw.replace(b'seed\\": 1', b'seed\\": 2'))
    for read in (load_checkpoint, read_checkpoint_info):
        with pytest.raises(CheckpointError, match="corrupt: its metadata .* does not match"):
            read(path)


def test_a_v2_checkpoint_still_loads_with_its_tensors_checked(tmp_path, tiny_config):
    import json

    import safetensors.torch

    saved = _checkpoint(tiny_config)
    tensors = {f"params/{k}": v for k, v in saved.params.items()}
    metadata = {
        "format": "gpt_fn-checkpoint-v2",
        "step": "7",
        "model_config": json.dumps(tiny_config.to_dict()),
        "train_settings": json.dumps(saved.train_settings),
        "sha256": tensors_sha256(tensors),
    }
    safetensors.torch.save_file(tensors, tmp_path / FILENAME, metadata=metadata)
    assert load_checkpoint(tmp_path).step == 7
    metadata["sha256"] = "0" * 64
    safetensors.torch.save_file(tensors, tmp_path / FILENAME, metadata=metadata)
    with pytest.raises(CheckpointError, match="tensors do not match the sha256"):
        load_checkpoint(tmp_path)


def test_params_of_mixed_dtypes_are_named(tmp_path, tiny_config):
    checkpoint = _checkpoint(tiny_config)
    mixed = {**checkpoint.params, "ln_f.bias": checkpoint.params["ln_f.bias"].double()}
    save_checkpoint(tmp_path, checkpoint._replace(params=mixed))
    with pytest.raises(CheckpointError, match="'ln_f.bias' has dtype torch.float64"):
        load_checkpoint(tmp_path)


def test_an_unreadable_checkpoint_is_not_called_missing(tiny_config):
    # Root reads any file: check as an unprivileged user (seteuid is undone in `finally`), in
    # a folder that user may enter (pytest's tmp_path is root's alone).
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        path = save_checkpoint(folder, _checkpoint(tiny_config))
        path.chmod(0)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: Permission"):
                load_checkpoint(path)
        finally:
            if as_root:
                os.seteuid(0)


def test_a_full_disk_keeps_the_old_checkpoint_and_says_so(tmp_path, tiny_config, file_size_limit):
    path = save_checkpoint(tmp_path, _checkpoint(tiny_config, step=3))
    with (
        file_size_limit(path.stat().st_size // 2),
        pytest.raises(CheckpointWriteError, match="File too large.*disk full.*is kept"),
    ):
        save_checkpoint(tmp_path, _checkpoint(tiny_config, step=4))
    assert load_checkpoint(tmp_path).step == 3
    assert os.listdir(tmp_path) == [FILENAME]


def test_a_sharded_checkpoints_metadata_is_checksummed_too(tmp_path, tiny_config):
    save_sharded_checkpoint(tmp_path, _checkpoint(tiny_config, step=5), rank=0)
    meta = tmp_path / "checkpoint.dcp" / "gpt_fn.json"
    assert read_checkpoint_info(tmp_path).step == 5
    meta.write_text(meta.read_text().replace('"step": "5"', '"step": "6"'))
    with pytest.raises(CheckpointError, match="corrupt: its metadata .* does not match"):
        read_checkpoint_info(tmp_path)
