"""The GPT-2 model as pure functions over a parameter dict: init, forward, loss, validation.

`forward(params, tokens, config)` is the whole model: embeddings, `n_layer` pre-norm blocks
(LayerNorm -> causal self-attention -> residual, LayerNorm -> 4x GELU MLP -> residual), a
final LayerNorm and the LM head tied to the token embedding (Radford et al. 2019; nanoGPT
`model.py`). Parameter names are GPT-2's (`h.3.attn.c_attn.weight`), without HF's
`transformer.` prefix.
"""

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from gpt_fn.checks import check_int, check_token_ids, check_token_tensor
from gpt_fn.config import GPTConfig
from gpt_fn.nn import (
    AttentionKernel,
    LayerCache,
    dropout,
    embed,
    layer_norm,
    linear_cross_entropy,
    mlp,
    self_attention,
)
from gpt_fn.shapes import Activations, Logits, Params, Tokens

KVCache = tuple[LayerCache, ...]
"""One `LayerCache` per block: keys/values of every position processed so far."""


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the one vocabulary of names)."""
    d, c = config.n_embd, config
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (c.vocab_size, d),
        "wpe.weight": (c.block_size, d),
    }

    def linear(name: str, d_out: int, d_in: int) -> None:
        shapes[f"{name}.weight"] = (d_out, d_in)
        if c.bias:
            shapes[f"{name}.bias"] = (d_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (d,)
        if c.bias:
            shapes[f"{name}.bias"] = (d,)

    for i in range(c.n_layer):
        norm(f"h.{i}.ln_1")
        linear(f"h.{i}.attn.c_attn", 3 * d, d)
        linear(f"h.{i}.attn.c_proj", d, d)
        norm(f"h.{i}.ln_2")
        linear(f"h.{i}.mlp.c_fc", 4 * d, d)
        linear(f"h.{i}.mlp.c_proj", d, 4 * d)
    norm("ln_f")
    return shapes


def init_params(
    config: GPTConfig,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Params:
    """GPT-2 initialisation, the same numbers for a seed on every device.

    Weights ~ N(0, 0.02); the projections that write into the residual stream (`c_proj`)
    ~ N(0, 0.02 / sqrt(2 n_layer)) so the residual's variance does not grow with depth (GPT-2
    paper, section 2.3); biases 0; LayerNorm gains 1. `wte` doubles as the LM head.
    """
    check_int("seed", seed, at_least=0)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params: Params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".bias"):
            value = torch.zeros(shape)
        elif len(shape) == 1:  # LayerNorm gain
            value = torch.ones(shape)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            value = torch.randn(shape, generator=generator) * std
        params[name] = value.to(device=device, dtype=dtype)
    return params


def check_params(params: Params, config: GPTConfig) -> None:
    """Raise naming the first param that does not fit `config` or the others.

    `KeyError` for a missing or unexpected key, `ValueError` for a wrong shape or a param on
    another device than `wte.weight`, `TypeError` for a non-floating param or one whose dtype
    differs from `wte.weight`'s. Mixed dtypes are let through under autocast on the params'
    device, which casts the matmuls' operands (fp16 weights with fp32 LayerNorms, apex's O2).
    """
    check_shapes(params, param_shapes(config), what="params")
    dtypes = {value.dtype for value in params.values()}
    devices = {value.device for value in params.values()}
    if len(dtypes) == 1 and len(devices) == 1 and next(iter(dtypes)).is_floating_point:
        return  # the common case: one pass for each, no per-param comparisons
    first = params["wte.weight"]
    for name, value in params.items():
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"params: {name!r} has dtype {value.dtype}; params must be floating point"
            )
        if value.device != first.device:
            raise ValueError(
                f"params: {name!r} is on {value.device} but 'wte.weight' is on {first.device}; "
                "move every param to one device"
            )
        if value.dtype != first.dtype and not torch.is_autocast_enabled(first.device.type):
            raise TypeError(
                f"params: {name!r} has dtype {value.dtype} but 'wte.weight' has {first.dtype}; "
                "cast every param to one dtype (or run under autocast)"
            )


def check_shapes(
    tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], *, what: str
) -> None:
    """`tensors` has exactly the keys of `expected`, with those shapes; errors name the key."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise KeyError(
            f"{what}: missing {len(missing)} key(s) for this config, e.g. {missing[0]!r}"
        )
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise KeyError(f"{what}: unexpected key(s) for this config, e.g. {unexpected[0]!r}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                "for this config"
            )


