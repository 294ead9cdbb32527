"""AdamW as a stateless optimizer: `init(params) -> state`, `update(grads, state, params)`.

In the style of optax (`optax.adamw`): the optimizer is a pair of functions and its state is
a plain flat `dict[str, Tensor]` that a safetensors checkpoint stores as it is::

    {"step": int64 scalar (updates applied so far),
     "exp_avg.<param name>": first moment, "exp_avg_sq.<param name>": second moment}

The arithmetic is `torch.optim.AdamW`'s, operation for operation (Loshchilov & Hutter 2019,
"Decoupled Weight Decay Regularization"; torch `optim/adam.py`), so the two agree to the last
bit on CPU: decoupled decay `p *= 1 - lr * wd` first, `m.lerp_(g, 1 - beta1)`,
`v = v * beta2 + (1 - beta2) g^2`, then `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.

Two twins share that arithmetic: `update` is pure (new tensors, inputs untouched, usable under
torch.func); `update_` writes into the same param and moment tensors with `torch._foreach_*`
kernels, for the training loop. Weight decay applies to matrices only, decided by
`default_decay_mask` (nanoGPT `configure_optimizers`: weights and embeddings decay; biases and
LayerNorm gains do not).

Neither twin looks at the gradient values: the training loop checks the norm returned by
`clip_by_global_norm` and stops on inf/NaN before it calls `update_`.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from gpt_fn.checks import check_number
from gpt_fn.optim.schedules import Schedule, constant
from gpt_fn.shapes import Params

OptState = dict[str, Tensor]
"""Flat optimizer state: `"step"` plus one `"exp_avg.<name>"` and `"exp_avg_sq.<name>"` per param."""

DecayMask = Callable[[Params], dict[str, bool]] | Mapping[str, bool]
"""Which params get weight decay: a `name -> bool` mapping, or a function of the params giving one."""


class Optimizer(NamedTuple):
    """`init(params) -> state`; `update(grads, state, params) -> (params, state)`; `update_` in place."""

    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params], tuple[Params, OptState]]
    update_: Callable[[Params, OptState, Params], OptState]


def default_decay_mask(params: Params) -> dict[str, bool]:
    """Decay matrices (ndim >= 2: linear weights, embeddings), not biases or LayerNorm gains."""
    return {name: value.ndim >= 2 for name, value in params.items()}


def adamw(
    lr: float | Schedule,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    decay_mask: DecayMask | None = None,
) -> Optimizer:
    """AdamW equal to `torch.optim.AdamW` with a decay group (mask True) and a no-decay group.

    `lr` is a number or a schedule `step -> lr`, asked with the number of updates applied so
    far (0 for the first update), as a loop that sets `group["lr"] = schedule(step)` before
    `optimizer.step()` does. Defaults are nanoGPT's (betas 0.9/0.95, weight decay 0.1).
    """
    schedule = lr if callable(lr) else constant(lr)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (
        check_number(f"betas[{i}]", b, at_least=0.0, below=1.0) for i, b in enumerate(betas)
    )
    eps = check_number("eps", eps, at_least=0.0)
    weight_decay = check_number("weight_decay", weight_decay, at_least=0.0)
    mask_of = default_decay_mask if decay_mask is None else decay_mask

    def decayed(params: Params) -> dict[str, bool]:
        mask = mask_of(params) if callable(mask_of) else mask_of
        if mask.keys() != params.keys():
            missing, extra = params.keys() - mask.keys(), mask.keys() - params.keys()
            raise KeyError(
                f"decay_mask must name exactly the params: missing {sorted(missing)[:3]}, "
                f"unknown {sorted(extra)[:3]}"
            )
        return mask

    def scalars(state: OptState) -> tuple[float, float, float]:
        """This update's `(decay factor, step size, sqrt of bias correction 2)`, torch's way."""
        step = int(state["step"])
        lr_now = check_number(
            f"the lr schedule's value at step {step}", schedule(step), at_least=0.0
        )
        t = step + 1  # torch increments its step before the bias corrections
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        return 1 - lr_now * weight_decay, lr_now / bias_correction1, bias_correction2**0.5

    def init(params: Params) -> OptState:
        decayed(params)  # a bad mask fails here, before any training
        state: OptState = {"step": torch.zeros((), dtype=torch.int64)}
        for name, value in params.items():
            state[f"exp_avg.{name}"] = torch.zeros_like(value, memory_format=torch.preserve_format)
            state[f"exp_avg_sq.{name}"] = torch.zeros_like(
                value, memory_format=torch.preserve_format
            )
        return state

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        """One AdamW step as new tensors; `grads`, `state` and `params` are left untouched."""
        check_update_inputs(grads, state, params, buffers=("exp_avg", "exp_avg_sq"))
        mask = decayed(params)
        decay_factor, step_size, bias_correction2_sqrt = scalars(state)
        new_params: Params = {}
        new_state: OptState = {"step": state["step"] + 1}
        for name, param in params.items():
            grad = grads[name]
            exp_avg = torch.lerp(state[f"exp_avg.{name}"], grad, 1 - beta1)
            exp_avg_sq = torch.addcmul(
                state[f"exp_avg_sq.{name}"] * beta2, grad, grad, value=1 - beta2
            )
            if mask[name] and weight_decay != 0:
                param = param * decay_factor
            denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
            new_params[name] = torch.addcdiv(param, exp_avg, denom, value=-step_size)
            new_state[f"exp_avg.{name}"] = exp_avg
            new_state[f"exp_avg_sq.{name}"] = exp_avg_sq
        return new_params, new_state

    def update_(grads: Params, state: OptState, params: Params) -> OptState:
        """`update` written into `params` and `state`'s own tensors (foreach kernels); returns `state`."""
        check_update_inputs(grads, state, params, buffers=("exp_avg", "exp_avg_sq"))
        mask = decayed(params)
        decay_factor, step_size, bias_correction2_sqrt = scalars(state)
        names = list(params)
        param_list = list(params.values())
        grad_list = [grads[name] for name in names]
        exp_avgs = [state[f"exp_avg.{name}"] for name in names]
        exp_avg_sqs = [state[f"exp_avg_sq.{name}"] for name in names]
        with torch.no_grad():  # params may be nn.Parameters that require grad
            if weight_decay != 0:
                decayed_params = [p for name, p in params.items() if mask[name]]
                if decayed_params:
                    torch._foreach_mul_(decayed_params, decay_factor)
            # One list of every param, unlike torch's per-group loop: half the kernel launches.
            torch._foreach_lerp_(exp_avgs, grad_list, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grad_list, grad_list, value=1 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, bias_correction2_sqrt)
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(param_list, exp_avgs, denoms, value=-step_size)
            state["step"].add_(1)
        return state

    return Optimizer(init=init, update=update, update_=update_)


