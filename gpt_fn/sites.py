"""Activation sites: the names of every intermediate a hook may read or replace.

Sites are spelled like the parameters (`h.3.attn.c_attn.weight` -> `h.3.attn.z`), each a
documented shape (axis names as in the annotations):

| site | shape | what it is |
| --- | --- | --- |
| `embed` | `batch seq d_model` | token + position embedding |
| `h.{i}.resid_pre` | `batch seq d_model` | the residual stream entering block i |
| `h.{i}.ln_1` | `batch seq d_model` | LayerNorm before attention |
| `h.{i}.attn.q`, `.k`, `.v` | `batch n_head seq d_head` | queries, keys, values (this call's positions) |
| `h.{i}.attn.scores` | `batch n_head seq_q seq_k` | `q k^T / sqrt(d_head)`, -inf where masked |
| `h.{i}.attn.pattern` | `batch n_head seq_q seq_k` | softmax of the scores (rows sum to 1) |
| `h.{i}.attn.z` | `batch seq n_head d_head` | per-head outputs, before `c_proj` |
| `h.{i}.attn.out` | `batch seq d_model` | attention's output (after `c_proj`) |
| `h.{i}.resid_mid` | `batch seq d_model` | `resid_pre + attn.out` |
| `h.{i}.ln_2` | `batch seq d_model` | LayerNorm before the MLP |
| `h.{i}.mlp.pre`, `.post` | `batch seq d_mlp` | the MLP's hidden layer before / after GELU |
| `h.{i}.mlp.out` | `batch seq d_model` | the MLP's output |
| `h.{i}.resid_post` | `batch seq d_model` | `resid_mid + mlp.out`, leaving block i |
| `ln_f` | `batch seq d_model` | the final LayerNorm (the LM head's input) |
| `logits` | `batch seq vocab` | the LM head's output |

A hook is `activation -> activation`: what it returns flows on, so it can read (return its
input), patch, ablate or steer. `scores` and `pattern` exist only when hooked: asking for
either computes that layer's attention explicitly; every other layer keeps the fused kernel.
With dropout on, `resid_mid` is `resid_pre` plus the *dropped-out* `attn.out` (and likewise
`resid_post`).
"""

import functools
from collections.abc import Callable, Mapping

from torch import Tensor

from gpt_fn.config import GPTConfig
from gpt_fn.nn import Tap

Hook = Callable[[Tensor], Tensor]
"""`activation -> activation` at one site: what it returns flows on."""
Hooks = Mapping[str, Hook]
"""Hooks by site name (`{"h.1.attn.z": ablate, "h.3.resid_post": steer}`)."""

BLOCK_SITES = (
    "resid_pre",
    "ln_1",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.scores",
    "attn.pattern",
    "attn.z",
    "attn.out",
    "resid_mid",
    "ln_2",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
)
"""A block's sites, relative to `h.{i}.`, in the order the forward pass reaches them."""
EXPLICIT_ATTENTION_SITES = ("attn.scores", "attn.pattern")


@functools.cache
def site_names(config: GPTConfig) -> tuple[str, ...]:
    """Every activation site of a model with `config`, in the order the forward pass reaches them."""
    blocks = tuple(f"h.{i}.{site}" for i in range(config.n_layer) for site in BLOCK_SITES)
    return ("embed", *blocks, "ln_f", "logits")


def check_hooks(hooks: object, config: GPTConfig) -> None:
    """Raise `TypeError`/`ValueError` naming the first hook that is not a callable at a known site."""
    if not isinstance(hooks, Mapping):
        raise TypeError(f"hooks must be a mapping of site name to hook, got {type(hooks).__name__}")
    known = _site_set(config)
    for name, hook in hooks.items():
        if name not in known:
            raise ValueError(
                f"unknown activation site {name!r}: sites are embed, h.{{0..{config.n_layer - 1}}}"
                f".{{{','.join(BLOCK_SITES)}}}, ln_f and logits (gpt_fn.site_names(config) "
                "lists them)"
            )
        if not callable(hook):
            raise TypeError(f"the hook at {name!r} is not callable: {hook!r}")


@functools.cache
def _site_set(config: GPTConfig) -> frozenset[str]:
    return frozenset(site_names(config))


def apply_hook(name: str, hook: Hook, activation: Tensor) -> Tensor:
    """`hook(activation)`, which must be a tensor of the activation's shape, dtype and device
    (errors name the site)."""
    out = hook(activation)
    if not isinstance(out, Tensor):
        raise TypeError(f"the hook at {name!r} returned a {type(out).__name__}, not a tensor")
    if out.shape != activation.shape:
        raise ValueError(
            f"the hook at {name!r} returned shape {tuple(out.shape)}; the activation there has "
            f"shape {tuple(activation.shape)}"
        )
    if out.dtype != activation.dtype:
        raise TypeError(
            f"the hook at {name!r} returned dtype {out.dtype}; it must keep the activation's "
            f"{activation.dtype} (cast with .to(activation.dtype))"
        )
    if out.device != activation.device:
        raise TypeError(
            f"the hook at {name!r} returned a tensor on {out.device}; it must stay on the "
            f"activation's device, {activation.device}"
        )
    return out


class LayerTaps:
    """One block's hooks, split into the taps its sublayers call (`gpt_fn.nn.Tap`)."""

    def __init__(self, index: int, hooks: Mapping[str, Hook]) -> None:
        prefix = f"h.{index}."
        entries = {name[len(prefix) :]: (name, hook) for name, hook in hooks.items()}
        self.block = _tap(entries)  # resid_*, ln_*, attn.out, mlp.out
        self.attn = _tap(_under(entries, "attn."))  # q, k, v, scores, pattern, z
        self.mlp = _tap(_under(entries, "mlp."))  # pre, post
        self.explicit_attention = any(site in entries for site in EXPLICIT_ATTENTION_SITES)


def layer_taps(hooks: Hooks | None, n_layer: int) -> list[LayerTaps | None]:
    """Per block, its taps (`None` for a block without hooks: it runs exactly as unhooked)."""
    if not hooks:
        return [None] * n_layer
    by_layer: list[dict[str, Hook]] = [{} for _ in range(n_layer)]
    for name, hook in hooks.items():
        if name.startswith("h."):
            by_layer[int(name.split(".", 2)[1])][name] = hook
    return [LayerTaps(i, layer) if layer else None for i, layer in enumerate(by_layer)]


def _under(entries: dict[str, tuple[str, Hook]], part: str) -> dict[str, tuple[str, Hook]]:
    """A sublayer's entries, by their name inside it (`attn.q` -> `q`); its `out` is the block's."""
    return {
        site[len(part) :]: entry
        for site, entry in entries.items()
        if site.startswith(part) and site != part + "out"
    }


def _tap(entries: dict[str, tuple[str, Hook]]) -> Tap | None:
    if not entries:
        return None

    def tap(site: str, activation: Tensor) -> Tensor:
        entry = entries.get(site)
        return activation if entry is None else apply_hook(*entry, activation)

    return tap
