"""The fused LM head + cross-entropy against `F.cross_entropy(F.linear(h, W).float(), t)`."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError

import gpt_fn.nn.cross_entropy as cross_entropy
from gpt_fn.nn.cross_entropy import linear_cross_entropy, linear_log_probs
from gpt_fn.shapes import shape_checks

# fp32: the chunked matmuls sum in another order than one big matmul, and each row's 1/n share
# is applied before the sum; with O(1) values the differences stay near fp32 epsilon (1.2e-7)
# times the reduction length, well under 1e-5.
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def _problem(n, d_model, vocab, *, seed=0, scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d_model, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, d_model, generator=generator, dtype=dtype) * scale
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def _reference(hidden, weight, targets, **kwargs):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, **kwargs)


def _loss_and_grads(loss_fn, hidden, weight, targets, **kwargs):
    loss = loss_fn(hidden, weight, targets, **kwargs)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def _assert_matches_reference(hidden, weight, targets, *, ignore_index=-100, **kwargs):
    ours = _loss_and_grads(
        linear_cross_entropy, hidden, weight, targets, ignore_index=ignore_index, **kwargs
    )
    reference = _loss_and_grads(_reference, hidden, weight, targets, ignore_index=ignore_index)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), ours, reference, strict=True):
        torch.testing.assert_close(a, b, **FP32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("n", "d_model", "vocab", "chunk_size"),
    [
        (37, 16, 101, 8),  # n not a multiple of the chunk: a short last chunk
        (37, 16, 101, 37),  # one chunk exactly
        (37, 16, 101, 1000),  # chunk larger than n
        (1, 5, 101, 1),  # a single row
        (64, 24, 3, 7),  # tiny vocab
        (50, 1, 257, 16),  # d_model 1
    ],
)
def test_loss_and_gradients_equal_the_reference(n, d_model, vocab, chunk_size):
    _assert_matches_reference(*_problem(n, d_model, vocab), chunk_size=chunk_size)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    d_model=st.integers(1, 12),
    vocab=st.integers(2, 60),
    chunk_size=st.integers(1, 50),
    seed=st.integers(0, 2**16),
    ignored=st.floats(0.0, 0.8),
)
def test_loss_and_gradients_equal_the_reference_for_any_shape_and_chunk_size(
    n, d_model, vocab, chunk_size, seed, ignored
):
    hidden, weight, targets = _problem(n, d_model, vocab, seed=seed)
    drop = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < ignored
    drop[0] = False  # at least one counted target
    _assert_matches_reference(
        hidden, weight, targets.masked_fill(drop, -100), chunk_size=chunk_size
    )


def test_gradients_pass_gradcheck_in_fp64():
    hidden, weight, targets = _problem(9, 4, 13, dtype=torch.float64)
    targets[2] = -100
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=4), (hidden, weight)
    )


def test_ignore_index_rows_count_in_neither_sum_nor_mean():
    hidden, weight, targets = _problem(20, 8, 31)
    targets[::3] = 7
    _assert_matches_reference(hidden, weight, targets, ignore_index=7, chunk_size=6)
    counted = targets != 7
    only_counted = _loss_and_grads(
        linear_cross_entropy, hidden, weight, targets, ignore_index=7, chunk_size=6
    )
    kept = hidden.detach()[counted].requires_grad_()
    on_kept = _loss_and_grads(linear_cross_entropy, kept, weight, targets[counted])
    torch.testing.assert_close(only_counted[0], on_kept[0], **FP32)
    assert torch.all(only_counted[1][~counted] == 0)
    torch.testing.assert_close(only_counted[1][counted], on_kept[1], **FP32)
    torch.testing.assert_close(only_counted[2], on_kept[2], **FP32)


def test_large_logits_give_the_exact_finite_loss():
    # Logits of order 1e4: exp overflows without the max subtraction.
    hidden, weight, targets = _problem(12, 6, 50, scale=3e3)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert torch.isfinite(loss)
    # Losses of ~1e4 in fp32 carry absolute rounding error ~1e-3.
    torch.testing.assert_close(loss, _reference(hidden, weight, targets), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert all(torch.isfinite(g).all() for g in grads)


def test_tied_weight_gradients_sum_both_uses():
    # The LM head weight doubles as the token embedding (GPT-2): autograd adds both gradients.
    hidden_in, weight, targets = _problem(30, 8, 41)
    tokens = torch.randint(0, 41, (30,), generator=torch.Generator().manual_seed(1))

    def total(loss_fn):
        hidden = torch.tanh(F.embedding(tokens, weight) + hidden_in)
        return loss_fn(hidden, weight, targets)

    ours = torch.autograd.grad(total(linear_cross_entropy), (hidden_in, weight))
    reference = torch.autograd.grad(total(_reference), (hidden_in, weight))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_scaled_losses_and_retained_graphs_accumulate_like_the_reference():
    hidden, weight, targets = _problem(23, 8, 29)
    for loss_fn in (linear_cross_entropy, _reference):
        loss = loss_fn(hidden, weight, targets)
        loss.backward(retain_graph=True)  # a unit gradient: handed over without a copy
        (3 * loss).backward()  # must still see the unscaled saved gradient
        if loss_fn is linear_cross_entropy:
            ours = (hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
    reference_grads = _loss_and_grads(_reference, hidden, weight, targets)[1:]
    for a, b in zip(ours, reference_grads, strict=True):
        torch.testing.assert_close(a, 4 * b, **FP32)


def test_only_the_gradients_asked_for_are_computed():
    hidden, weight, targets = _problem(17, 8, 23)
    expected = _loss_and_grads(_reference, hidden, weight, targets)
    frozen = weight.detach()
    (grad_hidden,) = torch.autograd.grad(linear_cross_entropy(hidden, frozen, targets), hidden)
    torch.testing.assert_close(grad_hidden, expected[1], **FP32)
    fixed = hidden.detach()
    (grad_weight,) = torch.autograd.grad(linear_cross_entropy(fixed, weight, targets), weight)
    torch.testing.assert_close(grad_weight, expected[2], **FP32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected[0], **FP32)


def test_torch_func_grad_matches_autograd():
    hidden, weight, targets = _problem(19, 8, 31)

    def loss_of(h, w, loss_fn):
        return loss_fn(h, w, targets)

    ours = torch.func.grad(loss_of, argnums=(0, 1))(hidden, weight, linear_cross_entropy)
    reference = torch.func.grad(loss_of, argnums=(0, 1))(hidden, weight, _reference)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_vmap_gives_per_sample_losses_and_gradients():
    hidden, weight, _ = _problem(4 * 11, 6, 17)
    hidden = hidden.detach().reshape(4, 11, 6)
    targets = torch.randint(0, 17, (4, 11), generator=torch.Generator().manual_seed(2))

    def per_sample(loss_fn):
        def loss_of(w, h, t):
            return loss_fn(h, w, t)

        return torch.func.vmap(torch.func.grad_and_value(loss_of), in_dims=(None, 0, 0))(
            weight.detach(), hidden, targets
        )

    (grads, losses), (reference_grads, reference_losses) = map(
        per_sample, (linear_cross_entropy, _reference)
    )
    torch.testing.assert_close(losses, reference_losses, **FP32)
    torch.testing.assert_close(grads, reference_grads, **FP32)


def test_second_derivatives_and_forward_mode_raise_instead_of_being_wrong():
    hidden, weight, targets = _problem(7, 4, 11)
    (grad_hidden,) = torch.autograd.grad(
        linear_cross_entropy(hidden, weight, targets), hidden, create_graph=True
    )
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad_hidden.square().sum().backward()

    def grad_norm(h):
        return (
            torch.func.grad(lambda h: linear_cross_entropy(h, weight.detach(), targets))(h)
            .square()
            .sum()
        )

    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.grad(grad_norm)(hidden.detach())
    with pytest.raises(NotImplementedError, match="forward mode"):
        torch.func.jvp(
            lambda h: linear_cross_entropy(h, weight.detach(), targets),
            (hidden.detach(),),
            (torch.ones_like(hidden),),
        )


@pytest.mark.parametrize("matmuls", ["as on this machine", "native bf16"])
def test_bf16_autocast_is_close_to_the_reference_under_autocast(matmuls, monkeypatch):
    if matmuls == "native bf16":  # the path a GPU or AMX CPU takes, on any CPU
        monkeypatch.setattr(cross_entropy, "_matmul_dtype", lambda dtype, device: dtype)
    hidden, weight, targets = _problem(40, 32, 301, scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=16)
        reference = _loss_and_grads(_reference, hidden, weight, targets)
    assert [t.dtype for t in ours] == [torch.float32] * 3  # loss fp32, grads in input dtype
    # Both round logits and the logits' gradient to bf16 at the same points and sum in fp32,
    # so they differ by summation order and a few bf16 roundings (eps 2^-8 = 0.4%) of
    # gradient entries of size ~1e-3 (dh) and ~1e-4 (dW, averaged over 40 rows).
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours[1], reference[1], rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(ours[2], reference[2], rtol=2e-2, atol=2e-4)


def test_bf16_inputs_get_bf16_gradients_and_an_fp32_loss():
    hidden, weight, targets = _problem(10, 8, 21, dtype=torch.bfloat16)
    loss, grad_hidden, grad_weight = _loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert (loss.dtype, grad_hidden.dtype, grad_weight.dtype) == (
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
    )
    # Same rounding points as the reference; bf16 gradients differ by a rounding or two.
    torch.testing.assert_close(loss, _reference(hidden, weight, targets), rtol=1e-3, atol=1e-3)


def test_bad_input_is_named():
    hidden, weight, targets = _problem(6, 4, 9)
    with pytest.raises(TypeCheckError):  # jaxtyping: d_model differs
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with shape_checks(False):  # without the import hook, the function's own checks
        with pytest.raises(ValueError, match="hidden has d_model=4 but weight has d_model=3"):
            linear_cross_entropy(hidden, weight[:, :3], targets)
        with pytest.raises(ValueError, match="targets has 5 rows but hidden has 6"):
            linear_cross_entropy(hidden, weight, targets[:5])
        with pytest.raises(ValueError, match=r"expected hidden \(n, d_model\)"):
            linear_cross_entropy(hidden[None], weight, targets)
        with pytest.raises(TypeError, match="targets must be an integer tensor"):
            linear_cross_entropy(hidden, weight, targets.float())
        with pytest.raises(TypeError, match="differ in dtype outside autocast"):
            linear_cross_entropy(hidden, weight.double(), targets)
        for chunk_size in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="chunk_size must be a positive int"):
                linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"target 9 is outside \[0, vocab=9\)"):
        linear_cross_entropy(hidden, weight, targets.index_fill(0, torch.tensor([3]), 9))
    with pytest.raises(ValueError, match=r"target -1 is outside \[0, vocab=9\)"):
        linear_cross_entropy(hidden, weight, targets.index_fill(0, torch.tensor([0]), -1))
    with pytest.raises(ValueError, match="every one of the 6 targets is ignore_index=-100"):
        linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))


# --- per-row log-probs (evaluation) ---------------------------------------------------------


def _reference_log_probs(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0], logits.argmax(-1) == targets


@pytest.mark.parametrize(("n", "chunk_size"), [(1, 512), (37, 8), (64, 64), (65, 16)])
def test_log_probs_and_greedy_equal_the_reference(n, chunk_size):
    hidden, weight, targets = (t.detach() for t in _problem(n, 12, 53, scale=2.0))
    # Make a third of the targets the argmax, so `greedy` is tested both ways.
    argmax = F.linear(hidden, weight).argmax(-1)
    targets = torch.where(torch.arange(n) % 3 == 0, argmax, targets)
    ours = linear_log_probs(hidden, weight, targets, chunk_size=chunk_size)
    logprobs, greedy = _reference_log_probs(hidden, weight, targets)
    torch.testing.assert_close(ours.logprobs, logprobs, **FP32)
    assert torch.equal(ours.greedy, greedy) and bool(ours.greedy[::3].all())


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_log_probs_are_the_log_softmax_of_the_matmul_bit_for_bit(scale):
    # The log-sum-exp runs in place in the logits buffer; it takes torch.logsumexp's steps, so
    # the answer is the same bits as the out-of-place formula on the same matmul's output.
    hidden, weight, targets = (t.detach() for t in _problem(16, 8, 29, scale=scale))
    logits = torch.mm(hidden, weight.T)
    expected = (logits.gather(1, targets[:, None]) - torch.logsumexp(logits, 1, keepdim=True))[:, 0]
    for greedy in (True, False):
        ours = linear_log_probs(hidden, weight, targets, chunk_size=16, greedy=greedy)
        assert torch.equal(ours.logprobs, expected)
        assert (ours.greedy is None) == (not greedy)


def test_log_probs_refuse_a_greedy_flag_that_is_not_a_bool():
    hidden, weight, targets = (t.detach() for t in _problem(2, 4, 5))
    # beartype refuses it under pytest (TypeError); check_bool does for users (ValueError)
    with pytest.raises((TypeError, ValueError), match="greedy"):
        linear_log_probs(hidden, weight, targets, greedy=1)


def test_log_probs_are_exact_and_finite_for_large_logits():
    hidden, weight, targets = (t.detach() for t in _problem(9, 4, 17, scale=1e4))
    ours = linear_log_probs(hidden, weight, targets, chunk_size=4)
    assert bool(ours.logprobs.isfinite().all()) and bool((ours.logprobs <= 0).all())
    torch.testing.assert_close(ours.logprobs, _reference_log_probs(hidden, weight, targets)[0])


def test_ignored_rows_get_log_prob_zero_and_are_not_greedy():
    hidden, weight, targets = (t.detach() for t in _problem(8, 6, 11))
    targets = targets.index_fill(0, torch.tensor([1, 4]), -100)
    ours = linear_log_probs(hidden, weight, targets)
    assert ours.logprobs[[1, 4]].tolist() == [0.0, 0.0] and not ours.greedy[[1, 4]].any()
    kept = targets != -100
    reference = _reference_log_probs(hidden[kept], weight, targets[kept])[0]
    torch.testing.assert_close(ours.logprobs[kept], reference, **FP32)
    # Unlike the mean loss, an all-ignored batch is fine: nothing to score.
    assert linear_log_probs(hidden, weight, torch.full_like(targets, -100)).logprobs.sum() == 0


@pytest.mark.parametrize("matmuls", ["as on this machine", "native bf16"])
def test_log_probs_under_bf16_autocast_round_where_the_reference_does(matmuls, monkeypatch):
    if matmuls == "native bf16":
        monkeypatch.setattr(cross_entropy, "_matmul_dtype", lambda dtype, device: dtype)
    hidden, weight, targets = (t.detach() for t in _problem(40, 32, 301, scale=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_log_probs(hidden, weight, targets, chunk_size=16)
        logprobs, greedy = _reference_log_probs(hidden, weight, targets)
    assert ours.logprobs.dtype == torch.float32
    # Both log-softmax the bf16-rounded logits in fp32: they differ by summation order only.
    torch.testing.assert_close(ours.logprobs, logprobs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.greedy, greedy)


def test_log_probs_refuse_to_be_differentiated_and_check_their_arguments():
    hidden, weight, targets = _problem(6, 4, 9)
    with pytest.raises(RuntimeError, match="not differentiable; call it under torch.no_grad"):
        linear_log_probs(hidden, weight, targets)
    with torch.no_grad():
        assert linear_log_probs(hidden, weight, targets).logprobs.shape == (6,)
        with pytest.raises(ValueError, match=r"target 9 is outside \[0, vocab=9\)"):
            linear_log_probs(hidden, weight, targets.index_fill(0, torch.tensor([2]), 9))
        with shape_checks(False), pytest.raises(ValueError, match="targets has 5 rows"):
            linear_log_probs(hidden, weight, targets[:5])
