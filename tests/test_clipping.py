"""Global-norm clipping: equal to torch.nn.utils.clip_grad_norm_, pure twin pure, bad input loud."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn.optim import clip_by_global_norm, clip_by_global_norm_, global_norm
from gpt_fn.shapes import Params


def grads_of_scale(scale: float, seed: int = 0) -> Params:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"wte.weight": (13, 6), "h.0.mlp.c_fc.bias": (8,), "ln_f.weight": (6,)}
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def torch_clipped(grads: Params, max_norm: float) -> tuple[Params, torch.Tensor]:
    leaves = {name: torch.nn.Parameter(torch.zeros_like(g)) for name, g in grads.items()}
    for name, leaf in leaves.items():
        leaf.grad = grads[name].clone()
    norm = torch.nn.utils.clip_grad_norm_(leaves.values(), max_norm)
    return {name: leaf.grad for name, leaf in leaves.items()}, norm


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])  # below, around and far above max_norm
@pytest.mark.parametrize("use_inplace", [False, True])
def test_equals_torch_clip_grad_norm(scale, use_inplace):
    grads = grads_of_scale(scale)
    expected, expected_norm = torch_clipped(grads, max_norm=1.0)
    if use_inplace:
        clipped = {name: g.clone() for name, g in grads.items()}
        norm = clip_by_global_norm_(clipped, 1.0)
    else:
        clipped, norm = clip_by_global_norm(grads, 1.0)
    # Same kernels in the same order: bitwise.
    assert torch.equal(norm, expected_norm)
    assert all(torch.equal(clipped[name], expected[name]) for name in grads)


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-3, 1e3), st.floats(1e-2, 10.0), st.integers(0, 2**16))
def test_clipped_norm_is_at_most_max_norm_and_small_grads_pass_unchanged(scale, max_norm, seed):
    grads = grads_of_scale(scale, seed)
    clipped, norm = clip_by_global_norm(grads, max_norm)
    clipped_norm = float(global_norm(clipped))
    # torch's coefficient max_norm / (norm + 1e-6): the 1e-6 keeps the result just below max_norm.
    assert clipped_norm <= max_norm * (1 + 1e-6)  # 1e-6: float32 rounding of the norm itself
    coefficient = min(1.0, max_norm / (float(norm) + 1e-6))
    assert clipped_norm == pytest.approx(float(norm) * coefficient, rel=1e-5)  # float32 sums
    if coefficient == 1.0:
        assert all(torch.equal(clipped[name], grads[name]) for name in grads)


def test_pure_clip_leaves_grads_untouched():
    grads = grads_of_scale(100.0)
    before = {name: g.clone() for name, g in grads.items()}
    clip_by_global_norm(grads, 1.0)
    assert all(torch.equal(before[name], grads[name]) for name in grads)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_max_norm_raises(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(grads_of_scale(1.0), max_norm)


def test_empty_grads_raise():
    with pytest.raises(ValueError, match="empty"):
        clip_by_global_norm({}, 1.0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_grads_give_a_non_finite_norm_for_the_caller_to_stop_on(bad):
    grads = grads_of_scale(1.0)
    grads["ln_f.weight"][2] = bad
    _, norm = clip_by_global_norm(grads, 1.0)
    assert not torch.isfinite(norm)
    with pytest.raises(FloatingPointError, match="norm"):
        clip_by_global_norm(grads, 1.0, error_if_nonfinite=True)
    before = {name: g.clone() for name, g in grads.items()}
    with pytest.raises(FloatingPointError, match="norm"):
        clip_by_global_norm_(grads, 1.0, error_if_nonfinite=True)
    # Raising happens before any scaling: the caller still has the gradients it passed.
    for name in grads:
        torch.testing.assert_close(grads[name], before[name], rtol=0, atol=0, equal_nan=True)


def test_per_example_clipping_under_vmap_equals_clipping_each_example_alone():
    # Example 0 is far above max_norm, example 1 below it, example 2 near it.
    per_example = [grads_of_scale(scale, seed) for seed, scale in enumerate((100.0, 0.01, 0.3))]
    stacked = {name: torch.stack([g[name] for g in per_example]) for name in per_example[0]}
    clipped, norms = torch.func.vmap(lambda g: clip_by_global_norm(g, 1.0))(stacked)
    assert torch.equal(torch.func.vmap(global_norm)(stacked), norms)
    for i, grads in enumerate(per_example):
        expected, expected_norm = clip_by_global_norm(grads, 1.0)
        # vmap reduces each norm in one batched kernel, the foreach path one tensor at a time:
        # the same fp32 sums in another order, a few ulps apart.
        torch.testing.assert_close(norms[i], expected_norm, rtol=1e-6, atol=0)
        for name in grads:
            torch.testing.assert_close(clipped[name][i], expected[name], rtol=1e-6, atol=0)


def test_in_place_clipping_under_vmap_scales_each_example_by_its_own_norm():
    stacked = {name: torch.stack([g, g / 1e4]) for name, g in grads_of_scale(100.0).items()}
    before = {name: g.clone() for name, g in stacked.items()}
    norms = torch.func.vmap(lambda g: clip_by_global_norm_(g, 1.0))(stacked)
    assert norms[0] > 1.0 > norms[1]
    torch.testing.assert_close(torch.func.vmap(global_norm)(stacked)[0], torch.tensor(1.0))
    assert all(torch.equal(stacked[name][1], before[name][1]) for name in stacked)


def test_error_if_nonfinite_cannot_read_the_norm_under_vmap():
    stacked = {name: torch.stack([g, g]) for name, g in grads_of_scale(1.0).items()}
    with pytest.raises(ValueError, match="error_if_nonfinite=True reads the norm on the host"):
        torch.func.vmap(lambda g: clip_by_global_norm(g, 1.0, error_if_nonfinite=True))(stacked)
