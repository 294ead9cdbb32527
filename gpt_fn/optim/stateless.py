"""The stateless optimizer layer every optimizer is built on (optax's `GradientTransformation`).

An `Optimizer` is three functions over flat dicts of tensors: `init(params) -> state`,
`update(grads, state, params) -> (params, state)`, pure, and `update_(grads, state, params)`,
which writes the same update into the params' and the state's own tensors for the training
loop. The state is a flat `dict[str, Tensor]` with a `"step"` (updates applied so far) that a
safetensors checkpoint stores as it is.

An optimizer writes its arithmetic once, as a `Step` that sends every elementwise op through
an `Each`, and `from_step` makes both twins from it:

- `update` runs the step with `new_tensors`: `Tensor.<op>` (out of place) tensor by tensor,
  every result a new tensor, so it works under `torch.func` (`vmap`, `grad`) like any pure
  function;
- `update_` runs it with `foreach`: one `torch._foreach_<op>_` over the whole list, written
  into the tensors, under `no_grad` (params may be `nn.Parameter`s).

`gpt_fn.optim.clipping` runs its ops through `foreach` too.

On CPU a foreach op runs the same per-tensor kernel on each tensor, so the twins agree to the
last bit (tests/test_adamw.py, tests/test_muon.py).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gpt_fn.checks import check_number, check_same_keys, is_batched
from gpt_fn.optim.schedules import Schedule, constant
from gpt_fn.shapes import Params

OptState = dict[str, Tensor]
"""Flat optimizer state: `"step"` plus one `"<buffer>.<param name>"` per buffer and param."""


class Optimizer(NamedTuple):
    """`init(params) -> state`; `update(grads, state, params) -> (params, state)`; `update_` in place."""

    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params], tuple[Params, OptState]]
    update_: Callable[[Params, OptState, Params], OptState]


Each = Callable[..., list[Tensor]]
"""`each(op, tensors, *args, **kwargs)`: the elementwise op `op` on every tensor of `tensors`,
with the matching tensor of each list among `args` (other args are passed as they are); returns
the results in `tensors`' order. An op named in place (`"lerp_"`) writes into `tensors` under
`foreach` and makes new tensors under `new_tensors`; one without (`"sqrt"`) makes new tensors
under both."""


def foreach(op: str, tensors: list[Tensor], *args: object, **kwargs: object) -> list[Tensor]:
    """`torch._foreach_<op>`, one call for the whole list; an in-place op returns `tensors`.

    Where a `vmap` batches the tensors, which foreach kernels have no batching rule for, the
    same op runs one tensor at a time (`Tensor.<op>`); so does an in-place op on one tensor.
    """
    # One tensor written in place gains nothing from a list kernel: its own method runs the
    # same elementwise kernel for less dispatch (a reduction such as "norm" keeps the list one).
    if (len(tensors) == 1 and op.endswith("_")) or _any_batched(tensors, args):
        result = _per_tensor(op, tensors, args, kwargs)
    else:
        result = getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs)
    return tensors if op.endswith("_") else list(result)


def _any_batched(tensors: list[Tensor], args: tuple[object, ...]) -> bool:
    return any(is_batched(t) for t in tensors) or any(
        isinstance(arg, Tensor) and is_batched(arg) for arg in args
    )


def new_tensors(op: str, tensors: list[Tensor], *args: object, **kwargs: object) -> list[Tensor]:
    """`Tensor.<op>` without its trailing `_`, one tensor at a time: new tensors, inputs untouched."""
    return _per_tensor(op.removesuffix("_"), tensors, args, kwargs)


def _per_tensor(
    op: str, tensors: list[Tensor], args: tuple[object, ...], kwargs: dict[str, object]
) -> list[Tensor]:
    method = getattr(Tensor, op)
    return [
        method(tensor, *(arg[i] if isinstance(arg, list) else arg for arg in args), **kwargs)
        for i, tensor in enumerate(tensors)
    ]


Step = Callable[[Each, Params, OptState, Params], tuple[Params, OptState]]
"""`step(each, grads, state, params) -> (new params, new buffers)`: one update with every
elementwise op sent through `each`; the buffers exclude `"step"`, which `from_step` counts."""


def from_step(
    step: Step, *, buffers: tuple[str, ...], check: Callable[[Params], object] | None = None
) -> Optimizer:
    """The `Optimizer` whose `update` and `update_` both run `step` (see the module docstring).

    `init` makes the state: `"step"` (0) and, per param, one zero tensor like it for each of
    `buffers` (`"<buffer>.<name>"`), after `check(params)` (which raises on params the
    optimizer cannot take, before any training). Both updates check their arguments first
    (`check_update_inputs`) and add 1 to `"step"`.
    """

    def init(params: Params) -> OptState:
        if check is not None:
            check(params)
        state: OptState = {"step": torch.zeros((), dtype=torch.int64)}
        for name, value in params.items():
            for buffer in buffers:
                state[f"{buffer}.{name}"] = torch.zeros_like(
                    value, memory_format=torch.preserve_format
                )
        return state

    def run(each: Each, grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        check_update_inputs(grads, state, params, buffers=buffers)
        new_params, new_buffers = step(each, grads, state, params)
        return new_params, {"step": each("add_", [state["step"]], 1)[0], **new_buffers}

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        """One step as new tensors; `grads`, `state` and `params` are left untouched."""
        return run(new_tensors, grads, state, params)

    def update_(grads: Params, state: OptState, params: Params) -> OptState:
        """`update` written into `params` and `state`'s own tensors; returns `state`."""
        with torch.no_grad():
            run(foreach, grads, state, params)
        return state

    return Optimizer(init=init, update=update, update_=update_)


def as_schedule(lr: float | Schedule) -> Schedule:
    """`lr` if it is a schedule `step -> lr`, else the constant schedule of the number `lr`."""
    return lr if callable(lr) else constant(lr)


def lr_at(schedule: Schedule, state: OptState) -> float:
    """The schedule's lr for the next update (asked with the updates applied so far, as a loop
    that sets `group["lr"] = schedule(step)` before `optimizer.step()`); `ValueError` unless
    finite and >= 0."""
    step = int(state["step"])
    return check_number(f"the lr schedule's value at step {step}", schedule(step), at_least=0.0)


def check_grad_keys(grads: Params, params: Params) -> None:
    """`KeyError` unless `grads` has exactly the keys of `params`, naming the odd ones."""
    check_same_keys(grads, params, what="grads must have exactly the params' keys")


def check_update_inputs(
    grads: Params, state: OptState, params: Params, *, buffers: tuple[str, ...]
) -> None:
    """Raise `KeyError`/`TypeError`/`ValueError` naming the first grad or state entry that does
    not fit `params`: the same keys, tensors of the same shapes, a `"step"`, and each
    `"<buffer>.<name>"`."""
    check_grad_keys(grads, params)
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
