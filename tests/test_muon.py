"""Muon: equal to torch.optim.Muon bit for bit, fused-QKV blocks, twins equal, pure, checkpointable."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt_fn.optim import FUSED_QKV, adjusted_lr, muon, newton_schulz, warmup_cosine
from gpt_fn.shapes import Params

# Tall, wide, square and GPT-2's fused c_attn layout (3 * d, d).
SHAPES = {
    "h.0.tall.weight": (12, 5),
    "h.0.wide.weight": (5, 12),
    "h.0.square.weight": (8, 8),
    "h.0.attn.c_attn.weight": (24, 8),
}


def matrices(generator: torch.Generator) -> Params:
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def random_grads(params: Params, generator: torch.Generator) -> Params:
    return {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}


def clone(tensors: Params) -> Params:
    return {name: t.clone() for name, t in tensors.items()}


def torch_step(reference: torch.optim.Muon, leaves: dict, grads: Params, lr: float) -> None:
    for group in reference.param_groups:
        group["lr"] = lr
    for name, leaf in leaves.items():
        leaf.grad = grads[name].clone()
    reference.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("schedule", [False, True])
def test_matches_torch_muon_to_the_last_bit_over_8_steps(generator, nesterov, adjust_lr, schedule):
    # Same ops on the same CPU in the same order, so the match is exact, bf16 matmuls included.
    hyper = {"weight_decay": 0.1, "momentum": 0.95, "nesterov": nesterov}
    lr = warmup_cosine(0.05, 0.005, warmup_steps=3, decay_steps=6) if schedule else 0.02
    opt = muon(lr, adjust_lr=adjust_lr, **hyper)
    params = matrices(generator)
    pure_params, pure_state = params, opt.init(params)
    inplace_params = clone(params)
    inplace_state = opt.init(inplace_params)
    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    reference = torch.optim.Muon(list(leaves.values()), lr=1.0, adjust_lr_fn=adjust_lr, **hyper)
    for step in range(8):
        grads = random_grads(params, generator)
        pure_params, pure_state = opt.update(grads, pure_state, pure_params)
        opt.update_(grads, inplace_state, inplace_params)
        torch_step(reference, leaves, grads, lr(step) if schedule else lr)
    for name, leaf in leaves.items():
        assert torch.equal(pure_params[name], leaf.detach()), name
        assert torch.equal(inplace_params[name], leaf.detach()), name
        buffer = reference.state[leaf]["momentum_buffer"]
        assert torch.equal(pure_state[f"momentum_buffer.{name}"], buffer)
        assert torch.equal(inplace_state[f"momentum_buffer.{name}"], buffer)
    assert int(pure_state["step"]) == int(inplace_state["step"]) == 8


def test_bf16_params_with_nesterov_match_torch(generator):
    opt = muon(0.02)
    params = {k: v.bfloat16() for k, v in matrices(generator).items()}
    state = opt.init(params)
    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    reference = torch.optim.Muon(list(leaves.values()), lr=0.02)
    for _ in range(3):
        grads = {k: g.bfloat16() for k, g in random_grads(params, generator).items()}
        params, state = opt.update(grads, state, params)
        torch_step(reference, leaves, grads, 0.02)
    assert all(torch.equal(params[name], leaf.detach()) for name, leaf in leaves.items())


def test_orthogonalisation_never_writes_into_a_bf16_momentum_buffer(generator):
    # torch 2.13 normalises the buffer itself here (pytorch/pytorch#194664); the buffer must stay
    # the EMA of the grads: after one step from zero, (1 - momentum) * grad.
    opt = muon(0.02, nesterov=False, momentum=0.9)
    params = {"w": torch.randn(8, 4, generator=generator).bfloat16()}
    grads = {"w": torch.randn(8, 4, generator=generator).bfloat16()}
    state = opt.init(params)
    expected = torch.lerp(state["momentum_buffer.w"], grads["w"], 0.1)
    _, new_state = opt.update(grads, state, params)
    opt.update_(grads, state, clone(params))
    assert torch.equal(new_state["momentum_buffer.w"], expected)
    assert torch.equal(state["momentum_buffer.w"], expected)


def test_split_fused_blocks_equal_torch_muon_on_q_k_v_as_separate_params(generator):
    opt = muon(0.02, split_fused=FUSED_QKV)
    params = matrices(generator)
    state = opt.init(params)
    fused = "h.0.attn.c_attn.weight"
    q, k, v = (torch.nn.Parameter(block.clone()) for block in params[fused].chunk(3))
    others = {name: torch.nn.Parameter(p.clone()) for name, p in params.items() if name != fused}
    reference = torch.optim.Muon([q, k, v, *others.values()], lr=0.02)
    whole = muon(0.02)  # the default: c_attn as one tall matrix, like torch.optim.Muon(c_attn)
    whole_params, whole_state = params, whole.init(params)
    for _ in range(4):
        grads = random_grads(params, generator)
        params, state = opt.update(grads, state, params)
        whole_params, whole_state = whole.update(grads, whole_state, whole_params)
        for leaf, grad in zip((q, k, v), grads[fused].chunk(3), strict=True):
            leaf.grad = grad.clone()
        for name, leaf in others.items():
            leaf.grad = grads[name].clone()
        reference.step()
    assert torch.equal(params[fused], torch.cat([q.detach(), k.detach(), v.detach()]))
    assert all(torch.equal(params[name], leaf.detach()) for name, leaf in others.items())
    # Blocks are a different update from the whole matrix (the lr factor alone: sqrt(3) vs 1).
    assert not torch.allclose(params[fused], whole_params[fused], atol=1e-3)
    assert all(torch.equal(params[n], whole_params[n]) for n in others)


def test_split_fused_block_is_newton_schulz_of_each_slice_by_hand(generator):
    lr, weight_decay = 0.1, 0.0
    param = {"h.0.attn.c_attn.weight": torch.randn(24, 8, generator=generator)}
    grad = {"h.0.attn.c_attn.weight": torch.randn(24, 8, generator=generator)}
    opt = muon(lr, weight_decay=weight_decay, momentum=0.0, split_fused=FUSED_QKV)
    new, _ = opt.update(grad, opt.init(param), param)
    # momentum 0: the direction is the grad; each (8, 8) block steps with lr * sqrt(max(1, 1)).
    by_hand = torch.cat([newton_schulz(g) for g in grad["h.0.attn.c_attn.weight"].chunk(3)])
    expected = torch.add(param["h.0.attn.c_attn.weight"], by_hand, alpha=-lr)
    assert torch.equal(new["h.0.attn.c_attn.weight"], expected)


def test_newton_schulz_pushes_singular_values_near_one(generator):
    for shape in [(64, 32), (32, 64), (40, 40)]:
        matrix = torch.randn(shape, generator=generator) * 7.0
        for dtype in (torch.bfloat16, torch.float32):
            out = newton_schulz(matrix, dtype=dtype)
            assert out.shape == matrix.shape and out.dtype == dtype
            singular = torch.linalg.svdvals(out.float())
            # Keller Jordan's coefficients do not converge to 1: they land in about (0.5, 1.5).
            assert singular.min() > 0.5 and singular.max() < 1.5, (shape, dtype, singular)
            assert torch.linalg.svdvals(matrix).max() > 10  # so it did shrink them


def test_adjusted_lr_is_torchs():
    assert adjusted_lr(0.02, 24, 8) == pytest.approx(0.02 * 3**0.5)
    assert adjusted_lr(0.02, 8, 24) == 0.02
    assert adjusted_lr(0.02, 8, 24, "match_rms_adamw") == pytest.approx(0.02 * 0.2 * 24**0.5)


def test_update_leaves_its_inputs_untouched_and_shares_no_memory(generator):
    for nesterov in (True, False):
        opt = muon(0.02, nesterov=nesterov)
        params = matrices(generator)
        params, state = opt.update(random_grads(params, generator), opt.init(params), params)
        grads = random_grads(params, generator)
        before = [clone(params), clone(state), clone(grads)]
        new_params, new_state = opt.update(grads, state, params)
        for old, now in zip(before, [params, state, grads], strict=True):
            assert all(torch.equal(old[k], now[k]) for k in old)
        inputs = {t.data_ptr() for t in [*params.values(), *state.values(), *grads.values()]}
        assert not inputs & {t.data_ptr() for t in [*new_params.values(), *new_state.values()]}


def test_inplace_update_writes_into_the_same_tensors_and_accepts_parameters(generator):
    opt = muon(0.02)
    params = {k: torch.nn.Parameter(v) for k, v in matrices(generator).items()}
    state = opt.init(params)
    pointers = {k: t.data_ptr() for k, t in [*params.items(), *state.items()]}
    snapshot = clone({k: p.detach() for k, p in params.items()})
    assert opt.update_(random_grads(params, generator), state, params) is state
    assert pointers == {k: t.data_ptr() for k, t in [*params.items(), *state.items()]}
    assert not any(torch.equal(snapshot[k], params[k]) for k in params)
    assert all(p.requires_grad and p.grad_fn is None for p in params.values())


def test_state_survives_a_safetensors_round_trip(generator, tmp_path):
    opt = muon(warmup_cosine(0.02, 0.002, warmup_steps=2, decay_steps=6), split_fused=FUSED_QKV)
    params = matrices(generator)
    state = opt.init(params)
    grads = [random_grads(params, generator) for _ in range(6)]
    for g in grads[:3]:
        params, state = opt.update(g, state, params)
    save_file(state, tmp_path / "opt.safetensors")
    resumed_state = load_file(tmp_path / "opt.safetensors")
    assert resumed_state["step"].dtype == torch.int64 and int(resumed_state["step"]) == 3
    resumed_params = clone(params)
    for g in grads[3:]:
        params, state = opt.update(g, state, params)
        opt.update_(g, resumed_state, resumed_params)
    assert all(torch.equal(params[k], resumed_params[k]) for k in params)


def test_init_refuses_params_that_are_not_matrices(generator):
    opt = muon(0.02)
    with pytest.raises(ValueError, match=r"'h.0.mlp.c_fc.bias' has shape \(8,\).*AdamW"):
        opt.init({**matrices(generator), "h.0.mlp.c_fc.bias": torch.zeros(8)})


def test_split_fused_that_matches_nothing_or_does_not_divide_fails_at_init(generator):
    params = matrices(generator)
    with pytest.raises(KeyError, match="matches no param"):
        muon(0.02, split_fused={"h.*.attn.qkv.weight": 3}).init(params)
    with pytest.raises(ValueError, match="24 rows: not divisible into 5"):
        muon(0.02, split_fused={"h.*.attn.c_attn.weight": 5}).init(params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": 0.02, "momentum": 1.0}, "momentum"),
        ({"lr": 0.02, "weight_decay": -0.1}, "weight_decay"),
        ({"lr": 0.02, "eps": 0.0}, "eps"),
        ({"lr": 0.02, "ns_steps": 100}, "ns_steps"),
        ({"lr": 0.02, "ns_coefficients": (1.0, 2.0, float("inf"))}, "ns_coefficients"),
        ({"lr": 0.02, "adjust_lr": "spectral"}, "adjust_lr"),
        ({"lr": 0.02, "ns_dtype": torch.int32}, "ns_dtype"),
        ({"lr": 0.02, "split_fused": {"h.*.attn.c_attn.weight": 0}}, "split_fused"),
    ],
)
def test_bad_hyperparameters_fail_when_built(kwargs, match):
    # Under the test-time type checks a bad Literal is a TypeError naming the argument first.
    with pytest.raises((ValueError, TypeError), match=match):
        muon(**kwargs)


@pytest.mark.parametrize("use_inplace", [False, True])
def test_mismatched_grads_or_state_raise_naming_the_problem(generator, use_inplace):
    opt = muon(0.02)
    params = matrices(generator)
    state = opt.init(params)
    update = opt.update_ if use_inplace else opt.update
    grads = random_grads(params, generator)
    with pytest.raises(KeyError, match="grads"):
        update({k: g for k, g in grads.items() if k != "h.0.wide.weight"}, state, params)
    with pytest.raises(ValueError, match="'h.0.wide.weight' has shape"):
        update({**grads, "h.0.wide.weight": torch.zeros(3, 3)}, state, params)
    with pytest.raises(KeyError, match="momentum_buffer.h.0.tall.weight"):
        update(grads, {k: v for k, v in state.items() if "tall" not in k}, params)
    with pytest.raises(ValueError, match="step 0"):
        muon(lambda step: float("nan")).update(grads, state, params)
