"""Stateless learning-rate schedules, AdamW, Muon, partition and gradient clipping (optax style).

from gpt_fn import optim
opt = optim.adamw(optim.warmup_cosine(6e-4, 6e-5, warmup_steps=10, decay_steps=50))
state = opt.init(params)
grads, norm = optim.clip_by_global_norm(grads, 1.0)
params, state = opt.update(grads, state, params)     # pure; opt.update_ writes in place

opt = optim.gpt_muon_adamw(optim.muon(0.02, split_fused=optim.FUSED_QKV), optim.adamw(6e-4))

An optimizer is written once, as a `Step` whose elementwise ops go through an `Each`;
`from_step` makes its pure `update` and in-place `update_` from it (`optim/stateless.py`).
"""

from gpt_fn.optim.adamw import DecayMask, adamw, default_decay_mask
from gpt_fn.optim.clipping import clip_by_global_norm, clip_by_global_norm_, global_norm
from gpt_fn.optim.loss_scale import (
    LossScaleState,
    loss_scale_init,
    unscale_,
    update_loss_scale_,
)
from gpt_fn.optim.muon import FUSED_QKV, adjusted_lr, muon, newton_schulz
from gpt_fn.optim.partition import Label, gpt_muon_adamw, gpt_muon_label, partition
from gpt_fn.optim.per_example import per_example_grads
from gpt_fn.optim.schedules import (
    Schedule,
    constant,
    cosine_decay,
    join,
    linear_warmup,
    warmup_cosine,
)
from gpt_fn.optim.stateless import Each, Optimizer, OptState, Step, from_step

__all__ = [
    "DecayMask",
    "Each",
    "FUSED_QKV",
    "Label",
    "OptState",
    "Optimizer",
    "Schedule",
    "Step",
    "adamw",
    "adjusted_lr",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "constant",
    "cosine_decay",
    "default_decay_mask",
    "from_step",
    "global_norm",
    "gpt_muon_adamw",
    "gpt_muon_label",
    "join",
    "linear_warmup",
    "LossScaleState",
    "loss_scale_init",
    "muon",
    "newton_schulz",
    "partition",
    "per_example_grads",
    "unscale_",
    "update_loss_scale_",
    "warmup_cosine",
]