def check_tokens(
    tokens: Tensor,
    config: GPTConfig,
    *,
    position_offset: int = 0,
    cropped: bool = False,
    name: str = "tokens",
) -> None:
    """Raise `ValueError`/`TypeError` naming what is wrong with a `(batch, seq)` token tensor.

    It must be an int64/int32 tensor of ids in `[0, vocab_size)` whose `position_offset +
    seq` positions fit in `block_size`; `cropped=True`: any length (the caller keeps only the
    last `block_size` tokens). The id range is not checked while compiling or under vmap.
    """
    check_token_tensor(name, tokens)
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, seq), got shape {tuple(tokens.shape)}")
    if not cropped and position_offset + tokens.shape[1] > config.block_size:
        raise ValueError(
            f"sequence of {position_offset + tokens.shape[1]} positions is longer than "
            f"block_size={config.block_size}"
        )
    what = "token id" if name == "tokens" else f"{name}: token id"
    check_token_ids(what, tokens, vocab_size=config.vocab_size)


def _split(params: Params, n_layer: int) -> tuple[dict[str, Params], list[dict[str, Params]]]:
    """One pass over the dict: top-level parts' params, and per block its parts' params.

    `blocks[i]["attn"]` maps `"c_attn.weight"` to `params["h.{i}.attn.c_attn.weight"]` and
    `top["ln_f"]` maps `"weight"` to `params["ln_f.weight"]`; the layer functions read relative
    names, and a decode step pays O(params), not O(layers x params).
    """
    top: dict[str, Params] = {}
    blocks: list[dict[str, Params]] = [
        {"ln_1": {}, "attn": {}, "ln_2": {}, "mlp": {}} for _ in range(n_layer)
    ]
    for name, value in params.items():
        if name.startswith("h."):
            _, index, part, rest = name.split(".", 3)
            blocks[int(index)][part][rest] = value
        else:
            part, rest = name.split(".", 1)
            top.setdefault(part, {})[rest] = value
    return top, blocks


def transformer(
    params: Params,
    tokens: Tokens,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    cache: KVCache | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Activations, KVCache]:
    """Final-LayerNormed hidden states of `tokens` (after any cached positions), and the new cache.

    `generator` switches dropout on (config.dropout > 0); without one the function is
    deterministic. Inputs are not validated here: `forward`/`loss`/decoding do that once.
    """
    offset = 0 if cache is None else cache[0].k.shape[2]
    x = embed(params["wte.weight"], params["wpe.weight"], tokens, position_offset=offset)
    x = dropout(x, rate=config.dropout, generator=generator)
    top, blocks = _split(params, config.n_layer)
    eps = config.layer_norm_eps
    new_cache = []
    for i, block in enumerate(blocks):
        attn_out, layer_cache = self_attention(
            block["attn"],
            layer_norm(block["ln_1"], x, eps=eps),
            n_head=config.n_head,
            attention=attention,
            cache=None if cache is None else cache[i],
        )
        x = x + dropout(attn_out, rate=config.dropout, generator=generator)
        mlp_out = mlp(block["mlp"], layer_norm(block["ln_2"], x, eps=eps))
        x = x + dropout(mlp_out, rate=config.dropout, generator=generator)
        new_cache.append(layer_cache)
    return layer_norm(top["ln_f"], x, eps=eps), tuple(new_cache)


def lm_head(
    params: Params, hidden: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch vocab"]:
    """Logits from hidden states through the token embedding (weight tying, GPT-2)."""
    return F.linear(hidden, params["wte.weight"])


def forward(
    params: Params,
    tokens: Tokens,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    generator: torch.Generator | None = None,
) -> Logits:
    """Next-token logits at every position: tokens in, logits out."""
    check_params(params, config)
    check_tokens(tokens, config)
    hidden, _ = transformer(params, tokens, config, attention=attention, generator=generator)
    return lm_head(params, hidden)


def loss(
    params: Params,
    tokens: Tokens,
    targets: Tokens,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    generator: torch.Generator | None = None,
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy of `targets` (usually `tokens` shifted left by one)."""
    check_params(params, config)
    check_tokens(tokens, config)
    check_tokens(targets, config, name="targets")
    if targets.shape != tokens.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}"
        )
    hidden, _ = transformer(params, tokens, config, attention=attention, generator=generator)
    # Fused LM head + loss: never materialises the (batch*seq, vocab) logits.
    return linear_cross_entropy(hidden.flatten(0, 1), params["wte.weight"], targets.flatten())
