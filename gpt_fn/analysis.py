"""Readouts on caches: the residual stream as a stack of parts, per-head results, LayerNorm
applied to a stack, the logit lens, direct logit attribution, and weight processing.

TransformerLens's `ActivationCache` methods and weight processing (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"; nostalgebraist's logit lens), written as
pure functions of `(params, cache, config)`: a cache is the plain dict `run_with_cache`
returns, so a readout never re-runs the model. A stack is `component *batch_pos d_model`
with one label per component; `pos` (an int or a slice of the sequence axis, as in
`tensor[:, pos]`) selects positions first, so an int drops the `seq` axis.

LayerNorm is always an explicit choice: `ln="frozen"` divides by the scale the model used
(the cached `*.scale` site, which makes the readout linear in the stack: what attribution
needs), `ln="recompute"` normalises each stack row by its own statistics (what a logit lens
of a partial stream reads). Applying a LayerNorm to a stack centres and divides; its gain and
bias are left to the caller (`fold_layer_norm` moves a block's into the next weights; the
logit readouts here apply `ln_f`'s).
"""

from collections.abc import Mapping
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gpt_fn.checks import (
    check_bool,
    check_choice,
    check_int,
    check_token_ids,
    check_token_tensor,
)
from gpt_fn.config import GPTConfig
from gpt_fn.model import lm_head
from gpt_fn.nn import project_heads
from gpt_fn.shapes import Params
from gpt_fn.sites import resid_entering

Cache = Mapping[str, Tensor]
"""Activations by site name, as `run_with_cache` returns them."""
Stack = Float[Tensor, "component *batch_pos d_model"]
Attrs = Float[Tensor, "component *batch_pos"]  # noqa: F821 (axis names that parse as Python)
"""One number per component and position: what each component adds to a logit."""
Pos = int | slice | None
"""Which positions a readout keeps: `tensor[:, pos]` (None: all)."""
LayerNormMode = Literal["frozen", "recompute"]
LN_MODES: tuple[LayerNormMode, ...] = ("frozen", "recompute")


def accumulated_resid(
    cache: Cache,
    config: GPTConfig,
    *,
    layer: int | None = None,
    incl_mid: bool = False,
    apply_ln: bool = False,
    ln: LayerNormMode = "frozen",
    pos: Pos = None,
) -> tuple[Stack, list[str]]:
    """The residual stream entering each block up to `layer` (None or -1: also the stream
    leaving the last block), labelled `"0_pre"`, (`"0_mid"`,) ..., `"final_post"`.

    `apply_ln`: normalised by the LayerNorm that reads the stream at `layer` (`h.{layer}.ln_1`,
    or `ln_f` for the final stream), with `ln` as in `apply_ln_to_stack`.
    TransformerLens: `cache.accumulated_resid(layer, incl_mid, apply_ln, pos_slice)`, which
    at the final stream recomputes the final LayerNorm with its gain and bias.
    """
    layer = _layer(layer, config)
    parts, labels = [], []
    for i in range(layer + 1):
        parts.append(cached(cache, resid_entering(i, config), "accumulated_resid"))
        if i == config.n_layer:
            labels.append("final_post")
            continue
        labels.append(f"{i}_pre")
        if check_bool("incl_mid", incl_mid) and i < layer:
            parts.append(cached(cache, f"h.{i}.resid_mid", "accumulated_resid"))
            labels.append(f"{i}_mid")
    stack = torch.stack([_at(part, pos) for part in parts])
    if check_bool("apply_ln", apply_ln):
        stack = apply_ln_to_stack(stack, cache, config, at=_reader(layer, config), ln=ln, pos=pos)
    return stack, labels