def check_update_inputs(
    grads: Params, state: OptState, params: Params, *, buffers: tuple[str, ...]
) -> None:
    """Raise `KeyError`/`TypeError`/`ValueError` naming the first grad or state entry that does
    not fit `params`: the same keys, tensors of the same shapes, a `"step"`, and each
    `"<buffer>.<name>"`."""
    if grads.keys() != params.keys():
        missing, extra = params.keys() - grads.keys(), grads.keys() - params.keys()
        raise KeyError(
            f"grads must have exactly the params' keys: missing {sorted(missing)[:3]}, "
            f"unknown {sorted(extra)[:3]}"
        )
    if "step" not in state:
        raise KeyError("optimizer state has no 'step'; make it with init(params)")
    for name, param in params.items():
        if grads[name] is None:
            raise TypeError(
                f"grad {name!r} is None: no gradient reached that param; give it zeros or leave "
                "it out of params"
            )
        if not isinstance(grads[name], Tensor):
            raise TypeError(f"grad {name!r} is a {type(grads[name]).__name__}, not a tensor")
        if grads[name].shape != param.shape:
            raise ValueError(
                f"grad {name!r} has shape {tuple(grads[name].shape)}, param has {tuple(param.shape)}"
            )
        for buffer in buffers:
            if f"{buffer}.{name}" not in state:
                raise KeyError(
                    f"optimizer state has no '{buffer}.{name}'; was it made for these params?"
                )
