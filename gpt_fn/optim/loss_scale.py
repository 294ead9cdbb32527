"""Dynamic loss scaling for fp16 training: `torch.amp.GradScaler`'s rule over a plain state dict.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Scaling the loss by `S` before
backward keeps them representable; the gradients are divided by `S` again before clipping
and the update. When a step's gradients overflow (inf/NaN) the step is skipped and `S`
halves; after `growth_interval` finite steps in a row it doubles (Micikevicius et al. 2018,
"Mixed Precision Training"; torch.amp.GradScaler's defaults). The state is two tensors, so a
checkpoint stores it and a resumed run continues with the same scale.

    state = loss_scale_init()
    (loss * state["scale"]).backward(); unscale_(grads, state)
    finite = bool(torch.isfinite(global_norm(grads)))
    update_loss_scale_(state, finite)      # skip the optimizer step when not finite
"""

import torch
from torch import Tensor

from gpt_fn.checks import check_int, check_number
from gpt_fn.shapes import Params

LossScaleState = dict[str, Tensor]
"""`{"scale": fp32 scalar, "good_steps": int64 scalar}`."""
SMALLEST_SCALE = 2.0**-14
"""Below fp16's smallest normal number a loss scale only ever meets overflowing gradients:
the run has diverged, not the scale."""


def loss_scale_init(
    initial: float = 2.0**16, device: torch.device | str | None = None
) -> LossScaleState:
    check_number("initial", initial, above=0.0)
    return {
        "scale": torch.tensor(float(initial), device=device),
        "good_steps": torch.zeros((), dtype=torch.int64, device=device),
    }


def unscale_(grads: Params, state: LossScaleState) -> None:
    """Divide every gradient by the scale, in place (fp32 arithmetic, like GradScaler)."""
    with torch.no_grad():
        torch._foreach_mul_(list(grads.values()), (1.0 / state["scale"]).item())


def update_loss_scale_(
    state: LossScaleState,
    finite: bool,
    *,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> None:
    """After a step: back off (and restart the count) on overflow; grow after enough good steps."""
    check_int("growth_interval", growth_interval, at_least=1)
    if not finite:
        state["scale"].mul_(backoff_factor)
        state["good_steps"].zero_()
        return
    state["good_steps"].add_(1)
    if int(state["good_steps"]) >= growth_interval:
        state["scale"].mul_(growth_factor)
        state["good_steps"].zero_()
