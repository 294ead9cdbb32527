"""Interventions as hooks: ablate heads, patch activations, add steering vectors.

Each constructor checks its arguments at once and returns `{site: hook}`, ready to pass as
`hooks=` (or to `merge` with others); a hook returns a new tensor and never edits its input,
so the same hooks work under `torch.func.grad`, `vmap` and `torch.compile`:

    cache = run_with_cache(params, clean, config, names=["h.1.attn.z"])[1]
    hooks = merge(
        ablate_heads(0, [3]),                                      # zero head 3 of block 0
        patch("h.1.attn.z", cache["h.1.attn.z"], heads=[2]),       # head 2 from the clean run
        add_vector("h.2.resid_post", steering, scale=4.0),         # activation steering
    )
    logits = forward(params, corrupted, config, hooks=hooks)

`positions` index the sequence axis of the activation a hook is given: in a decode step that
is the one new position, so during generation leave `positions` unset (every position).

`load_hooks("module:function", params, config)` builds hooks named on a command line
(`gpt-fn eval --hooks`, the lm-eval model's `hooks=`): `function(params, config)` returns them.
"""

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from gpt_fn.checks import check_int, check_number
from gpt_fn.config import GPTConfig
from gpt_fn.shapes import Params
from gpt_fn.sites import BLOCK_SITES, TOP_SITES, Hook, Hooks, apply_hook, check_hooks

# Per block-relative site: the axis of heads (None: the site has no head axis) and of positions.
_AXES: dict[str, tuple[int | None, int]] = {
    **dict.fromkeys(("attn.q", "attn.k", "attn.v", "attn.z", "attn.result"), (2, 1)),
    **dict.fromkeys(("attn.scores", "attn.pattern"), (1, 2)),
}


def site_axes(site: str) -> tuple[int | None, int]:
    """The axis of heads (None: the site has none) and of positions of the activation at
    `site` (`h.3.attn.z` -> `(2, 1)`); `ValueError` for an unknown site."""
    return _AXES.get(_part(site), (None, 1))


def ablate_heads(layer: int, heads: Sequence[int], *, means: Tensor | None = None) -> Hooks:
    """Replace the per-head outputs `h.{layer}.attn.z` of `heads` by 0, or by `means`.

    `means`: `(n_head, d_head)` mean outputs (e.g. `cache["h.1.attn.z"].mean((0, 1))`) for mean
    ablation; only the ablated heads' rows are read.
    """
    site = f"h.{check_int('layer', layer, at_least=0)}.attn.z"
    chosen = _indices("heads", heads)
    axes = site_axes(site)

    def hook(z: Tensor) -> Tensor:
        selected = _selector(z, axes, site, heads=chosen, positions=None)
        replacement = torch.zeros((), dtype=z.dtype, device=z.device) if means is None else means
        return torch.where(selected, replacement.to(z.dtype), z)

    return {site: hook}


