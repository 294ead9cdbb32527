"""The two attention kernels agree, in forward and backward, with and without a cache; a kernel
is a function (named in `KERNELS`, or the user's own) that every entry point runs."""

import typing

import pytest
import torch
from jaxtyping import TypeCheckError

from gpt_fn import GPT, sampling
from gpt_fn.model import forward, init_params, loss, run_with_cache
from gpt_fn.nn import (
    KERNELS,
    Kernel,
    KernelName,
    attention,
    attention_kernel,
    manual_kernel,
    sdpa_kernel,
    self_attention,
)
from gpt_fn.sampling import generate
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


# --- kernels as functions: a name resolves through KERNELS, a callable is used as it is ---


def test_kernel_names_resolve_to_the_table_and_callables_pass_through():
    assert attention_kernel("sdpa") is sdpa_kernel
    assert attention_kernel("manual") is manual_kernel
    assert set(KERNELS) == {"sdpa", "manual"}
    assert typing.get_args(KernelName) == tuple(KERNELS)  # a table entry is a name everywhere
    assert attention_kernel(_Counting(sdpa_kernel)).inner is sdpa_kernel
    assert all(isinstance(kernel, Kernel) for kernel in KERNELS.values())


@pytest.mark.parametrize(
    ("attention", "error", "message"),
    [
        ("flash", ValueError, "unknown attention kernel 'flash'; choose one of 'sdpa', 'manual'"),
        (3, TypeError, "attention must be a kernel name .* or a function .*, got int"),
    ],
)
def test_a_bad_kernel_is_one_clear_error_at_every_entry_point(
    tiny_config, attention, error, message
):
    params = init_params(tiny_config, seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    calls = [
        lambda: attention_kernel(attention),
        lambda: forward(params, tokens, tiny_config, attention=attention),
        lambda: loss(params, tokens, tokens, tiny_config, attention=attention),
        lambda: run_with_cache(params, tokens, tiny_config, attention=attention),
        lambda: GPT(tiny_config, attention=attention),
    ]
    for call in calls:  # beartype refuses it first under pytest; users without it get these
        with shape_checks(False), pytest.raises(error, match=message):
            call()


class _Counting:
    """A user's kernel: `inner` with a count of its calls (any callable with Kernel's signature)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, q, k, v, mask=None):
        self.calls += 1
        return self.inner(q, k, v, mask)


def test_a_user_kernel_runs_every_layer_of_forward_loss_run_with_cache_and_the_module(
    tiny_config, generator
):
    params = init_params(tiny_config, seed=0)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 7), generator=generator)
    kernel = _Counting(manual_kernel)
    # The same kernel by name and as a wrapped function: the same ops, so bitwise equal.
    assert torch.equal(
        forward(params, tokens, tiny_config, attention=kernel),
        forward(params, tokens, tiny_config, attention="manual"),
    )
    assert torch.equal(
        loss(params, tokens, tokens, tiny_config, attention=kernel),
        loss(params, tokens, tokens, tiny_config, attention="manual"),
    )
    _, cache = run_with_cache(params, tokens, tiny_config, attention=kernel, names=["logits"])
    assert torch.equal(cache["logits"], forward(params, tokens, tiny_config, attention="manual"))
    module = GPT.from_params(params, tiny_config, attention=kernel)
    assert torch.equal(module(tokens), forward(params, tokens, tiny_config, attention="manual"))
    assert kernel.calls == 4 * tiny_config.n_layer


def test_a_layer_whose_pattern_is_hooked_runs_the_explicit_kernel_the_others_the_users(
    tiny_config, generator
):
    params = init_params(tiny_config, seed=0)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 7), generator=generator)
    kernel = _Counting(sdpa_kernel)
    _, cache = run_with_cache(
        params, tokens, tiny_config, attention=kernel, names=["h.1.attn.pattern"]
    )
    assert kernel.calls == tiny_config.n_layer - 1
    assert cache["h.1.attn.pattern"].shape == (2, tiny_config.n_head, 7, 7)


def test_a_new_attention_variant_needs_no_edit_to_gpt_fn(tiny_config, generator):
    # Sharper attention (scores x 2) as a kernel of its own: the model runs it, and it is not
    # the stock kernel (the logits move).
    def sharper(q, k, v, mask=None):
        return sdpa_kernel(2 * q, k, v, mask)

    params = init_params(tiny_config, seed=0)
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 9), generator=generator)
    theirs = forward(params, tokens, tiny_config, attention=sharper)
    stock = forward(params, tokens, tiny_config)
    assert not torch.allclose(theirs, stock, atol=1e-4)
    # It is `manual` with doubled scores: the scores of q k^T / sqrt(d) after q -> 2q.
    doubled = {"h.0.attn.q": lambda q: 2 * q, "h.1.attn.q": lambda q: 2 * q}
    torch.testing.assert_close(
        theirs, forward(params, tokens, tiny_config, hooks=doubled), atol=ATOL, rtol=0
    )


def test_generation_uses_a_user_kernel_at_every_step(tiny_config):
    params = init_params(tiny_config, seed=0)
    prompt = torch.tensor([[1, 2, 3]])
    kernel = _Counting(sdpa_kernel)
    ours = generate(params, prompt, tiny_config, max_new_tokens=4, greedy=True, attention=kernel)
    assert torch.equal(ours, generate(params, prompt, tiny_config, max_new_tokens=4, greedy=True))
    assert kernel.calls >= 4 * tiny_config.n_layer  # the prefill and a step per new token


def test_a_kernel_name_is_checked_once_per_call_not_per_layer(tiny_config, monkeypatch):
    params = init_params(tiny_config, seed=0)
    seen = []
    real = attention.check_choice

    def counting(*args):
        seen.append(args)
        return real(*args)

    monkeypatch.setattr(attention, "check_choice", counting)
    forward(params, torch.zeros(1, 4, dtype=torch.long), tiny_config, attention="manual")
    assert len(seen) == 1


@pytest.mark.parametrize("decoder", ["generate", "beam_search", "speculative_generate"])
def test_a_kernel_name_is_checked_once_per_decode_call_not_per_step(
    decoder, tiny_config, monkeypatch
):
    params = init_params(tiny_config, seed=0)
    seen = []
    real = attention.check_choice
    monkeypatch.setattr(attention, "check_choice", lambda *args: seen.append(args) or real(*args))
    draft = {"draft_params": params, "draft_config": tiny_config, "greedy": True}
    extra = {"generate": {"greedy": True}, "beam_search": {"num_beams": 2}}.get(decoder, draft)
    getattr(sampling, decoder)(
        params, [[1, 2, 3]], tiny_config, max_new_tokens=6, attention="manual", **extra
    )
    assert len(seen) == 1
