"""Gradient clipping by global norm, equal to `torch.nn.utils.clip_grad_norm_`.

The global norm is the L2 norm of all gradients seen as one vector (Pascanu et al. 2013,
"On the difficulty of training recurrent neural networks"); when it exceeds `max_norm` every
gradient is scaled by `max_norm / (norm + 1e-6)` (torch's formula, the 1e-6 guarding a zero
norm). `clip_by_global_norm` is pure; `clip_by_global_norm_` scales the tensors in place.

Non-finite gradients: the returned norm is then inf or NaN and the scaled gradients are
meaningless (as with torch). Neither function inspects the norm by default, since reading it
on the host would stall an accelerator every step; the caller checks it (the training loop
stops on a non-finite norm before updating), or passes `error_if_nonfinite=True` to get a
`FloatingPointError` here instead.

Both run their ops through `gpt_fn.optim.stateless.foreach`: torch's `torch._foreach_*` kernels,
so the result is bitwise torch's, and one tensor at a time under `torch.func.vmap`
(per-example clipping, `vmap(lambda g: clip_by_global_norm(g, 1.0))`), where foreach kernels
have no batching rule.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from gpt_fn.checks import check_bool, check_number, is_batched
from gpt_fn.optim.stateless import foreach
from gpt_fn.shapes import Params


def global_norm(grads: Params) -> Float[Tensor, ""]:
    """L2 norm of every tensor in `grads` concatenated, computed as torch's clipping does."""
    if not grads:
        raise ValueError("grads must not be empty")
    tensors = list(grads.values())
    # Per-tensor norms then the norm of those norms: torch's order, so the result is bitwise its.
    norms = foreach("norm", tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(tensors[0].device) for n in norms]), 2.0)


def clip_by_global_norm(
    grads: Params, max_norm: float, *, error_if_nonfinite: bool = False
) -> tuple[Params, Float[Tensor, ""]]:
    """`grads` scaled down to global norm at most `max_norm` (new tensors), and the norm before."""
    norm = _checked_norm(grads, max_norm, error_if_nonfinite)
    scaled = foreach("mul", list(grads.values()), _clip_coefficient(norm, max_norm))
    return dict(zip(grads, scaled, strict=True)), norm


def clip_by_global_norm_(
    grads: Params, max_norm: float, *, error_if_nonfinite: bool = False
) -> Float[Tensor, ""]:
    """Scale the tensors of `grads` in place to global norm at most `max_norm`; return the norm before."""
    norm = _checked_norm(grads, max_norm, error_if_nonfinite)
    with torch.no_grad():
        foreach("mul_", list(grads.values()), _clip_coefficient(norm, max_norm))
    return norm


def _clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    # A tensor, not a Python float: no host sync, and the same multiply torch performs.
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def _checked_norm(grads: Params, max_norm: float, error_if_nonfinite: bool) -> Tensor:
    check_number("max_norm", max_norm, above=0.0)
    norm = global_norm(grads)
    if check_bool("error_if_nonfinite", error_if_nonfinite):
        if is_batched(norm):
            raise ValueError(
                "error_if_nonfinite=True reads the norm on the host, which vmap cannot do; "
                "check the returned norms after the vmap instead"
            )
        if not torch.isfinite(norm):
            raise FloatingPointError(f"gradient global norm is {norm.item()}; cannot clip")
    return norm
