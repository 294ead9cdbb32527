"""Stateless learning-rate schedules, AdamW and gradient clipping (optax style).

from gpt_fn import optim
opt = optim.adamw(optim.warmup_cosine(6e-4, 6e-5, warmup_steps=10, decay_steps=50))
state = opt.init(params)
grads, norm = optim.clip_by_global_norm(grads, 1.0)
params, state = opt.update(grads, state, params)     # pure; opt.update_ writes in place
"""

from gpt_fn.optim.adamw import DecayMask, Optimizer, OptState, adamw, default_decay_mask
from gpt_fn.optim.clipping import clip_by_global_norm, clip_by_global_norm_, global_norm
from gpt_fn.optim.per_example import per_example_grads
from gpt_fn.optim.schedules import (
    Schedule,
    constant,
    cosine_decay,
    join,
    linear_warmup,
    warmup_cosine,
)

__all__ = [
    "DecayMask",
    "OptState",
    "Optimizer",
    "Schedule",
    "adamw",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "constant",
    "cosine_decay",
    "default_decay_mask",
    "global_norm",
    "join",
    "linear_warmup",
    "per_example_grads",
    "warmup_cosine",
]