def decompose_resid(
    cache: Cache,
    config: GPTConfig,
    *,
    layer: int | None = None,
    mode: Literal["all", "attn", "mlp"] = "all",
    embeds: Literal["sum", "split", "none"] = "sum",
    apply_ln: bool = False,
    ln: LayerNormMode = "frozen",
    pos: Pos = None,
) -> tuple[Stack, list[str]]:
    """The residual stream entering `layer` (None or -1: leaving the last block) as the sum of
    what wrote to it: the embedding, then each earlier block's `"{i}_attn_out"` and
    `"{i}_mlp_out"` (`mode` keeps only one kind).

    `embeds`: `"sum"` one `"embed"` component, `"split"` `"tok_embed"` and `"pos_embed"`
    (TransformerLens's `"embed"` and `"pos_embed"`), `"none"` leaves them out. With `mode="all"`
    and embeddings in, the components sum to the stream (dropout off). `apply_ln` as in
    `accumulated_resid`. TransformerLens: `cache.decompose_resid(layer, mode=, incl_embeds=)`.
    """
    layer = _layer(layer, config)
    check_choice("mode", mode, ("all", "attn", "mlp"))
    check_choice("embeds", embeds, ("sum", "split", "none"))
    names = {"sum": ["embed"], "split": ["tok_embed", "pos_embed"], "none": []}[embeds]
    sites, labels = list(names), list(names)
    for i in range(layer):
        for part in ("attn", "mlp"):
            if mode in ("all", part):
                sites.append(f"h.{i}.{part}.out")
                labels.append(f"{i}_{part}_out")
    if not sites:
        raise ValueError(f"decompose_resid(layer={layer}, embeds='none') has no component")
    stack = torch.stack([_at(cached(cache, site, "decompose_resid"), pos) for site in sites])
    if check_bool("apply_ln", apply_ln):
        stack = apply_ln_to_stack(stack, cache, config, at=_reader(layer, config), ln=ln, pos=pos)
    return stack, labels


def head_results(
    params: Params, cache: Cache, config: GPTConfig, *, layer: int
) -> Float[Tensor, "batch seq n_head d_model"]:
    """Each head's contribution to `h.{layer}.attn.out`: the cached `attn.result` if there is
    one, else `attn.z` through each head's slice of `c_proj` (summed over heads, plus the
    bias, it is `attn.out`). TransformerLens: `cache.compute_head_results()`."""
    if check_int("layer", layer, at_least=0) >= config.n_layer:
        raise ValueError(f"layer {layer} is outside the model's {config.n_layer} blocks")
    site = f"h.{layer}.attn.result"
    if site in cache:
        return cache[site]
    z = cached(cache, f"h.{layer}.attn.z", "head_results", also=site)
    return project_heads(z, params[f"h.{layer}.attn.c_proj.weight"])


def stack_head_results(
    params: Params,
    cache: Cache,
    config: GPTConfig,
    *,
    layer: int | None = None,
    incl_remainder: bool = False,
    apply_ln: bool = False,
    ln: LayerNormMode = "frozen",
    pos: Pos = None,
) -> tuple[Stack, list[str]]:
    """Every head's result in the blocks before `layer` (None or -1: all), labelled
    `"L{i}H{h}"`; `incl_remainder` adds `"remainder"`, the stream entering `layer` minus the
    heads (embeddings, MLPs and attention biases), so the stack sums to the stream.
    `apply_ln` as in `accumulated_resid`. TransformerLens: `cache.stack_head_results(...)`."""
    layer = _layer(layer, config)
    parts, labels = [], []
    for i in range(layer):
        result = _at(head_results(params, cache, config, layer=i), pos)
        parts.extend(result.unbind(-2))
        labels.extend(f"L{i}H{h}" for h in range(config.n_head))
    if check_bool("incl_remainder", incl_remainder):
        stream = _at(cached(cache, resid_entering(layer, config), "stack_head_results"), pos)
        parts.append(stream - sum(parts) if parts else stream)
        labels.append("remainder")
    if not parts:
        raise ValueError(f"stack_head_results(layer={layer}) has no head before layer {layer}")
    stack = torch.stack(parts)
    if check_bool("apply_ln", apply_ln):
        stack = apply_ln_to_stack(stack, cache, config, at=_reader(layer, config), ln=ln, pos=pos)
    return stack, labels


