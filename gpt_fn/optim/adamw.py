"""AdamW as a stateless optimizer: `init(params) -> state`, `update(grads, state, params)`.

In the style of optax (`optax.adamw`): the optimizer is a pair of functions and its state is
a plain flat `dict[str, Tensor]` that a safetensors checkpoint stores as it is::

    {"step": int64 scalar (updates applied so far),
     "exp_avg.<param name>": first moment, "exp_avg_sq.<param name>": second moment}

The arithmetic is `torch.optim.AdamW`'s, operation for operation (Loshchilov & Hutter 2019,
"Decoupled Weight Decay Regularization"; torch `optim/adam.py`), so the two agree to the last
bit on CPU: decoupled decay `p *= 1 - lr * wd` first, `m.lerp_(g, 1 - beta1)`,
`v = v * beta2 + (1 - beta2) g^2`, then `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.

`update` (pure) and `update_` (in place, foreach kernels, for the training loop) both run
the one `step` below (`gpt_fn.optim.stateless.from_step`). Weight decay applies to matrices
only, decided by `default_decay_mask` (nanoGPT `configure_optimizers`: weights and embeddings
decay; biases and LayerNorm gains do not).

Neither twin looks at the gradient values: the training loop checks the norm returned by
`clip_by_global_norm` and stops on inf/NaN before it calls `update_`.
"""

from collections.abc import Callable, Mapping

from gpt_fn.checks import check_number, check_same_keys
from gpt_fn.optim.schedules import Schedule
from gpt_fn.optim.stateless import Each, Optimizer, OptState, as_schedule, from_step, lr_at
from gpt_fn.shapes import Params

DecayMask = Callable[[Params], dict[str, bool]] | Mapping[str, bool]
"""Which params get weight decay: a `name -> bool` mapping, or a function of the params giving one."""


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
    schedule = as_schedule(lr)
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
        check_same_keys(mask, params, what="decay_mask must name exactly the params")
        return mask

    def step(each: Each, grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        """One AdamW update, torch's ops in torch's order, each op over every param at once."""
        mask = decayed(params)
        lr = lr_at(schedule, state)
        t = int(state["step"]) + 1  # torch increments its step before the bias corrections
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        names = list(params)
        new_params = list(params.values())
        grad_list = [grads[name] for name in names]
        if weight_decay != 0:
            decays = [i for i, name in enumerate(names) if mask[name]]
            if decays:
                decayed_params = each(
                    "mul_", [new_params[i] for i in decays], 1 - lr * weight_decay
                )
                for i, param in zip(decays, decayed_params, strict=True):
                    new_params[i] = param
        # One list of every param, unlike torch's per-group loop: half the kernel launches.
        exp_avgs = each("lerp_", [state[f"exp_avg.{name}"] for name in names], grad_list, 1 - beta1)
        exp_avg_sqs = each("mul_", [state[f"exp_avg_sq.{name}"] for name in names], beta2)
        exp_avg_sqs = each("addcmul_", exp_avg_sqs, grad_list, grad_list, value=1 - beta2)
        denoms = each("sqrt", exp_avg_sqs)
        denoms = each("div_", denoms, bias_correction2_sqrt)
        denoms = each("add_", denoms, eps)
        new_params = each("addcdiv_", new_params, exp_avgs, denoms, value=-step_size)
        buffers: OptState = {}
        for name, exp_avg, exp_avg_sq in zip(names, exp_avgs, exp_avg_sqs, strict=True):
            buffers[f"exp_avg.{name}"] = exp_avg
            buffers[f"exp_avg_sq.{name}"] = exp_avg_sq
        return dict(zip(names, new_params, strict=True)), buffers

    # A bad mask fails at init, before any training.
    return from_step(step, buffers=("exp_avg", "exp_avg_sq"), check=decayed)
