"""A model from one of its sources: a gpt_fn checkpoint, GPT-2 weights, or a preset's random init.

    model = load_model(checkpoint="out")            # what `gpt-fn train` saved
    model = load_model(hf="path/to/gpt2")           # a Hugging Face GPT-2 directory or hub name
    model = load_model(preset="cpu-tiny")           # fresh weights, `init_params(config, seed)`
    logits = forward(model.params, tokens, model.config)

What the `gpt-fn` commands (`sample`, `eval`, `inspect`, `export`, `sae`), `train --init-from`
and the lm-eval model (`gpt_fn.harness`) load, through this one function.
"""

import os
from typing import NamedTuple

import torch

from gpt_fn import hf as hf_io
from gpt_fn.checkpoint import load_checkpoint
from gpt_fn.config import GPTConfig
from gpt_fn.model import init_params
from gpt_fn.shapes import Params


class LoadedModel(NamedTuple):
    """Params and config of a loaded model, and the training step of a checkpoint's."""

    params: Params
    config: GPTConfig
    step: int | None
    """The checkpoint's step; None for GPT-2 weights and a preset's init."""


def load_model(
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    hf: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The model of exactly one source, its params on `device`.

    `checkpoint`: a gpt_fn checkpoint file or run folder (`gpt_fn.checkpoint.load_checkpoint`,
    verified). `hf`: a Hugging Face GPT-2 directory or hub name (`gpt_fn.hf.load`). `preset`:
    a `GPTConfig` preset's random init from `seed`. Errors name the bad source (`ValueError`,
    `OSError`).
    """
    given = {
        name: value
        for name, value in (("checkpoint", checkpoint), ("hf", hf), ("preset", preset))
        if value is not None
    }
    if len(given) != 1:
        raise ValueError(
            "load_model takes exactly one of checkpoint=, hf= and preset=, got "
            + (", ".join(f"{name}=" for name in given) or "none")
        )
    step = None
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint)
        params, config, step = saved.params, saved.model_config, saved.step
    elif hf is not None:
        params, config = hf_io.load(hf)
    else:
        assert preset is not None
        config = GPTConfig.from_preset(preset)
        params = init_params(config, seed=seed)
    return LoadedModel({name: value.to(device) for name, value in params.items()}, config, step)
