"""Activation patching sweeps, attribution patching, path patching and gradients at sites.

Every function here is hooks over the pure model plus one observation: a patch at layer L
cannot change anything before block L, so a sweep runs each input once with a cache and then
only blocks L.. for each patched component (`gpt_fn.model.forward_from`), `chunk` patched
runs stacked along the batch of one forward.

- `activation_patch`: the metric of the `corrupted` run with one component of a site taken
  from the `clean` run, for every component (per layer, position, head or head and position);
  TransformerLens's `patching.get_act_patch_*` (the same direction: clean into corrupted,
  "denoising"; swap the two inputs for noising).
- `attribution_patch`: the first-order estimate of the same numbers from one forward and
  one backward pass of the corrupted run (Nanda 2023, "Attribution patching"; Syed et al.
  2023).
- `run_with_grads`: the cache and the metric's gradient at every named site, one backward
  (TransformerLens's `run_with_cache(incl_bwd=True)`).
- `path_patch`: senders' (heads') clean outputs reaching only chosen receivers (Wang et al.
  2022, "Interpretability in the Wild", path patching).

A metric maps the logits of one run (`batch seq vocab`) to a scalar tensor.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from gpt_fn.checks import check_choice, check_int
from gpt_fn.config import GPTConfig
from gpt_fn.hooks import merge, patch, site_axes
from gpt_fn.model import check_tokens, forward_from, recorder, run_with_cache
from gpt_fn.nn import AttentionKernel
from gpt_fn.shapes import Logits, Params, Tokens
from gpt_fn.sites import (
    BLOCK_SITES,
    Hook,
    Hooks,
    apply_hook,
    check_hooks,
    identity,
    resid_entering,
    site_names,
)

Metric = Callable[[Logits], Tensor]
"""The logits of one run (`batch seq vocab`) -> a scalar tensor (a logit difference, a loss)."""
Sweep = Literal["layer", "position", "head", "head_position"]
"""What one patched component is: a site's whole activation in one layer, one position of it,
one head (every position) or one head at one position."""
SWEEPS: tuple[Sweep, ...] = get_args(Sweep)
ROWS_PER_FORWARD = 4096
"""`activation_patch`'s default bound on the token rows (runs x batch x seq) of one stacked
forward: its logits then take ~0.8 GB in fp32 at GPT-2's vocabulary."""


