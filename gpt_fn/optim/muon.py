"""Muon as a stateless optimizer: `init(params) -> state`, `update(grads, state, params)`.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon) keeps a momentum buffer per matrix and steps along the
buffer *orthogonalised*: a few Newton–Schulz iterations push every singular value of the
update towards 1, so each direction of the matrix moves by about the same amount. It is for
2-D weights only; embeddings, LayerNorm gains and biases go to AdamW (`gpt_fn.optim.partition`).

The arithmetic is `torch.optim.Muon`'s (torch 2.13, `torch/optim/_muon.py`,
`_single_tensor_muon`), operation for operation, so on CPU the two agree to the last bit:

    buf = buf.lerp(grad, 1 - momentum)                      # EMA, not buf * momentum + grad
    direction = grad.lerp(buf, momentum) if nesterov else buf
    O = newton_schulz(direction)                            # in bfloat16, on the wide side
    param = param * (1 - lr * weight_decay)                 # decoupled decay with the plain lr
    param = param - adjusted_lr * O                         # lr * sqrt(max(1, rows / cols))

`newton_schulz` casts to bfloat16 (torch's choice; `ns_dtype` changes it), transposes a tall
matrix so the Gram matrix `X X^T` is the small one, divides by the Frobenius norm (clamped at
`eps`) so the spectral norm is at most 1, and runs `ns_steps` quintic iterations
`X <- a X + (b A + c A^2) X` with `A = X X^T` and Keller Jordan's coefficients
`(3.4445, -4.7750, 2.0315)`, which trade exact convergence for speed: singular values end
near 1 (0.68 to 1.13 for a random 64 x 32 matrix), not at 1.

Fused QKV: GPT-2 stores the query, key and value projections as one `c_attn.weight` of shape
`(3 * n_embd, n_embd)`. torch (and `muon()` by default) orthogonalises it as one tall matrix,
with lr scaled by `sqrt(3)`. `split_fused={"h.*.attn.c_attn.weight": 3}` (the constant
`FUSED_QKV`) instead treats each matching param as 3 row blocks, q, k and v, orthogonalised
separately, each with its own `(n_embd, n_embd)` lr adjustment (1 for a square block); this
is exactly what torch does when q, k and v are three separate params (modded-nanogpt's
layout). The momentum buffer is elementwise, so it is one tensor either way.

One deliberate difference: for a bfloat16 param with `nesterov=False`, torch 2.13's
`grad.bfloat16()` returns the momentum buffer itself and its in-place division then
normalises the *buffer* (pytorch/pytorch#194664 fixes this with a copy); here the buffer is
never touched by the orthogonalisation. fp32 params, and bf16 ones with Nesterov, match torch.

`update` (pure) and `update_` (in place) both run the one `step` below
(`gpt_fn.optim.stateless.from_step`). The state is a flat dict of tensors a safetensors
checkpoint stores as is::

    {"step": int64 scalar (updates applied so far, for the lr schedule),
     "momentum_buffer.<param name>": the momentum buffer, like the param}
"""

