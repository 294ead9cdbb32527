"""Activation sites: the names of every intermediate a hook may read or replace.

Sites are spelled like the parameters (`h.3.attn.c_attn.weight` -> `h.3.attn.z`), each a
documented shape (axis names as in the annotations):

| site | shape | what it is |
| --- | --- | --- |
| `tok_embed`, `pos_embed` | `batch seq d_model` | token and position embeddings |
| `embed` | `batch seq d_model` | `tok_embed + pos_embed` |
| `h.{i}.resid_pre` | `batch seq d_model` | the residual stream entering block i |
| `h.{i}.ln_1.scale` | `batch seq 1` | LayerNorm's denominator `sqrt(var + eps)` before attention |
| `h.{i}.ln_1` | `batch seq d_model` | LayerNorm before attention |
| `h.{i}.attn.q`, `.k`, `.v` | `batch seq n_head d_head` | queries, keys, values (this call's positions) |
| `h.{i}.attn.scores` | `batch n_head seq_q seq_k` | `q k^T / sqrt(d_head)`, -inf where masked |
| `h.{i}.attn.pattern` | `batch n_head seq_q seq_k` | softmax of the scores (rows sum to 1) |
| `h.{i}.attn.z` | `batch seq n_head d_head` | per-head outputs, before `c_proj` |
| `h.{i}.attn.result` | `batch seq n_head d_model` | each head's `z` through its slice of `c_proj` |
| `h.{i}.attn.out` | `batch seq d_model` | attention's output (after `c_proj`) |
| `h.{i}.resid_mid` | `batch seq d_model` | `resid_pre + attn.out` |
| `h.{i}.ln_2.scale` | `batch seq 1` | LayerNorm's denominator before the MLP |
| `h.{i}.ln_2` | `batch seq d_model` | LayerNorm before the MLP |
| `h.{i}.mlp.pre`, `.post` | `batch seq d_mlp` | the MLP's hidden layer before / after GELU |
| `h.{i}.mlp.out` | `batch seq d_model` | the MLP's output |
| `h.{i}.resid_post` | `batch seq d_model` | `resid_mid + mlp.out`, leaving block i |
| `ln_f.scale` | `batch seq 1` | the final LayerNorm's denominator |
| `ln_f` | `batch seq d_model` | the final LayerNorm (the LM head's input) |
| `logits` | `batch seq vocab` | the LM head's output |

Head axes follow TransformerLens: `batch seq n_head ...` at q, k, v, z and result;
`batch n_head seq_q seq_k` at scores and pattern (`gpt_fn.hooks` reads the axes from one table).

A hook is `activation -> activation`: what it returns flows on, so it can read (return its
input), patch, ablate or steer. The sites in `ON_REQUEST_SITES` exist only when hooked:
asking for `scores` or `pattern` runs that layer's attention through `manual_kernel` (every
other layer keeps the run's kernel), `result` computes `c_proj` head by head, a `.scale` computes
that LayerNorm explicitly; the values equal the fused path's to a few ulps, not bit for bit.
With dropout on, `resid_mid` is `resid_pre` plus the *dropped-out* `attn.out` (and likewise
`resid_post`).
"""

import functools
from collections.abc import Callable, Mapping

from torch import Tensor

from gpt_fn.config import GPTConfig
from gpt_fn.nn import Kernel, Tap, manual_kernel

Hook = Callable[[Tensor], Tensor]
"""`activation -> activation` at one site: what it returns flows on."""
Hooks = Mapping[str, Hook]
"""Hooks by site name (`{"h.1.attn.z": ablate, "h.3.resid_post": steer}`)."""

BLOCK_SITES = (
    "resid_pre",
    "ln_1.scale",
    "ln_1",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.scores",
    "attn.pattern",
    "attn.z",
    "attn.result",
    "attn.out",
    "resid_mid",
    "ln_2.scale",
    "ln_2",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
)
"""A block's sites, relative to `h.{i}.`, in the order the forward pass reaches them."""
EXPLICIT_ATTENTION_SITES = ("attn.scores", "attn.pattern")
EMBED_SITES = ("tok_embed", "pos_embed", "embed")
"""The sites before every block."""
TOP_SITES = (*EMBED_SITES, "ln_f.scale", "ln_f", "logits")
"""The sites outside the blocks: `EMBED_SITES` before them, the rest after."""
ON_REQUEST_SITES = (
    *EXPLICIT_ATTENTION_SITES,
    "attn.result",
    "ln_1.scale",
    "ln_2.scale",
    "ln_f.scale",
)
"""Sites computed only when hooked, by an explicit path (`site.endswith(ON_REQUEST_SITES)`)."""