def patch(
    site: str,
    source: Tensor,
    *,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Hooks:
    """Replace the activation at `site` by `source` (broadcast to it), optionally only at some
    `positions` and/or `heads` (sites with a head axis: `attn.q/k/v/scores/pattern/z/result`)."""
    axes = site_axes(site)
    if not isinstance(source, Tensor):
        raise TypeError(f"patch source must be a tensor, got {type(source).__name__}")
    if heads is not None and axes[0] is None:
        raise ValueError(
            f"heads= needs a site with a head axis (attn.q/k/v/scores/pattern/z/result), not "
            f"{site!r}"
        )
    chosen_heads = None if heads is None else _indices("heads", heads)
    chosen_positions = None if positions is None else _indices("positions", positions, signed=True)

    def hook(activation: Tensor) -> Tensor:
        selected = _selector(activation, axes, site, heads=chosen_heads, positions=chosen_positions)
        return torch.where(selected, source.to(activation.dtype), activation)

    return {site: hook}


def add_vector(
    site: str,
    vector: Tensor,
    *,
    positions: Sequence[int] | None = None,
    scale: float = 1.0,
) -> Hooks:
    """Add `scale * vector` to the activation at `site` (broadcast over batch and positions:
    a `(d_model,)` steering vector at a residual site), optionally only at `positions`."""
    axes = site_axes(site)
    if not isinstance(vector, Tensor):
        raise TypeError(f"vector must be a tensor, got {type(vector).__name__}")
    scale = check_number("scale", scale)
    chosen_positions = None if positions is None else _indices("positions", positions, signed=True)

    def hook(activation: Tensor) -> Tensor:
        delta = scale * vector.to(activation.dtype)
        if chosen_positions is None:
            return activation + delta
        selected = _selector(activation, axes, site, heads=None, positions=chosen_positions)
        return activation + selected * delta

    return {site: hook}


def merge(*hooks: Hooks) -> Hooks:
    """One hooks dict from several; hooks at the same site run left to right."""
    merged: dict[str, list[Hook]] = {}
    for hook_dict in hooks:
        for site, hook in hook_dict.items():
            merged.setdefault(site, []).append(hook)
    return {site: _sequence(site, fns) if len(fns) > 1 else fns[0] for site, fns in merged.items()}


def load_hooks(spec: str, params: Params, config: GPTConfig) -> Hooks:
    """The hooks `spec` names: `"module:function"`, where `function(params, config)` returns
    `{site: hook}` for that model (so one function serves any size, and may build its vectors
    from the model's own activations).

    `module` is a module on the import path (`my_lab.steering`) or a Python file (`steer.py`,
    `path/to/steer.py`; the `gpt-fn` command does not put the current folder on the path).
    `ValueError` in one line naming the spec for a malformed spec, a module that does not
    import, a missing or non-callable function, one that raises, or a result that is not a
    mapping of known sites to callables.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or "" in spec.split(":"):
        raise ValueError(
            f"hooks must be given as module:function (e.g. steer.py:hooks), got {spec!r}"
        )
    module_name, function_name = spec.split(":")
    try:
        module = _import(module_name)
    except Exception as error:
        raise ValueError(
            f"hooks {spec!r}: cannot import {module_name} ({type(error).__name__}: {error})"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"hooks {spec!r}: {module_name} has no function {function_name!r}")
    try:
        hooks = function(params, config)
    except Exception as error:
        raise ValueError(
            f"hooks {spec!r}: {function_name}(params, config) raised {type(error).__name__}: "
            f"{error}"
        ) from error
    try:
        check_hooks(hooks, config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"hooks {spec!r} returned bad hooks: {error}") from error
    return hooks


def _import(name: str) -> object:
    """A module by import name, or a Python file by path (run as a module of its file's stem)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {name!r}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sequence(site: str, fns: list[Hook]) -> Hook:
    def hook(activation: Tensor) -> Tensor:
        for fn in fns:
            activation = apply_hook(site, fn, activation)
        return activation

    return hook


def _part(site: str) -> str:
    """A site's name within its block (`h.3.attn.z` -> `attn.z`); top-level sites as they are."""
    if not isinstance(site, str):
        raise TypeError(f"site must be a site name, got {site!r}")
    if site.startswith("h."):
        pieces = site.split(".", 2)
        if len(pieces) == 3 and pieces[1].isdigit() and pieces[2] in BLOCK_SITES:
            return pieces[2]
    elif site in TOP_SITES:
        return site
    raise ValueError(f"unknown activation site {site!r} (gpt_fn.site_names(config) lists them)")


def _indices(name: str, values: Sequence[int], *, signed: bool = False) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of ints, got {values!r}")
    return [check_int(name, v, at_least=None if signed else 0) for v in values]


def _selector(
    activation: Tensor,
    axes: tuple[int | None, int],
    site: str,
    *,
    heads: list[int] | None,
    positions: list[int] | None,
) -> Tensor:
    """A bool tensor broadcastable to `activation`: True at the chosen heads and positions."""
    head_axis, position_axis = axes
    selected = torch.ones((1,) * activation.ndim, dtype=torch.bool, device=activation.device)
    for axis, chosen, what in ((head_axis, heads, "head"), (position_axis, positions, "position")):
        if chosen is None or axis is None:
            continue
        size = activation.shape[axis]
        for index in chosen:
            if not -size <= index < size:
                raise ValueError(f"{what} {index} is outside the {size} at {site!r}")
        shape = [1] * activation.ndim
        shape[axis] = size
        mask = torch.zeros(size, dtype=torch.bool, device=activation.device)
        mask[torch.tensor(chosen, device=activation.device)] = True
        selected = selected & mask.view(shape)
    return selected