def apply_ln_to_stack(
    stack: Stack,
    cache: Cache,
    config: GPTConfig,
    *,
    at: str = "ln_f",
    ln: LayerNormMode = "frozen",
    pos: Pos = None,
) -> Stack:
    """The stack centred and divided as the LayerNorm `at` (`"ln_f"`, `"h.{i}.ln_1"`,
    `"h.{i}.ln_2"`) divides: by its cached scale (`ln="frozen"`, needs the `{at}.scale` site;
    the readout stays linear, so the rows still sum to the normalised stream) or by each
    row's own (`"recompute"`). `pos`: the positions the stack was cut to. The LayerNorm's gain
    and bias are not applied. TransformerLens: `cache.apply_ln_to_stack(stack, layer,
    pos_slice=, recompute_ln=)` (whose `recompute_ln` runs the final LayerNorm itself, gain and
    bias included)."""
    check_choice("ln", ln, LN_MODES)
    _check_norm(at, config)
    centered = stack - stack.mean(-1, keepdim=True)
    if ln == "recompute":
        return centered / (centered.pow(2).mean(-1, keepdim=True) + config.layer_norm_eps).sqrt()
    scale = _at(cached(cache, f"{at}.scale", "apply_ln_to_stack(ln='frozen')"), pos)
    if scale.shape[:-1] != stack.shape[1:-1]:
        raise ValueError(
            f"the stack's positions {tuple(stack.shape[1:-1])} differ from {at}.scale's "
            f"{tuple(scale.shape[:-1])}: pass the pos= the stack was cut with"
        )
    return centered / scale


def logit_lens(
    params: Params,
    cache: Cache,
    config: GPTConfig,
    *,
    ln: LayerNormMode = "frozen",
    incl_mid: bool = False,
    pos: Pos = None,
) -> tuple[Float[Tensor, "component *batch_pos vocab"], list[str]]:
    """The logits each partial residual stream would give if the model stopped there: the
    accumulated stream (labels as `accumulated_resid`'s) through `ln_f` and the LM head.

    `ln="frozen"` divides every stream by the final LayerNorm's cached scale (`ln_f.scale`);
    `"recompute"` normalises each by its own statistics (TransformerLens's `logit_lens`). The
    last row is the model's logits either way. The result holds `n_layer + 1` (with `incl_mid`,
    `2 n_layer + 1`) logit tensors: `pos=-1` keeps one position.
    """
    stack, labels = accumulated_resid(cache, config, incl_mid=incl_mid, pos=pos)
    normed = apply_ln_to_stack(stack, cache, config, at="ln_f", ln=ln, pos=pos)
    hidden = normed * params["ln_f.weight"]
    if "ln_f.bias" in params:
        hidden = hidden + params["ln_f.bias"]
    return lm_head(params, hidden), labels


def logit_attrs(
    params: Params,
    stack: Stack,
    tokens: Int[Tensor, "*batch_pos"],
    config: GPTConfig,
    *,
    incorrect: Int[Tensor, "*batch_pos"] | None = None,
) -> Attrs:
    """Each component's direct contribution to the logit of `tokens` (minus that of
    `incorrect`): a stack already through `apply_ln_to_stack(..., at="ln_f")`, times `ln_f`'s
    gain, dotted with the tokens' unembedding (`wte`, the tied LM head).

    With a frozen LayerNorm the rows sum, plus `ln_f_bias_attr`, to the logit (difference).
    `tokens` has the stack's batch and position axes. TransformerLens: `cache.logit_attrs(
    stack, tokens, incorrect_tokens)` (which applies the frozen final LayerNorm itself, and
    no gain: its weights are folded).
    """
    directions = _directions(params, tokens, config, incorrect, shape=stack.shape[1:-1])
    return ((stack * params["ln_f.weight"]) * directions).sum(-1)


def ln_f_bias_attr(
    params: Params,
    tokens: Int[Tensor, "*batch_pos"],
    config: GPTConfig,
    *,
    incorrect: Int[Tensor, "*batch_pos"] | None = None,
) -> Float[Tensor, "*batch_pos"]:
    """The final LayerNorm's bias's contribution to the logit of `tokens` (minus that of
    `incorrect`): the one term of a logit that no residual component writes."""
    directions = _directions(params, tokens, config, incorrect, shape=tokens.shape)
    bias = params.get("ln_f.bias")
    return torch.zeros_like(directions[..., 0]) if bias is None else (bias * directions).sum(-1)


