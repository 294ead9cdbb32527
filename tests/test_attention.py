"""The two attention kernels agree, in forward and backward, with and without a cache."""

import pytest
import torch
from jaxtyping import TypeCheckError

from gpt_fn.nn import manual_kernel, sdpa_kernel, self_attention
from gpt_fn.shapes import shape_checks

# fp32 attention with d_head <= 64: both kernels accumulate the same sums in a different
# order; differences are ~1e-7, and 1e-5 leaves room for longer reductions.
ATOL = 1e-5


def _qkv(generator, batch=2, n_head=3, seq_q=7, seq_k=7, d_head=8):
    q = torch.randn(batch, n_head, seq_q, d_head, generator=generator)
    k = torch.randn(batch, n_head, seq_k, d_head, generator=generator)
    v = torch.randn(batch, n_head, seq_k, d_head, generator=generator)
    return q, k, v


@pytest.mark.parametrize("seq_q, seq_k", [(7, 7), (1, 9), (4, 9)])
def test_kernels_agree_forward_and_backward(generator, seq_q, seq_k):
    q, k, v = (t.requires_grad_() for t in _qkv(generator, seq_q=seq_q, seq_k=seq_k))
    out_sdpa = sdpa_kernel(q, k, v)
    grads_sdpa = torch.autograd.grad(out_sdpa.square().sum(), (q, k, v))
    out_manual = manual_kernel(q, k, v)
    grads_manual = torch.autograd.grad(out_manual.square().sum(), (q, k, v))
    torch.testing.assert_close(out_sdpa, out_manual, atol=ATOL, rtol=0)
    for g_sdpa, g_manual in zip(grads_sdpa, grads_manual, strict=True):
        torch.testing.assert_close(g_sdpa, g_manual, atol=ATOL, rtol=0)


def test_first_position_attends_only_to_itself(generator):
    q, k, v = _qkv(generator)
    for kernel in (sdpa_kernel, manual_kernel):
        torch.testing.assert_close(kernel(q, k, v)[:, :, 0], v[:, :, 0])


def test_future_tokens_do_not_change_past_outputs(generator):
    q, k, v = _qkv(generator)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 3.0
    for kernel in (sdpa_kernel, manual_kernel):
        torch.testing.assert_close(kernel(q, k, v)[:, :, :-1], kernel(q, k2, v2)[:, :, :-1])


def _attn_params(generator, d_model=12):
    return {
        "c_attn.weight": torch.randn(3 * d_model, d_model, generator=generator) * 0.2,
        "c_attn.bias": torch.randn(3 * d_model, generator=generator) * 0.1,
        "c_proj.weight": torch.randn(d_model, d_model, generator=generator) * 0.2,
        "c_proj.bias": torch.randn(d_model, generator=generator) * 0.1,
    }


class ConcatenatingCache:
    """A KV writer that keeps every chunk's keys/values (the layer's contract, simplest form)."""

    def __init__(self):
        self.k = self.v = None

    def __call__(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@pytest.mark.parametrize("kernel", ["sdpa", "manual"])
def test_cached_chunks_equal_one_full_pass(generator, kernel):
    p = _attn_params(generator)
    x = torch.randn(2, 9, 12, generator=generator)
    full_cache = ConcatenatingCache()
    full = self_attention(p, x, n_head=3, attention=kernel, kv=full_cache)
    cache = ConcatenatingCache()
    head = self_attention(p, x[:, :4], n_head=3, attention=kernel, kv=cache)
    middle = self_attention(p, x[:, 4:8], n_head=3, attention=kernel, kv=cache)
    last = self_attention(p, x[:, 8:], n_head=3, attention=kernel, kv=cache)
    torch.testing.assert_close(torch.cat([head, middle, last], dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.k, full_cache.k)
    torch.testing.assert_close(cache.v, full_cache.v)


@pytest.mark.parametrize("kernel", ["sdpa", "manual"])
def test_a_causal_mask_equals_no_mask_and_masked_keys_have_no_effect(generator, kernel):
    p = _attn_params(generator)
    x = torch.randn(2, 6, 12, generator=generator)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    torch.testing.assert_close(
        self_attention(p, x, n_head=3, attention=kernel, mask=causal),
        self_attention(p, x, n_head=3, attention=kernel),
        atol=ATOL,
        rtol=0,
    )
    hide_first = causal.clone()
    hide_first[:, :, 1:, 0] = False  # no query but the first sees token 0
    changed = x.clone()
    changed[:, 0] += 5.0
    out = self_attention(p, x, n_head=3, attention=kernel, mask=hide_first)
    out_changed = self_attention(p, changed, n_head=3, attention=kernel, mask=hide_first)
    torch.testing.assert_close(out[:, 1:], out_changed[:, 1:], atol=ATOL, rtol=0)


def test_unknown_kernel_is_rejected_with_and_without_shape_checks(generator):
    p, x = _attn_params(generator), torch.randn(1, 2, 12)
    with pytest.raises(TypeCheckError, match="parameter 'attention'"):
        self_attention(p, x, n_head=3, attention="flash")
    with shape_checks(False), pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        self_attention(p, x, n_head=3, attention="flash")
