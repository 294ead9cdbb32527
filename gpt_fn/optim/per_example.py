"""Per-example gradients: `torch.func.vmap` of `torch.func.grad` over a batch, and their norms.

A gradient per example instead of one for the mean (DP-SGD's clipping, gradient-noise and
influence studies, data attribution) is one `vmap(grad(loss))` when the loss is a pure
function of a param dict (Opacus computes them with module hooks; torch.func's tutorial on
per-sample gradients does it this way):

    grads, norms = per_example_grads(loss_fn, params, x, y)   # loss_fn(params, x_i, y_i)
    clipped, _ = vmap(lambda g: clip_by_global_norm(g, 1.0))(grads)   # DP-SGD's clipping
"""

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gpt_fn.optim.clipping import global_norm
from gpt_fn.shapes import Params


def per_example_grads(
    loss_fn: Callable[..., Tensor], params: Params, *batch: Tensor, **kwargs: Any
) -> tuple[dict[str, Tensor], Float[Tensor, " batch"]]:
    """Gradient of `loss_fn(params, *example, **kwargs)` for each example, and its global norm.

    `batch`: tensors whose first axis indexes the examples; `loss_fn` sees one example at a
    time (each tensor without that axis). Returns `{name: (batch, *param.shape)}` and the
    `(batch,)` L2 norms over all params (`optim.global_norm` of each example's gradient).
    """
    if not batch:
        raise ValueError("per_example_grads needs at least one batched tensor")
    sizes = {t.shape[0] for t in batch}
    if len(sizes) != 1:
        raise ValueError(f"the batch tensors disagree on the number of examples: {sorted(sizes)}")

    def one(p: Params, *example: Tensor) -> Tensor:
        return loss_fn(p, *example, **kwargs)

    in_dims = (None, *(0,) * len(batch))
    grads = torch.func.vmap(torch.func.grad(one), in_dims=in_dims)(params, *batch)
    return grads, torch.func.vmap(global_norm)(grads)