def direct_logit_attribution(
    params: Params,
    cache: Cache,
    tokens: Int[Tensor, "*batch_pos"],
    config: GPTConfig,
    *,
    by: Literal["component", "head", "layer"] = "component",
    incorrect: Int[Tensor, "*batch_pos"] | None = None,
    pos: Pos = -1,
) -> tuple[Attrs, list[str]]:
    """How much each part of the model writes the logit of `tokens` (minus `incorrect`'s)
    directly, through the frozen final LayerNorm, at positions `pos` (default the last).

    `by="component"`: the embedding and each block's attention and MLP (`decompose_resid`'s
    labels); `"head"`: each head (`"L{i}H{h}"`) and the `"remainder"`; `"layer"`: the
    accumulated stream after each sublayer (`accumulated_resid(incl_mid=True)`'s labels). The
    last row, `"ln_f.bias"`, is the final LayerNorm's bias: by component or head the rows sum
    to the logit (difference); by layer each row plus it is the frozen logit lens's.
    TransformerLens: `tools.analysis.direct_logit_attribution(model, unit=by, cache=)`.
    """
    check_choice("by", by, ("component", "head", "layer"))
    if by == "component":
        stack, labels = decompose_resid(cache, config, pos=pos)
    elif by == "head":
        stack, labels = stack_head_results(params, cache, config, incl_remainder=True, pos=pos)
    else:
        stack, labels = accumulated_resid(cache, config, incl_mid=True, pos=pos)
    normed = apply_ln_to_stack(stack, cache, config, at="ln_f", ln="frozen", pos=pos)
    attrs = logit_attrs(params, normed, tokens, config, incorrect=incorrect)
    bias = ln_f_bias_attr(params, tokens, config, incorrect=incorrect)
    return torch.cat([attrs, bias[None]]), [*labels, "ln_f.bias"]


def _directions(
    params: Params,
    tokens: Tensor,
    config: GPTConfig,
    incorrect: Tensor | None,
    *,
    shape: tuple[int, ...],
) -> Tensor:
    """The unembedding rows of `tokens` (minus those of `incorrect`), ids of shape `shape`."""
    for name, value in (("tokens", tokens), ("incorrect", incorrect)):
        if value is None:
            continue
        check_token_tensor(name, value)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; the stack's batch and position axes "
                f"are {tuple(shape)}"
            )
        check_token_ids(f"{name}: token id", value, vocab_size=config.vocab_size)
    wte = params["wte.weight"]
    return wte[tokens] if incorrect is None else wte[tokens] - wte[incorrect]


def cached(cache: Cache, site: str, readout: str, *, also: str | None = None) -> Tensor:
    """`cache[site]`, or a `ValueError` naming the site, the `readout` needing it and how to
    record it."""
    if site in cache:
        return cache[site]
    other = "" if also is None else f" (or {also!r})"
    raise ValueError(
        f"{readout} needs {site!r}{other}, which the cache lacks: record it with "
        f"run_with_cache(..., names=[{site!r}, ...]) or names=None"
    )


def _layer(layer: int | None, config: GPTConfig) -> int:
    """A stream index in `0 .. n_layer` (n_layer: leaving the last block); None or -1: n_layer."""
    if layer is None or layer == -1:
        return config.n_layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= config.n_layer:
        raise ValueError(
            f"layer must be an int in 0..{config.n_layer} (or -1/None: after the last block), "
            f"got {layer!r}"
        )
    return layer


def _reader(layer: int, config: GPTConfig) -> str:
    """The LayerNorm that reads the stream entering block `layer`: its ln_1, or ln_f."""
    return "ln_f" if layer == config.n_layer else f"h.{layer}.ln_1"


def _check_norm(at: str, config: GPTConfig) -> None:
    norms = {"ln_f"} | {f"h.{i}.{n}" for i in range(config.n_layer) for n in ("ln_1", "ln_2")}
    if at not in norms:
        raise ValueError(
            f"unknown LayerNorm {at!r}: ln_f, or h.{{0..{config.n_layer - 1}}}.ln_1 / .ln_2"
        )


def _at(activation: Tensor, pos: Pos) -> Tensor:
    """The positions `pos` of a `batch seq ...` activation."""
    if pos is None:
        return activation
    if isinstance(pos, bool) or not isinstance(pos, (int, slice)):
        raise TypeError(f"pos must be an int, a slice or None, got {pos!r}")
    if isinstance(pos, int) and not -activation.shape[1] <= pos < activation.shape[1]:
        raise ValueError(f"pos {pos} is outside the {activation.shape[1]} positions")
    return activation[:, pos]


# --- weight processing: params -> params, the same log-probs --------------------------------