def activation_patch(
    params: Params,
    clean: Tokens,
    corrupted: Tokens,
    config: GPTConfig,
    metric: Metric,
    *,
    site: str,
    by: Sweep = "layer",
    chunk: int | None = None,
    attention: AttentionKernel = "sdpa",
) -> Float[Tensor, "n_layer ..."]:
    """The metric of the `corrupted` run with each component of `site` taken from `clean`.

    `site` names a site of every block (`"resid_pre"`, `"attn.z"`, `"mlp.out"`, ...). The
    result is `(n_layer,)` for `by="layer"`, `(n_layer, seq)` for `"position"` (the query
    position at `attn.scores`/`attn.pattern`), `(n_layer, n_head)` for `"head"` and
    `(n_layer, seq, n_head)` for `"head_position"`; entry `[layer, ...]` equals
    `metric(forward(params, corrupted, config, hooks=patch(f"h.{layer}.{site}",
    clean_cache[...], positions=..., heads=...)))`. `chunk` bounds how many patched runs
    share one forward (their logits take `chunk x batch x seq x vocab` floats); by default as
    many as fit in `ROWS_PER_FORWARD` token rows.
    """
    _check_pair(clean, corrupted, config)
    _check_metric(metric)
    _check_sweep(site, by)
    if chunk is None:
        chunk = max(1, ROWS_PER_FORWARD // corrupted.numel())
    check_int("chunk", chunk, at_least=1)
    names = [f"h.{i}.{site}" for i in range(config.n_layer)]
    starts = [f"h.{i}.resid_pre" for i in range(config.n_layer)]
    batch = corrupted.shape[0]
    with torch.no_grad():
        _, sources = run_with_cache(params, clean, config, names=names, attention=attention)
        _, prefix = run_with_cache(params, corrupted, config, names=starts, attention=attention)
        layers = []
        for layer, name in enumerate(names):
            source = sources[name]
            shape = _component_shape(source, site, by)
            count = int(torch.Size(shape).numel())
            values = []
            for first in range(0, count, chunk):
                size = min(chunk, count - first)
                chosen = _selection(source, site, by, torch.arange(first, first + size))
                x = prefix[starts[layer]].repeat(size, 1, 1)
                hooks = {name: _stacked_patch(source, chosen)}
                logits = forward_from(
                    params, x, config, layer=layer, hooks=hooks, attention=attention
                )
                values += [_scalar(metric(run)) for run in logits.split(batch)]
            layers.append(torch.stack(values).view(shape))
        return torch.stack(layers)


def attribution_patch(
    params: Params,
    clean: Tokens,
    corrupted: Tokens,
    config: GPTConfig,
    metric: Metric,
    *,
    site: str,
    by: Sweep = "layer",
    attention: AttentionKernel = "sdpa",
) -> Float[Tensor, "n_layer ..."]:
    """`activation_patch`'s numbers to first order, from one forward + one backward pass.

    Each entry is `metric(corrupted) + sum(grad * (clean - corrupted))` over the component's
    elements, with the gradient of the metric at `h.{layer}.{site}` on the corrupted run: a
    straight line from the corrupted activation to the clean one. Shapes as in
    `activation_patch`.
    """
    _check_pair(clean, corrupted, config)
    _check_metric(metric)
    _check_sweep(site, by)
    names = [f"h.{i}.{site}" for i in range(config.n_layer)]
    with torch.no_grad():
        _, sources = run_with_cache(params, clean, config, names=names, attention=attention)
    value, cache, grads = run_with_grads(
        params, corrupted, config, metric, names=names, attention=attention
    )
    head_axis, position_axis = site_axes(names[0])
    kept = {
        "layer": [],
        "position": [position_axis],
        "head": [head_axis],
        "head_position": [position_axis, head_axis],
    }[by]
    layers = []
    for name in names:
        # Where both runs hold the same value (-inf at masked scores too) nothing changes.
        change = torch.where(sources[name] == cache[name], 0.0, sources[name] - cache[name])
        product = (grads[name] * change).movedim(kept, list(range(len(kept))))
        layers.append(product.flatten(len(kept)).sum(-1))
    return value + torch.stack(layers)


class Gradients(NamedTuple):
    """`run_with_grads`'s result: the metric, the activations and the metric's gradients."""

    metric: Float[Tensor, ""]
    cache: dict[str, Tensor]
    grads: dict[str, Tensor]


def run_with_grads(
    params: Params,
    tokens: Tokens,
    config: GPTConfig,
    metric: Metric,
    *,
    names: Sequence[str] | Callable[[str], bool] | None = None,
    hooks: Hooks | None = None,
    attention: AttentionKernel = "sdpa",
) -> Gradients:
    """The metric of `tokens`' run, the activations at `names` and the metric's gradient with
    respect to each of them (one forward, one backward; all detached).

    `names` as in `run_with_cache` (None: every site). The gradient at a site is the total
    derivative through everything after it, as a hook adding `delta` there would see it
    (`torch.func.grad` with respect to `delta` at 0). `hooks` run first at their sites.
    """
    check_tokens(tokens, config)
    _check_metric(metric)
    if hooks is not None:
        check_hooks(hooks, config)
    if names is None:
        wanted = list(site_names(config))
    elif callable(names):
        wanted = [site for site in site_names(config) if names(site)]
    else:
        check_hooks(dict.fromkeys(names, identity), config)
        wanted = list(names)
    deltas: dict[str, Tensor] = {}
    probes = {site: _probe(site, (hooks or {}).get(site), deltas) for site in wanted}
    with torch.enable_grad():
        logits, cache = run_with_cache(
            params,
            tokens,
            config,
            names=wanted,
            hooks={**(hooks or {}), **probes},
            attention=attention,
        )
        value = _scalar(metric(logits))
        grads = torch.autograd.grad(value, [deltas[site] for site in wanted], allow_unused=True)
    return Gradients(
        value.detach(),
        {site: cache[site].detach() for site in wanted},
        {
            site: torch.zeros_like(deltas[site]) if grad is None else grad
            for site, grad in zip(wanted, grads, strict=True)
        },
    )


def path_patch(
    params: Params,
    clean: Tokens,
    corrupted: Tokens,
    config: GPTConfig,
    metric: Metric,
    *,
    senders: Sequence[tuple[int, int]],
    receivers: Mapping[str, Sequence[int] | None],
    attention: AttentionKernel = "sdpa",
) -> Float[Tensor, ""]:
    """The metric of the `corrupted` run where the `senders`' clean outputs reach the
    `receivers` alone (Wang et al. 2022's path patching, clean into corrupted).

    `senders`: `(layer, head)` pairs, each head's output `h.{layer}.attn.z`. `receivers`:
    `{site: heads}`, sites after the last sender's block (`h.5.attn.q`, `h.5.attn.v`,
    `h.7.resid_pre`, `ln_f`), `heads` a list for a site with a head axis or None for all of it.

    Two passes over the corrupted input. First, every head's output is frozen at its
    corrupted value except the senders', which take their clean values (MLPs recompute), and
    the receivers' activations are recorded. Second, the corrupted run with the receivers
    (those heads only) replaced by the recorded values; its metric is returned.
    """
    _check_pair(clean, corrupted, config)
    _check_metric(metric)
    by_layer = _senders(senders, config)
    first_sender, last_sender = min(by_layer), max(by_layer)
    first_receiver = _check_receivers(receivers, last_sender, config)
    outputs = [f"h.{i}.attn.z" for i in range(first_sender, config.n_layer)]
    starts = {layer: resid_entering(layer, config) for layer in (first_sender, first_receiver)}
    with torch.no_grad():
        _, sent = run_with_cache(
            params, clean, config, names=[f"h.{i}.attn.z" for i in by_layer], attention=attention
        )
        _, base = run_with_cache(
            params, corrupted, config, names=outputs + list(starts.values()), attention=attention
        )
        frozen: dict[str, Hook] = {}
        for name in outputs:
            layer = int(name.split(".")[1])
            value = base[name]
            if layer in by_layer:
                head_axis = site_axes(name)[0]
                chosen = torch.tensor(by_layer[layer], device=value.device)
                heads = F.one_hot(chosen, value.shape[head_axis]).any(0)
                shape = [1] * value.ndim
                shape[head_axis] = -1
                value = torch.where(heads.view(shape), sent[name], value)
            frozen[name] = _constant(value)
        recorded: dict[str, Tensor] = {}
        recorders = {site: recorder(site, None, recorded) for site in receivers}
        forward_from(
            params,
            base[starts[first_sender]],
            config,
            layer=first_sender,
            hooks={**frozen, **recorders},
            attention=attention,
        )
        patches = merge(
            *(patch(site, recorded[site], heads=heads) for site, heads in receivers.items())
        )
        logits = forward_from(
            params,
            base[starts[first_receiver]],
            config,
            layer=first_receiver,
            hooks=patches,
            attention=attention,
        )
        return _scalar(metric(logits))


def _check_pair(clean: object, corrupted: object, config: GPTConfig) -> None:
    check_tokens(clean, config, name="clean")
    check_tokens(corrupted, config, name="corrupted")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean has shape {tuple(clean.shape)} but corrupted {tuple(corrupted.shape)}: "
            "patching pairs them position by position"
        )


