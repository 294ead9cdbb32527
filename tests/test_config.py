import pytest
from jaxtyping import TypeCheckError

from gpt_fn import PRESETS, GPTConfig
from gpt_fn.shapes import shape_checks


def test_gpt2_presets_match_the_published_sizes():
    sizes = {name: (c.n_layer, c.n_head, c.n_embd) for name, c in PRESETS.items()}
    assert sizes["gpt2"] == (12, 12, 768)
    assert sizes["gpt2-medium"] == (24, 16, 1024)
    assert sizes["gpt2-large"] == (36, 20, 1280)
    assert sizes["gpt2-xl"] == (48, 25, 1600)
    assert all(
        PRESETS[n].vocab_size == 50257 and PRESETS[n].block_size == 1024
        for n in sizes
        if n.startswith("gpt2")
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_embd": 10, "n_head": 3}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive int"),
        ({"vocab_size": -1}, "vocab_size must be a positive int"),
        ({"block_size": True}, "block_size must be a positive int"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
        ({"layer_norm_eps": float("inf")}, "layer_norm_eps must be a finite number, got inf"),
        ({"dropout": float("nan")}, "dropout must be a finite number, got nan"),
    ],
)
def test_invalid_config_raises_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"bias": "no"}, "GPTConfig.bias must be a bool"),
        ({"n_layer": 2.0}, "GPTConfig.n_layer must be a positive int, got 2.0"),
        ({"n_embd": "768"}, "GPTConfig.n_embd must be a positive int, got '768'"),
        ({"dropout": "0.1"}, "GPTConfig.dropout must be a finite number, got '0.1'"),
    ],
)
def test_fields_of_the_wrong_kind_raise_naming_the_field(fields, message):
    with pytest.raises(TypeCheckError, match=f"parameter '{next(iter(fields))}'"):
        GPTConfig(**fields)  # the shape checker, under pytest, sees the annotation first
    with shape_checks(False), pytest.raises(ValueError, match=message):
        GPTConfig(**fields)  # what users without it get


def test_from_preset_overrides_and_rejects_unknown_names():
    assert GPTConfig.from_preset("gpt2", block_size=256).block_size == 256
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")


def test_dict_round_trip_and_unknown_fields():
    config = GPTConfig.from_preset("cpu-tiny")
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**config.to_dict(), "n_ctx": 3})
