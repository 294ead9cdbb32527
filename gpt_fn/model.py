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

from gpt_fn.checks import is_traced
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
    """Raise `KeyError`/`ValueError` naming the first missing, unexpected or misshapen key."""
    check_shapes(params, param_shapes(config), what="params")


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


def check_tokens(tokens: Tensor, config: GPTConfig, *, position_offset: int = 0) -> None:
    """Raise `ValueError`/`TypeError` naming what is wrong with a `(batch, seq)` token tensor."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if position_offset + tokens.shape[1] > config.block_size:
        raise ValueError(
            f"sequence of {position_offset + tokens.shape[1]} positions is longer than "
            f"block_size={config.block_size}"
        )
    # A data-dependent check: impossible (and skipped) while compiling or under vmap.
    if tokens.numel() and not is_traced(tokens):
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside [0, vocab_size={config.vocab_size})")


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
    if targets.shape != tokens.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}"
        )
    check_tokens(targets, config)
    hidden, _ = transformer(params, tokens, config, attention=attention, generator=generator)
    # Fused LM head + loss: never materialises the (batch*seq, vocab) logits.
    return linear_cross_entropy(hidden.flatten(0, 1), params["wte.weight"], targets.flatten())