def fold_layer_norm(params: Params, config: GPTConfig, *, center: bool = True) -> Params:
    """Each block's LayerNorm gain and bias folded into the weights that read it (`ln_1` into
    `c_attn`, `ln_2` into `c_fc`), leaving gain 1 and bias 0: the same model, whose
    `h.{i}.ln_1`/`ln_2` sites are the bare normalised streams. `center`: the folded weights
    are centred over `d_model` too (they read a zero-mean input, so this changes nothing).

    `ln_f` is left as it is: its gain would fold into the LM head, which is `wte`, tied to the
    token embedding (TransformerLens unties the two; `logit_attrs`/`logit_lens` apply `ln_f`'s
    gain and bias instead). TransformerLens: `fold_ln=True`.
    """
    out = dict(params)
    for i in range(config.n_layer):
        for norm, linear in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            gain, shift = params[f"h.{i}.{norm}.weight"], params.get(f"h.{i}.{norm}.bias")
            weight = params[f"h.{i}.{linear}.weight"]
            if shift is not None:
                out[f"h.{i}.{linear}.bias"] = params[f"h.{i}.{linear}.bias"] + weight @ shift
                out[f"h.{i}.{norm}.bias"] = torch.zeros_like(shift)
            weight = weight * gain
            out[f"h.{i}.{linear}.weight"] = (
                weight - weight.mean(1, keepdim=True) if center else weight
            )
            out[f"h.{i}.{norm}.weight"] = torch.ones_like(gain)
    return out


def center_writing_weights(params: Params, config: GPTConfig) -> Params:
    """The weights that write to the residual stream (`wpe`, each `attn.c_proj` and
    `mlp.c_proj`, with their biases) centred over `d_model`: every LayerNorm subtracts the
    mean anyway, so the model is unchanged, and the residual stream's mean is the token
    embedding's alone.

    `wte` is not centred: it is also the LM head, whose logits would change (`ln_f`, not folded
    into the tied head, does not output zero-mean vectors). TransformerLens:
    `center_writing_weights=True` (which centres `W_E` as well: its unembedding is untied).
    """
    out = dict(params)
    out["wpe.weight"] = params["wpe.weight"] - params["wpe.weight"].mean(-1, keepdim=True)
    for i in range(config.n_layer):
        for linear in ("attn.c_proj", "mlp.c_proj"):
            weight = params[f"h.{i}.{linear}.weight"]  # (d_model, in): centre each column
            out[f"h.{i}.{linear}.weight"] = weight - weight.mean(0, keepdim=True)
            if f"h.{i}.{linear}.bias" in params:
                bias = params[f"h.{i}.{linear}.bias"]
                out[f"h.{i}.{linear}.bias"] = bias - bias.mean()
    return out


def center_unembed(params: Params, config: GPTConfig) -> Params:
    """The LM head's columns centred over the vocabulary (`wte` minus its mean row `m`): each
    position's logits shift by one constant, so log-probs and logit differences are unchanged.

    `wte` is also the token embedding, so `m` moves into `wpe` (`wpe + m`): every token loses
    `m`, every position gains it, and the residual stream is unchanged. TransformerLens:
    `center_unembed=True` (on its untied `W_U`, whose columns hold `ln_f`'s gain: the same
    logits once `logit_attrs` applies the gain).
    """
    mean = params["wte.weight"].mean(0)
    return {
        **params,
        "wte.weight": params["wte.weight"] - mean,
        "wpe.weight": params["wpe.weight"] + mean,
    }


def fold_value_biases(params: Params, config: GPTConfig) -> Params:
    """Each block's value bias moved into `attn.c_proj`'s bias (`b_O + W_O b_V`), leaving 0:
    every attention row sums to 1, so each head's output carries exactly its `b_V`. The
    `attn.v`/`attn.z` sites then hold the bias-free values. TransformerLens:
    `fold_value_biases=True`."""
    out = dict(params)
    if not config.bias:
        return out
    d = config.n_embd
    for i in range(config.n_layer):
        qkv_bias = params[f"h.{i}.attn.c_attn.bias"]
        value_bias = qkv_bias[2 * d :]
        out[f"h.{i}.attn.c_attn.bias"] = torch.cat(
            [qkv_bias[: 2 * d], torch.zeros_like(value_bias)]
        )
        proj = f"h.{i}.attn.c_proj"
        out[f"{proj}.bias"] = params[f"{proj}.bias"] + params[f"{proj}.weight"] @ value_bias
    return out