def _check_metric(metric: object) -> None:
    if not callable(metric):
        raise TypeError(f"metric must be a function of logits, got {type(metric).__name__}")


def _check_sweep(site: object, by: object) -> None:
    if site not in BLOCK_SITES:
        raise ValueError(
            f"site must name a site of every block ({', '.join(BLOCK_SITES)}), got {site!r}"
        )
    check_choice("by= sweep", by, SWEEPS)
    if by in ("head", "head_position") and site_axes(f"h.0.{site}")[0] is None:
        raise ValueError(f"by={by!r} needs a site with a head axis; {site!r} has none")


def _scalar(value: object) -> Tensor:
    """The metric's value as a 0-dim tensor, or `ValueError` naming what it returned."""
    if isinstance(value, Tensor) and value.ndim == 0:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise ValueError(
        f"metric must return a scalar for the logits of one run, got {shape}; reduce over "
        "the batch (e.g. .mean())"
    )


def _component_shape(source: Tensor, site: str, by: Sweep) -> tuple[int, ...]:
    """One layer's components: `()` (the whole site), `(seq,)`, `(n_head,)` or `(seq, n_head)`."""
    head_axis, position_axis = site_axes(f"h.0.{site}")
    if by == "layer":
        return ()
    if by == "position":
        return (source.shape[position_axis],)
    assert head_axis is not None  # _check_sweep: head sweeps need a head axis
    if by == "head":
        return (source.shape[head_axis],)
    return (source.shape[position_axis], source.shape[head_axis])


