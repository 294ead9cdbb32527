"""The LM head laid out for decoding: the same logits as `F.linear` over `wte`, packed only
where that is faster, and never stale after an in-place update of `wte`."""

import pytest
import torch
import torch.nn.functional as F

from gpt_fn.sampling import decoding_head
from gpt_fn.sampling.head import MKL_PACKING

pytestmark = pytest.mark.usefixtures("one_thread")

# F.linear over `wte`'s (vocab, d) layout, the (d, vocab) copy and MKL's packing sum the d
# products in other orders: a few fp32 ulps of logits ~1 (the packing is bitwise the copy with
# MKL's AVX-512 kernels, not with its AVX2 or SSE ones).
LINEAR_ATOL = 1e-5
ULPS_ATOL = 2e-6


def _params(vocab: int = 4099, d: int = 64, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"wte.weight": (0.1 * torch.randn(vocab, d, generator=generator)).to(dtype)}


@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_the_head_gives_f_linears_logits_packed_or_not(rows):
    params = _params()
    head = decoding_head(params, rows=rows)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    logits = head(hidden)
    torch.testing.assert_close(
        logits, F.linear(hidden, params["wte.weight"]), atol=LINEAR_ATOL, rtol=0
    )
    # Packing changes the layout the kernel reads: a batch's logits are its rows' alone (one
    # row never packs) to a few ulps.
    torch.testing.assert_close(logits, hidden @ head.matrix, atol=ULPS_ATOL, rtol=0)
    # Other row counts than the packed one take the copy, with the same results.
    other = torch.randn(rows + 1, 64)
    torch.testing.assert_close(
        head(other), F.linear(other, params["wte.weight"]), atol=LINEAR_ATOL, rtol=0
    )


def test_packing_is_used_for_a_batch_on_an_mkl_build_in_fp32_only():
    assert (decoding_head(_params(), rows=8).packed is not None) == MKL_PACKING
    assert decoding_head(_params(), rows=1).packed is None
    assert decoding_head(_params(), rows=None).packed is None
    assert decoding_head(_params(dtype=torch.bfloat16), rows=8).packed is None


def test_the_head_follows_an_in_place_update_of_wte():
    params = _params()
    hidden = torch.randn(8, 64)
    before = decoding_head(params, rows=8)(hidden)
    with torch.no_grad():
        params["wte.weight"].mul_(2)
    after = decoding_head(params, rows=8)(hidden)
    torch.testing.assert_close(after, 2 * before, atol=LINEAR_ATOL, rtol=0)


def test_the_head_is_remembered_for_a_weight_and_repacked_for_another_row_count():
    params = _params()
    first, again = decoding_head(params, rows=8), decoding_head(params, rows=8)
    assert first.matrix is again.matrix
    if MKL_PACKING:
        assert first.packed is not None and again.packed is not None
        assert first.packed[1] is again.packed[1]
        assert decoding_head(params, rows=4).packed[0] == 4


def test_under_autograd_the_head_is_differentiable_and_never_packed():
    params = {"wte.weight": _params()["wte.weight"].requires_grad_()}
    head = decoding_head(params, rows=8)
    assert head.packed is None
    head(torch.randn(8, 64)).sum().backward()
    assert params["wte.weight"].grad is not None
