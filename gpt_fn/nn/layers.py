"""Pure layer functions of GPT-2 other than attention: embeddings, LayerNorm, GELU MLP, dropout.

Each takes the slice of the parameter dict it reads (`p`, keys relative to the layer, as
`"c_fc.weight"`), the activations, and keyword-only configuration. Weights are stored
`(out, in)` like `nn.Linear`, so `F.linear` applies them (nanoGPT, GPT-2 with its Conv1D
transposed).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from gpt_fn.shapes import Activations, Params, Tokens


def embed(
    wte: Float[Tensor, "vocab d_model"],
    wpe: Float[Tensor, "block d_model"],
    tokens: Tokens,
    positions: Int[Tensor, "batch seq"] | None = None,
    *,
    tap: Callable[[str, Tensor], Tensor] | None = None,
) -> Activations:
    """Token plus learned position embeddings; `positions` default to `0 .. seq-1` in every row
    (a padded batch or a KV cache passes each token's own).

    `tap(site, activation)` sees (and may replace) `tok_embed` and `pos_embed`, both
    `batch seq d_model`, before they are summed.
    """
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
    tok, pos = F.embedding(tokens, wte), F.embedding(positions, wpe)
    if tap is not None:
        tok, pos = tap("tok_embed", tok), tap("pos_embed", pos.expand_as(tok))
    return tok + pos


def layer_norm(
    p: Params,
    x: Float[Tensor, "*batch d_model"],
    *,
    eps: float,
    tap: Callable[[str, Tensor], Tensor] | None = None,
) -> Float[Tensor, "*batch d_model"]:
    """LayerNorm over the last axis with gain `weight` and optional `bias`.

    `tap(site, activation)` sees (and may replace, e.g. to freeze it) `scale`, the `*batch 1`
    denominator `sqrt(var + eps)`; a tap computes the norm explicitly instead of the fused kernel.
    """
    if tap is None:
        return F.layer_norm(x, x.shape[-1:], p["weight"], p.get("bias"), eps)
    centered = x - x.mean(-1, keepdim=True)
    scale = tap("scale", (centered.pow(2).mean(-1, keepdim=True) + eps).sqrt())
    normalized = centered / scale * p["weight"]
    return normalized if p.get("bias") is None else normalized + p["bias"]


def mlp(
    p: Params, x: Activations, *, tap: Callable[[str, Tensor], Tensor] | None = None
) -> Activations:
    """GPT-2's 4x MLP: c_fc, GELU with the tanh approximation (as GPT-2 was trained), c_proj.

    `tap(site, activation)` sees (and may replace) `pre` and `post`, the `batch seq d_mlp`
    activations before and after the GELU.
    """
    hidden = F.linear(x, p["c_fc.weight"], p.get("c_fc.bias"))
    if tap is not None:
        hidden = tap("pre", hidden)
    hidden = F.gelu(hidden, approximate="tanh")
    if tap is not None:
        hidden = tap("post", hidden)
    return F.linear(hidden, p["c_proj.weight"], p.get("c_proj.bias"))


def dropout(
    x: Float[Tensor, "*shape"], *, rate: float, generator: torch.Generator | None
) -> Float[Tensor, "*shape"]:
    """Inverted dropout drawing its mask from `generator`; identity when rate is 0 or no generator.

    Passing a generator is what "training mode" means here: randomness is an argument, so the
    same generator state gives the same mask (unlike `F.dropout`, which reads global RNG state).
    """
    if rate == 0.0 or generator is None:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= rate
    return x * keep / (1.0 - rate)