def _selection(source: Tensor, site: str, by: Sweep, components: Tensor) -> Tensor:
    """`(k, 1, *activation axes)` bool: True where run `k` of a chunk takes the clean value.

    `components` number the components row-major in `_component_shape`'s order.
    """
    head_axis, position_axis = site_axes(f"h.0.{site}")
    selected = torch.ones((len(components),) + (1,) * source.ndim, dtype=torch.bool)
    if by == "layer":
        return selected
    n_head = source.shape[head_axis] if head_axis is not None else 1
    indices = {
        "position": [(position_axis, components)],
        "head": [(head_axis, components)],
        "head_position": [(position_axis, components // n_head), (head_axis, components % n_head)],
    }[by]
    for axis, index in indices:
        shape = [len(components)] + [1] * source.ndim
        shape[1 + axis] = source.shape[axis]
        selected = selected & F.one_hot(index, source.shape[axis]).bool().view(shape)
    return selected.to(source.device)


def _stacked_patch(source: Tensor, selected: Tensor) -> Hook:
    """A hook over `k` stacked runs (`k * batch` rows): run `i` takes `source` where
    `selected[i]` is True."""

    def hook(activation: Tensor) -> Tensor:
        runs = activation.reshape(selected.shape[0], *source.shape)
        return torch.where(selected, source, runs).reshape(activation.shape)

    return hook


def _constant(value: Tensor) -> Hook:
    def hook(activation: Tensor) -> Tensor:
        return value

    return hook


def _probe(site: str, hook: Hook | None, deltas: dict[str, Tensor]) -> Hook:
    """`hook` (if any), then `+ delta` with a zero `delta` that autograd differentiates at."""

    def add_delta(activation: Tensor) -> Tensor:
        if hook is not None:
            activation = apply_hook(site, hook, activation)
        deltas[site] = torch.zeros_like(activation, requires_grad=True)
        return activation + deltas[site]

    return add_delta


def _senders(senders: object, config: GPTConfig) -> dict[int, list[int]]:
    """Sender heads by layer, or `ValueError` naming a bad one."""
    if isinstance(senders, (str, bytes)) or not isinstance(senders, Sequence) or not senders:
        raise ValueError(f"senders must be a non-empty list of (layer, head), got {senders!r}")
    by_layer: dict[int, list[int]] = {}
    for sender in senders:
        if not (isinstance(sender, tuple) and len(sender) == 2):
            raise ValueError(f"each sender must be a (layer, head) pair, got {sender!r}")
        layer, head = sender
        if check_int("sender layer", layer, at_least=0) >= config.n_layer:
            raise ValueError(f"sender layer {layer} is outside the model's {config.n_layer}")
        if check_int("sender head", head, at_least=0) >= config.n_head:
            raise ValueError(f"sender head {head} is outside the model's {config.n_head}")
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def _check_receivers(receivers: object, last_sender: int, config: GPTConfig) -> int:
    """The first receiver's layer (`n_layer` for `ln_f`/`logits`), or `ValueError`."""
    if not isinstance(receivers, Mapping) or not receivers:
        raise ValueError(
            f"receivers must be a non-empty {{site: heads or None}} mapping, got {receivers!r}"
        )
    check_hooks(dict.fromkeys(receivers, identity), config)
    layers = []
    for site, heads in receivers.items():
        layer = int(site.split(".")[1]) if site.startswith("h.") else config.n_layer
        if site in ("tok_embed", "pos_embed", "embed") or layer <= last_sender:
            raise ValueError(
                f"receiver {site!r} is not after the last sender's block ({last_sender})"
            )
        if site.endswith(("attn.z", "attn.out")):
            raise ValueError(
                f"receiver {site!r}: head outputs are frozen in path patching; receive at a "
                "head's q/k/v or a residual site"
            )
        if heads is not None and site_axes(site)[0] is None:
            raise ValueError(f"receiver {site!r} has no head axis: give None, not {heads!r}")
        layers.append(layer)
    return min(layers)
