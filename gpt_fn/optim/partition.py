"""Route each parameter to one of several optimizers: one `Optimizer` over all of them.

optax's `multi_transform`: a label per param names the optimizer that updates it, and the
combined state is one flat dict in which each optimizer's state lives under its label::

    opt = partition({"muon": muon(0.02), "adamw": adamw(6e-4)}, gpt_muon_label)
    state = opt.init(params)      # {"muon/step", "muon/momentum_buffer.h.0...",
                                  #  "adamw/step", "adamw/exp_avg.wte.weight", ...}

So a safetensors checkpoint stores it as it is, and each sub-optimizer sees only its own
params, grads and state: a partition of two optimizers computes exactly what each computes
on its own subset. A label with no params gets no state and is never called.

`gpt_muon_label` is the standard split for GPT (Keller Jordan's modded-nanogpt, torch's Muon
docs): Muon for the blocks' matrices (`h.{i}.attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj` weights), AdamW for everything else: the embeddings `wte` (tied with the LM
head) and `wpe`, LayerNorm gains and all biases. `gpt_muon_adamw(muon, adamw)` builds it.
"""

from collections.abc import Callable, Iterator, Mapping

from torch import Tensor

from gpt_fn.checks import check_same_keys
from gpt_fn.optim.stateless import Optimizer, OptState, check_grad_keys
from gpt_fn.shapes import Params

Label = Callable[[str, Tensor], str]
"""`(param name, param) -> optimizer label`."""

SEPARATOR = "/"


def gpt_muon_label(name: str, param: Tensor) -> str:
    """`"muon"` for a block's matrix (`h.*`, 2-D); `"adamw"` for embeddings, LayerNorm, biases."""
    return "muon" if name.startswith("h.") and param.ndim == 2 else "adamw"


def gpt_muon_adamw(muon: Optimizer, adamw: Optimizer) -> Optimizer:
    """`partition({"muon": muon, "adamw": adamw}, gpt_muon_label)`: GPT's standard Muon split."""
    return partition({"muon": muon, "adamw": adamw}, gpt_muon_label)


def partition(optimizers: Mapping[str, Optimizer], label: Label | Mapping[str, str]) -> Optimizer:
    """One optimizer updating each param with `optimizers[label(name, param)]`.

    `label` is a function of `(name, param)` or a mapping naming every param. A label that is
    not a key of `optimizers`, or a param without one, is a `KeyError` naming the param, at
    `init` (and at every update, which relabels the params it is given).
    """
    optimizers = dict(optimizers)
    if not optimizers:
        raise ValueError("optimizers must not be empty")
    for key, optimizer in optimizers.items():
        if not isinstance(key, str) or not key or SEPARATOR in key:
            raise ValueError(f"optimizer labels must be non-empty str without '/', got {key!r}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizers[{key!r}] must be an Optimizer (init, update, update_), "
                f"got {type(optimizer).__name__}"
            )

    def groups(params: Params) -> dict[str, list[str]]:
        """Param names per label that has any, in the params' order."""
        if isinstance(label, Mapping):
            check_same_keys(label, params, what="the label mapping must name exactly the params")
        out: dict[str, list[str]] = {}
        for name, param in params.items():
            key = label[name] if isinstance(label, Mapping) else label(name, param)
            if key is None:
                raise KeyError(f"param {name!r} has no label; labels: {sorted(optimizers)}")
            if key not in optimizers:
                raise KeyError(
                    f"param {name!r} is labelled {key!r}, which is not one of {sorted(optimizers)}"
                )
            out.setdefault(key, []).append(name)
        return out

    def split_state(state: OptState, used: dict[str, list[str]]) -> dict[str, OptState]:
        parts: dict[str, OptState] = {key: {} for key in used}
        for full, value in state.items():
            key, sep, rest = full.partition(SEPARATOR)
            if not sep or key not in parts:
                raise KeyError(
                    f"optimizer state entry {full!r} belongs to none of the labels in use "
                    f"{sorted(used)}; was it made by this partition's init?"
                )
            parts[key][rest] = value
        for key, part in parts.items():
            if not part:
                raise KeyError(f"optimizer state has no {key!r}/... entries; make it with init")
        return parts

    def init(params: Params) -> OptState:
        state: OptState = {}
        for key, names in groups(params).items():
            state |= prefixed(key, optimizers[key].init({name: params[name] for name in names}))
        return state

    def subsets(
        grads: Params, state: OptState, params: Params
    ) -> Iterator[tuple[str, Optimizer, Params, OptState, Params]]:
        """Each label in use, its optimizer, and that optimizer's grads, state and params."""
        check_grad_keys(grads, params)
        used = groups(params)
        parts = split_state(state, used)
        for key, names in used.items():
            yield (
                key,
                optimizers[key],
                {name: grads[name] for name in names},
                parts[key],
                {name: params[name] for name in names},
            )

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        """Each optimizer's pure `update` on its own params; new params in the params' order."""
        new_params: Params = {}
        new_state: OptState = {}
        for key, optimizer, sub_grads, sub_state, sub_params in subsets(grads, state, params):
            updated, updated_state = optimizer.update(sub_grads, sub_state, sub_params)
            new_params |= updated
            new_state |= prefixed(key, updated_state)
        return {name: new_params[name] for name in params}, new_state

    def update_(grads: Params, state: OptState, params: Params) -> OptState:
        """Each optimizer's in-place `update_`; what it returns is written back into `state`."""
        for key, optimizer, sub_grads, sub_state, sub_params in subsets(grads, state, params):
            state |= prefixed(key, optimizer.update_(sub_grads, sub_state, sub_params))
        return state

    return Optimizer(init=init, update=update, update_=update_)


def prefixed(label: str, state: OptState) -> OptState:
    """`state` with each key under `label` (`"muon/step"`): one optimizer's part of the whole."""
    return {f"{label}{SEPARATOR}{key}": value for key, value in state.items()}
