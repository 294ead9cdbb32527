"""Causal self-attention with a single QKV projection, interchangeable kernels, masks, KV storage.

A kernel is a function with one signature (`Kernel`) and one masking rule. Without a mask,
the `seq_q` queries are the *last* `seq_q` positions of the `seq_k` keys (causal,
bottom-right aligned), so the same code serves training (seq_q == seq_k), cache prefill and
one-token decode steps. With a boolean `mask` (`batch 1 seq_q seq_k`, True = may attend) the
mask alone decides: padded batches and preallocated caches build it (`gpt_fn.model`).

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels where the device has them).
- `manual`: explicit scores, mask and softmax, the textbook formula (nanoGPT's slow path,
  TransformerLens' layout); `attention_scores` and `attention_pattern` are its two halves,
  which is where activation hooks read the scores and the pattern.

`KERNELS` maps the names to these two; `attention=` takes a name or any function with
`Kernel`'s signature (a new attention variant needs no edit to gpt_fn), and
`attention_kernel` resolves it once at the entry point.

`self_attention` computes q, k, v from `x`; a `kv` writer (a KV cache) stores this chunk's
keys and values and returns every key and value it attends to; a `tap` sees (and may
replace) q, k, v and the per-head outputs `z` on the way, and `manual_kernel`'s tap the
scores and the pattern.
"""

import math
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from gpt_fn.checks import check_choice
from gpt_fn.shapes import Activations, Params

Mask = Bool[Tensor, "batch 1 seq_q seq_k"]
"""Which keys each query may attend to (True); broadcast over heads."""


@runtime_checkable
class Kernel(Protocol):
    """`kernel(q, k, v, mask) -> z`: each query's mix of the values, per head.

    `mask` is None for plain causal attention, where the `seq_q` queries are the last `seq_q`
    of the `seq_k` keys (bottom-right aligned: training, prefill and a one-token decode step
    alike); otherwise True where a query may attend, and the mask alone decides. The result
    keeps `q`'s dtype and device. `sdpa_kernel` and `manual_kernel` are two.
    """

    def __call__(
        self,
        q: Float[Tensor, "batch n_head seq_q d_head"],
        k: Float[Tensor, "batch n_head seq_k d_head"],
        v: Float[Tensor, "batch n_head seq_k d_head"],
        mask: Mask | None = None,
        /,
    ) -> Float[Tensor, "batch n_head seq_q d_head"]: ...


Tap = Callable[[str, Tensor], Tensor]
"""`tap(site, activation) -> activation`: called at each named intermediate of a layer."""
KVWriter = Callable[
    [Float[Tensor, "batch n_head seq d_head"], Float[Tensor, "batch n_head seq d_head"]],
    tuple[Float[Tensor, "batch n_head seq_k d_head"], Float[Tensor, "batch n_head seq_k d_head"]],
]
"""Stores a chunk's keys and values; returns all the keys and values the chunk attends to."""


def sdpa_kernel(
    q: Float[Tensor, "batch n_head seq_q d_head"],
    k: Float[Tensor, "batch n_head seq_k d_head"],
    v: Float[Tensor, "batch n_head seq_k d_head"],
    mask: Mask | None = None,
) -> Float[Tensor, "batch n_head seq_q d_head"]:
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    if seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if seq_q == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v)
    # is_causal aligns top-left; a chunk after a cache needs bottom-right alignment.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(seq_q, seq_k, q.device))


def attention_scores(
    q: Float[Tensor, "batch n_head seq_q d_head"],
    k: Float[Tensor, "batch n_head seq_k d_head"],
    mask: Mask | None = None,
) -> Float[Tensor, "batch n_head seq_q seq_k"]:
    """`q k^T / sqrt(d_head)`, with -inf where a query may not attend (causal, or `mask`)."""
    scores = einops.einsum(
        q, k, "batch n_head seq_q d_head, batch n_head seq_k d_head -> batch n_head seq_q seq_k"
    ) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    return scores.masked_fill(~mask, float("-inf"))


def attention_pattern(
    scores: Float[Tensor, "batch n_head seq_q seq_k"],
) -> Float[Tensor, "batch n_head seq_q seq_k"]:
    """Softmax over the keys: each query's attention weights, rows summing to 1."""
    return torch.softmax(scores, dim=-1)


