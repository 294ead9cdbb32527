"""The tied LM head prepared for decoding: `head(hidden)` gives each row's next-token logits.

A decode step multiplies one hidden vector per row by the `(vocab, d_model)` token embedding;
that product is most of a small model's step on CPU. Two layouts make it faster than
`F.linear` over `wte` as stored; both give its logits to a few fp32 ulps:

- a contiguous `(d_model, vocab)` copy of `wte`: a matrix-vector product against it runs
  faster on CPU than against `wte`'s own layout;
- for the row count of a decoding loop (`rows`, at least 2), MKL's prepacked GEMM (the
  weight laid out once for MKL's kernel, what inductor uses for frozen linears on CPU):
  faster than the copy at 4 to 32 rows (benchmarks/README.md, `generate.py`), bitwise the
  copy's logits with MKL's AVX-512 kernels. It needs an MKL build, fp32 and a CPU
  tensor; elsewhere the copy serves every row count.

Both are made once per `wte` (remembered by identity and version, so an in-place update makes
new ones) and only the latest row count's packing is kept: it is ~2.7x the weight's size for
a 256-wide head. Under autograd, vmap or compile the copy is made afresh and never packed.
"""

import weakref
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from gpt_fn.checks import is_traced
from gpt_fn.shapes import Params

_MKL_PACKING = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class LMHead:
    """`head(hidden)`: logits `(rows, vocab)` of hidden vectors `(rows, d_model)`."""

    def __init__(self, wte: Tensor, matrix: Tensor, packed: tuple[int, Tensor] | None) -> None:
        self.wte = wte
        self.matrix: Float[Tensor, "d_model vocab"] = matrix
        """`wte` as a contiguous `(d_model, vocab)` matrix: `hidden @ matrix` are the logits."""
        self.packed = packed
        """`(rows, MKL's packing of wte for that many rows)`, or None."""

    def __call__(self, hidden: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows vocab"]:
        if self.packed is not None and hidden.shape[0] == self.packed[0]:
            rows, packed = self.packed
            return torch.ops.mkl._mkl_linear(hidden, packed, self.wte, None, rows)
        return hidden @ self.matrix


class _Prepared(NamedTuple):
    """What is remembered of one `wte`: whether it is still that tensor unchanged, and its
    layouts."""

    ref: weakref.ref
    version: int
    matrix: Tensor
    packed: tuple[int, Tensor] | None


_HEADS: dict[int, _Prepared] = {}


def decoding_head(params: Params, rows: int | None = None) -> LMHead:
    """The LM head of `params` for decoding, packed for `rows` rows where that is faster.

    `rows`: how many rows the decoding loop multiplies at a time (batch x samples, beams, or
    draft positions); other row counts use the contiguous copy, with the same results.
    """
    wte = params["wte.weight"]
    if (wte.requires_grad and torch.is_grad_enabled()) or is_traced(wte):
        return LMHead(wte, wte.t().contiguous(), None)
    entry = _HEADS.get(id(wte))
    if entry is None or entry.ref() is not wte or entry.version != wte._version:
        for key in [key for key, old in _HEADS.items() if old.ref() is None]:
            del _HEADS[key]
        entry = _Prepared(weakref.ref(wte), wte._version, wte.detach().t().contiguous(), None)
    if _packs(wte, rows) and (entry.packed is None or entry.packed[0] != rows):
        packing = torch.ops.mkl._mkl_reorder_linear_weight(wte.detach(), rows)
        entry = entry._replace(packed=(rows, packing))
    _HEADS[id(wte)] = entry
    return LMHead(wte.detach(), entry.matrix, entry.packed)


def _packs(wte: Tensor, rows: int | None) -> bool:
    """Whether MKL's packing serves `rows` rows of `wte`'s head (one row gains nothing)."""
    return (
        _MKL_PACKING
        and rows is not None
        and rows >= 2
        and wte.device.type == "cpu"
        and wte.dtype == torch.float32
    )
