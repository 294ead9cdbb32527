"""Tests for gpt_fn.loading: one function loads a model from each of its sources."""

import pytest
import torch

from gpt_fn import GPTConfig, hf, init_params
from gpt_fn.checkpoint import Checkpoint, save_checkpoint
from gpt_fn.loading import load_model


def _assert_same(params, expected):
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(params[name], value), name


def test_a_checkpoint_loads_its_params_config_and_step(tmp_path, tiny_config):
    params = init_params(tiny_config, seed=3)
    save_checkpoint(tmp_path, Checkpoint(params, {}, 7, tiny_config, {}))
    model = load_model(checkpoint=tmp_path)
    _assert_same(model.params, params)
    assert model.config == tiny_config and model.step == 7


def test_gpt2_weights_load_as_gpt_fn_hf_reads_them(tmp_path):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    hf.save(init_params(config, seed=4), config, tmp_path / "hf")
    model = load_model(hf=str(tmp_path / "hf"))
    expected, expected_config = hf.load(tmp_path / "hf")
    _assert_same(model.params, expected)
    assert model.config == expected_config and model.step is None


def test_a_preset_is_its_random_init_from_the_seed():
    model = load_model(preset="cpu-tiny", seed=5)
    config = GPTConfig.from_preset("cpu-tiny")
    _assert_same(model.params, init_params(config, seed=5))
    assert model.config == config and model.step is None


@pytest.mark.parametrize(
    ("sources", "pattern"),
    [
        ({}, "exactly one of checkpoint=, hf= and preset=, got none"),
        ({"hf": "x", "preset": "cpu-tiny"}, "got hf=, preset="),
        ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
    ],
)
def test_anything_but_one_known_source_is_named(sources, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_model(**sources)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at .*no-such-run"):  # CheckpointError
        load_model(checkpoint=tmp_path / "no-such-run")