def manual_kernel(
    q: Float[Tensor, "batch n_head seq_q d_head"],
    k: Float[Tensor, "batch n_head seq_k d_head"],
    v: Float[Tensor, "batch n_head seq_k d_head"],
    mask: Mask | None = None,
    tap: Tap | None = None,
) -> Float[Tensor, "batch n_head seq_q d_head"]:
    """The explicit kernel: `attention_pattern(attention_scores(q, k, mask)) @ v`; `tap` sees
    (and may replace) the `scores` and the `pattern` (a layer whose scores or pattern are
    hooked runs this kernel with its tap)."""
    scores = attention_scores(q, k, mask)
    if tap is not None:
        scores = tap("scores", scores)
    pattern = attention_pattern(scores)
    if tap is not None:
        pattern = tap("pattern", pattern)
    return einops.einsum(
        pattern,
        v,
        "batch n_head seq_q seq_k, batch n_head seq_k d_head -> batch n_head seq_q d_head",
    )


def causal_mask(seq_q: int, seq_k: int, device: torch.device) -> Tensor:
    """`[i, j]` is True where query i (the i-th of the last seq_q positions) may see key j."""
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(diagonal=seq_k - seq_q)


KERNELS: dict[str, Kernel] = {"sdpa": sdpa_kernel, "manual": manual_kernel}
"""The kernels `attention=` may name: a kernel added here has a name everywhere."""
KernelName = Literal[tuple(KERNELS)]
"""A name in `KERNELS`; what settings and the command line accept."""
AttentionKernel = KernelName | Kernel
"""The `attention=` knob of the model, the module, decoding and training: a name or a kernel."""


def attention_kernel(attention: object) -> Kernel:
    """The kernel `attention` names (`KERNELS`) or is (a callable, used as it is).

    `ValueError` for an unknown name, `TypeError` for anything else that is not callable.
    """
    if isinstance(attention, str):
        return KERNELS[check_choice("attention kernel", attention, tuple(KERNELS))]
    if not callable(attention):
        raise TypeError(
            f"attention must be a kernel name ({', '.join(map(repr, KERNELS))}) or a function "
            f"(q, k, v, mask) -> z (gpt_fn.nn.attention.Kernel), got {type(attention).__name__}"
        )
    return attention


def project_heads(
    z: Float[Tensor, "batch seq n_head d_head"], weight: Float[Tensor, "d_model d_model"]
) -> Float[Tensor, "batch seq n_head d_model"]:
    """Each head's output through its slice of the output projection `weight` (`c_proj`,
    `(out, in)` with `in` = heads x d_head): what each head writes to the residual stream."""
    w_o = weight.view(weight.shape[0], z.shape[2], z.shape[3])
    return einops.einsum(
        z, w_o, "batch seq n_head d_head, d_model n_head d_head -> batch seq n_head d_model"
    )


def self_attention(
    p: Params,
    x: Activations,
    *,
    n_head: int,
    attention: AttentionKernel = "sdpa",
    mask: Mask | None = None,
    kv: KVWriter | None = None,
    tap: Tap | None = None,
    results: bool = False,
) -> Activations:
    """Causal self-attention of `x` (after any positions `kv` holds).

    `attention`: the kernel, or its name in `KERNELS`. `mask`: which keys each query may
    attend to (default: causal). `kv`: stores this chunk's keys/values and returns all of them
    (default: the chunk attends to itself only). `tap` is called at `q`, `k`, `v` (`batch seq
    n_head d_head`, this chunk's), `z` (`batch seq n_head d_head`, before `c_proj`), and with
    `results=True` at `result` (`batch seq n_head d_model`: each head's `z` through its slice
    of `c_proj`; their sum plus the bias is the output). The scores and the pattern are the
    kernel's: `manual_kernel` with a `tap` shows them.
    """
    kernel = attention_kernel(attention)
    batch, seq, d_model = x.shape
    # "batch seq (three n_head d_head) -> three batch n_head seq d_head" as view + permute:
    # einops.rearrange parses its pattern in Python on every call: a share of a decode step.
    q, k, v = (
        F.linear(x, p["c_attn.weight"], p.get("c_attn.bias"))
        .view(batch, seq, 3, n_head, d_model // n_head)
        .permute(2, 0, 3, 1, 4)
    )
    if tap is not None:  # the sites are `batch seq n_head d_head` (TransformerLens's order)
        q = tap("q", q.transpose(1, 2)).transpose(1, 2)
        k = tap("k", k.transpose(1, 2)).transpose(1, 2)
        v = tap("v", v.transpose(1, 2)).transpose(1, 2)
    if kv is not None:
        k, v = kv(k, v)
    # "batch n_head seq d_head -> batch seq n_head d_head"
    z = kernel(q, k, v, mask).transpose(1, 2)
    if tap is not None:
        z = tap("z", z)
    if results and tap is not None:
        out = tap("result", project_heads(z, p["c_proj.weight"])).sum(2)
        return out if p.get("c_proj.bias") is None else out + p["c_proj.bias"]
    return F.linear(z.reshape(batch, seq, d_model), p["c_proj.weight"], p.get("c_proj.bias"))
