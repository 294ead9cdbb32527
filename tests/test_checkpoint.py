"""Checkpoints round-trip exactly, are written atomically, and bad files give clear errors."""

import os

import pytest
import torch

from gpt_fn import init_params
from gpt_fn.checkpoint import (
    FILENAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
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
