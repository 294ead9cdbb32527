"""Causal self-attention with a single QKV projection, two interchangeable kernels, KV cache.

Both kernels share one signature and one masking rule: the `seq_q` queries are the *last*
`seq_q` positions of the `seq_k` keys (bottom-right aligned), so the same code serves
training (seq_q == seq_k), cache prefill and one-token decode steps.

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels where the device has them).
- `manual`: einops + explicit causal mask + softmax, the textbook formula (nanoGPT's slow path,
  TransformerLens' layout).
"""

import math
from typing import Literal, NamedTuple, get_args

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from gpt_fn.checks import check_choice
from gpt_fn.shapes import Activations, Params

AttentionKernel = Literal["sdpa", "manual"]
"""The `attention=` knob of the model, the module, decoding and training."""
KERNELS: tuple[AttentionKernel, ...] = get_args(AttentionKernel)


class LayerCache(NamedTuple):
    """Keys and values of one layer for the positions seen so far."""

    k: Float[Tensor, "batch n_head seq d_head"]
    v: Float[Tensor, "batch n_head seq d_head"]


def sdpa_kernel(
    q: Float[Tensor, "batch n_head seq_q d_head"],
    k: Float[Tensor, "batch n_head seq_k d_head"],
    v: Float[Tensor, "batch n_head seq_k d_head"],
) -> Float[Tensor, "batch n_head seq_q d_head"]:
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    if seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if seq_q == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v)
    # is_causal aligns top-left; a chunk after a cache needs bottom-right alignment.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(seq_q, seq_k, q.device))


def manual_kernel(
    q: Float[Tensor, "batch n_head seq_q d_head"],
    k: Float[Tensor, "batch n_head seq_k d_head"],
    v: Float[Tensor, "batch n_head seq_k d_head"],
) -> Float[Tensor, "batch n_head seq_q d_head"]:
    scores = einops.einsum(
        q, k, "batch n_head seq_q d_head, batch n_head seq_k d_head -> batch n_head seq_q seq_k"
    ) / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return einops.einsum(
        weights,
        v,
        "batch n_head seq_q seq_k, batch n_head seq_k d_head -> batch n_head seq_q d_head",
    )


def causal_mask(seq_q: int, seq_k: int, device: torch.device) -> torch.Tensor:
    """`[i, j]` is True where query i (the i-th of the last seq_q positions) may see key j."""
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(diagonal=seq_k - seq_q)


_KERNEL_FNS = {"sdpa": sdpa_kernel, "manual": manual_kernel}


def self_attention(
    p: Params,
    x: Activations,
    *,
    n_head: int,
    attention: AttentionKernel = "sdpa",
    cache: LayerCache | None = None,
) -> tuple[Activations, LayerCache]:
    """Causal self-attention of `x` (after any `cache`d positions); returns output and new cache.

    The returned cache holds keys/values of the cached positions followed by those of `x`;
    it is a new pair of tensors (the input cache is not modified).
    """
    check_choice("attention kernel", attention, KERNELS)
    batch, seq, d_model = x.shape
    # "batch seq (three n_head d_head) -> three batch n_head seq d_head" as view + permute:
    # einops.rearrange costs ~30 us of Python per call, a tenth of a one-token decode step.
    q, k, v = (
        F.linear(x, p["c_attn.weight"], p.get("c_attn.bias"))
        .view(batch, seq, 3, n_head, d_model // n_head)
        .permute(2, 0, 3, 1, 4)
    )
    if cache is not None:
        k = torch.cat([cache.k, k], dim=2)
        v = torch.cat([cache.v, v], dim=2)
    out = _KERNEL_FNS[attention](q, k, v)
    # "batch n_head seq d_head -> batch seq (n_head d_head)"
    out = out.transpose(1, 2).reshape(batch, seq, d_model)
    return F.linear(out, p["c_proj.weight"], p.get("c_proj.bias")), LayerCache(k, v)