@functools.cache
def site_names(config: GPTConfig) -> tuple[str, ...]:
    """Every activation site of a model with `config`, in the order the forward pass reaches them."""
    blocks = tuple(f"h.{i}.{site}" for i in range(config.n_layer) for site in BLOCK_SITES)
    return (*EMBED_SITES, *blocks, *TOP_SITES[len(EMBED_SITES) :])


def check_hooks(hooks: object, config: GPTConfig) -> None:
    """Raise `TypeError`/`ValueError` naming the first hook that is not a callable at a known site."""
    if not isinstance(hooks, Mapping):
        raise TypeError(f"hooks must be a mapping of site name to hook, got {type(hooks).__name__}")
    known = _site_set(config)
    for name, hook in hooks.items():
        if name not in known:
            raise ValueError(
                f"unknown activation site {name!r}: sites are tok_embed, pos_embed, embed, "
                f"h.{{0..{config.n_layer - 1}}}.{{{','.join(BLOCK_SITES)}}}, ln_f.scale, ln_f "
                "and logits (gpt_fn.site_names(config) lists them)"
            )
        if not callable(hook):
            raise TypeError(f"the hook at {name!r} is not callable: {hook!r}")


def identity(activation: Tensor) -> Tensor:
    """The hook that changes nothing (to check site names with `check_hooks`, or record)."""
    return activation


def resid_entering(layer: int, config: GPTConfig) -> str:
    """The site holding the residual stream entering block `layer`: `h.{layer}.resid_pre`, or
    `h.{n_layer-1}.resid_post` (the stream leaving the last block) for `layer == n_layer`."""
    return f"h.{layer}.resid_pre" if layer < config.n_layer else f"h.{layer - 1}.resid_post"


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
    """One block's hooks, split into the taps its sublayers call (`gpt_fn.nn.Tap`).

    `block` is always a tap (`untapped` where no hook is at the block's own sites); the
    sublayers' taps are None where none of their sites is hooked, so they keep their fused
    paths (`gpt_fn.nn.layer_norm`, `gpt_fn.nn.self_attention`).
    """

    def __init__(self, index: int, hooks: Mapping[str, Hook]) -> None:
        prefix = f"h.{index}."
        entries = {name[len(prefix) :]: (name, hook) for name, hook in hooks.items()}
        self.block = _tap(entries) or untapped  # resid_*, ln_*, attn.out, mlp.out
        self.ln_1 = _tap(_under(entries, "ln_1."))  # scale
        self.attn = _tap(_under(entries, "attn."))  # q, k, v, scores, pattern, z, result
        self.ln_2 = _tap(_under(entries, "ln_2."))  # scale
        self.mlp = _tap(_under(entries, "mlp."))  # pre, post
        self.kernel: Kernel | None = None
        """`manual_kernel` with the taps where `scores`/`pattern` are hooked; else None (the
        block runs the call's kernel)."""
        if any(site in entries for site in EXPLICIT_ATTENTION_SITES):
            self.kernel = functools.partial(manual_kernel, tap=self.attn)
        self.head_results = "attn.result" in entries


def untapped(site: str, activation: Tensor) -> Tensor:
    """The tap of sites without hooks: the activation flows on as it is."""
    return activation


def layer_taps(hooks: Hooks | None, n_layer: int) -> list[LayerTaps | None]:
    """Per block, its taps (`None` for a block without hooks: it runs exactly as unhooked)."""
    if not hooks:
        return [None] * n_layer
    by_layer: list[dict[str, Hook]] = [{} for _ in range(n_layer)]
    for name, hook in hooks.items():
        if name.startswith("h."):
            by_layer[int(name.split(".", 2)[1])][name] = hook
    return [LayerTaps(i, layer) if layer else None for i, layer in enumerate(by_layer)]


def top_taps(hooks: Hooks | None) -> tuple[Tap | None, Tap | None]:
    """The taps outside the blocks: the embedding's (`tok_embed`, `pos_embed`) and `ln_f`'s
    (`scale`); `None` where no hook asks for them, so those layers run as unhooked."""
    if not hooks:
        return None, None
    embeds = {site: (site, hooks[site]) for site in ("tok_embed", "pos_embed") if site in hooks}
    return _tap(embeds), _tap(_under({n: (n, h) for n, h in hooks.items()}, "ln_f."))


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


UNHOOKED = LayerTaps(0, {})
"""The taps of a block without hooks: it runs exactly as unhooked."""