import fnmatch
import math
from collections.abc import Mapping
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from gpt_fn.checks import check_number
from gpt_fn.optim.schedules import Schedule
from gpt_fn.optim.stateless import Each, Optimizer, OptState, as_schedule, from_step, lr_at
from gpt_fn.shapes import Params

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton–Schulz coefficients (torch's `DEFAULT_A/B/C`)."""
NS_STEPS = 5
NS_EPS = 1e-7
FUSED_QKV: dict[str, int] = {"h.*.attn.c_attn.weight": 3}
"""`split_fused` for GPT-2: orthogonalise q, k and v of every block's `c_attn` separately."""

AdjustLR = Literal["original", "match_rms_adamw"]


def newton_schulz(
    matrix: Float[Tensor, "rows cols"],
    *,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Float[Tensor, "rows cols"]:
    """`matrix` with its singular values pushed towards 1, in `dtype` (torch's `_zeropower_via_newtonschulz`).

    Pure: `matrix` is untouched (torch divides its bf16 copy in place; dividing into a new
    tensor runs the same kernel, so the values are the same).
    """
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(dtype)
    if tall:
        x = x.T  # the Gram matrix x @ x.T is then the smaller of the two
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, rows: int, cols: int, adjust_lr: AdjustLR = "original") -> float:
    """The lr a `(rows, cols)` matrix steps with (torch's `_adjust_lr`).

    "original" (Keller Jordan): `lr * sqrt(max(1, rows / cols))`; "match_rms_adamw" (Liu et al.
    2025, "Muon is Scalable for LLM Training"): `0.2 * lr * sqrt(max(rows, cols))`, an update
    of AdamW's RMS, so AdamW's lr and weight decay carry over.
    """
    if adjust_lr == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * (0.2 * math.sqrt(max(rows, cols)))


def muon(
    lr: float | Schedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = NS_STEPS,
    eps: float = NS_EPS,
    adjust_lr: AdjustLR = "original",
    ns_dtype: torch.dtype = torch.bfloat16,
    split_fused: Mapping[str, int] | None = None,
) -> Optimizer:
    """Muon equal to `torch.optim.Muon(params, lr, weight_decay, momentum, nesterov, ...)`.

    Defaults are torch's. `lr` is a number or a schedule `step -> lr` asked with the number
    of updates applied so far, as for `adamw`. `adjust_lr` is torch's `adjust_lr_fn`
    (`adjusted_lr`). `ns_dtype` is the dtype Newton–Schulz runs in: bfloat16 as torch (fast
    on GPUs and CPUs with native bf16); float32 is closer to exact and faster on CPUs without
    native bf16 matmuls, but no longer torch's arithmetic. `split_fused` maps param-name
    patterns (`fnmatch`, e.g. `"h.*.attn.c_attn.weight"`) to a number of row blocks that are
    orthogonalised separately (see the module docstring; `FUSED_QKV` is GPT-2's).

    Every param must be 2-D (`init` raises naming the first that is not).
    """
    schedule = as_schedule(lr)
    weight_decay = check_number("weight_decay", weight_decay, at_least=0.0)
    momentum = check_number("momentum", momentum, at_least=0.0, below=1.0)
    if len(ns_coefficients) != 3 or not all(math.isfinite(x) for x in ns_coefficients):
        raise ValueError(f"ns_coefficients must be 3 finite numbers, got {ns_coefficients!r}")
    # torch refuses 100 steps or more "for computational efficiency"; 0 would not orthogonalise.
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be an int in [1, 100), got {ns_steps!r}")
    eps = check_number("eps", eps, above=0.0)
    if adjust_lr not in ("original", "match_rms_adamw"):
        raise ValueError(f"adjust_lr must be 'original' or 'match_rms_adamw', got {adjust_lr!r}")
    if not ns_dtype.is_floating_point:
        raise ValueError(f"ns_dtype must be a floating dtype, got {ns_dtype}")
    split = dict(split_fused or {})
    for pattern, blocks in split.items():
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"split_fused[{pattern!r}] must be an int >= 1, got {blocks!r}")

    def blocks_of(params: Params) -> dict[str, int]:
        """Row blocks per param (1: the whole matrix); raises on a param Muon cannot take."""
        for name, param in params.items():
            if param.ndim != 2:
                raise ValueError(
                    f"Muon takes 2-D params only; {name!r} has shape {tuple(param.shape)} "
                    "(give it to AdamW: gpt_fn.optim.partition)"
                )
        counts = dict.fromkeys(params, 1)
        for pattern, blocks in split.items():
            matched = fnmatch.filter(params, pattern)
            if not matched:
                raise KeyError(f"split_fused pattern {pattern!r} matches no param")
            for name in matched:
                if params[name].shape[0] % blocks:
                    raise ValueError(
                        f"{name!r} has {params[name].shape[0]} rows: not divisible into "
                        f"{blocks} blocks (split_fused[{pattern!r}])"
                    )
                counts[name] = blocks
        return counts

    def step_direction(direction: Tensor, blocks: int, lr: float) -> tuple[Tensor, float]:
        """The orthogonalised update (block by block) and the lr it is added with."""
        rows, cols = direction.shape[0] // blocks, direction.shape[1]
        ortho = [
            newton_schulz(
                direction[i * rows : (i + 1) * rows],
                coefficients=ns_coefficients,
                steps=ns_steps,
                eps=eps,
                dtype=ns_dtype,
            )
            for i in range(blocks)
        ]
        # Blocks share one shape, so one adjusted lr; adding their concatenation is the same
        # elementwise arithmetic as adding each block to its own slice.
        update = ortho[0] if blocks == 1 else torch.cat(ortho)
        return update, adjusted_lr(lr, rows, cols, adjust_lr)

    def step(each: Each, grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        """One Muon update, one param at a time as torch: one orthogonalised update alive at a
        time, and each param's tensors still in cache for its next op."""
        blocks = blocks_of(params)
        lr = lr_at(schedule, state)
        new_params: Params = {}
        buffers: OptState = {}
        for name, param in params.items():
            grad = grads[name]
            (buf,) = each("lerp_", [state[f"momentum_buffer.{name}"]], [grad], 1 - momentum)
            direction = torch.lerp(grad, buf, momentum) if nesterov else buf
            ortho, step_lr = step_direction(direction, blocks[name], lr)
            (decayed,) = each("mul_", [param], 1 - lr * weight_decay)
            (new_params[name],) = each("add_", [decayed], [ortho], alpha=-step_lr)
            buffers[f"momentum_buffer.{name}"] = buf
        return new_params, buffers

    return from_step(step, buffers=("momentum_buffer",), check=blocks_of)
