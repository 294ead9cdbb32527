"""AdamW: equal to torch.optim.AdamW (random grads and the real model), twins equal, pure, checkpointable."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import gpt_fn
from gpt_fn.optim import adamw, default_decay_mask, warmup_cosine
from gpt_fn.shapes import Params, shape_checks

# Our arithmetic is torch's operation for operation, so on CPU the match is bitwise; 1e-6 is
# the budget, room for kernels that round differently (fused GPU foreach).
TORCH_MATCH_ATOL = 1e-6


def small_params(generator: torch.Generator) -> Params:
    return {
        "wte.weight": torch.randn(11, 6, generator=generator),
        "h.0.mlp.c_fc.weight": torch.randn(8, 6, generator=generator),
        "h.0.mlp.c_fc.bias": torch.randn(8, generator=generator),
        "ln_f.weight": 1 + 0.1 * torch.randn(6, generator=generator),
    }


def random_grads(params: Params, generator: torch.Generator) -> Params:
    return {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}


def clone(tensors: Params) -> Params:
    return {name: t.clone() for name, t in tensors.items()}


def torch_adamw(
    params: Params, **kwargs
) -> tuple[dict[str, torch.nn.Parameter], torch.optim.AdamW]:
    """nanoGPT's `configure_optimizers`: a decay group (ndim >= 2) and a no-decay group."""
    weight_decay = kwargs.pop("weight_decay")
    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    groups = [
        {"params": [p for p in leaves.values() if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in leaves.values() if p.ndim < 2], "weight_decay": 0.0},
    ]
    return leaves, torch.optim.AdamW(groups, **kwargs)


def assert_close_to_torch(ours: Params, theirs: dict[str, torch.nn.Parameter]) -> None:
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name].detach(), atol=TORCH_MATCH_ATOL, rtol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("schedule", [False, True])
def test_matches_torch_adamw_over_50_steps_of_random_grads(generator, foreach, schedule):
    hyper = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    lr = warmup_cosine(1e-2, 1e-3, warmup_steps=5, decay_steps=40) if schedule else 3e-3
    opt = adamw(lr, **hyper)
    params = small_params(generator)
    pure_params, pure_state = params, opt.init(params)
    inplace_params = clone(params)
    inplace_state = opt.init(inplace_params)
    leaves, reference = torch_adamw(params, lr=1.0, foreach=foreach, **hyper)
    for step in range(50):
        grads = random_grads(params, generator)
        pure_params, pure_state = opt.update(grads, pure_state, pure_params)
        opt.update_(grads, inplace_state, inplace_params)
        for group in reference.param_groups:
            group["lr"] = lr(step) if schedule else lr
        for name, leaf in leaves.items():
            leaf.grad = grads[name].clone()
        reference.step()
    assert_close_to_torch(pure_params, leaves)
    assert_close_to_torch(inplace_params, leaves)
    assert int(pure_state["step"]) == int(inplace_state["step"]) == 50


def test_matches_torch_adamw_training_the_real_model(tiny_config, generator):
    schedule = warmup_cosine(1e-3, 1e-4, warmup_steps=2, decay_steps=6)
    opt = adamw(schedule, weight_decay=0.1)
    params = gpt_fn.init_params(tiny_config, seed=0)
    state = opt.init(params)
    leaves, reference = torch_adamw(params, lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    grad_of_loss = torch.func.grad(gpt_fn.loss)
    for step in range(8):
        tokens = torch.randint(tiny_config.vocab_size, (2, 9), generator=generator)
        targets = torch.randint(tiny_config.vocab_size, (2, 9), generator=generator)
        # Each side differentiates at its own params, as two real training runs would.
        grads = grad_of_loss(params, tokens, targets, tiny_config)
        params, state = opt.update(grads, state, params)
        theirs = {name: leaf.detach() for name, leaf in leaves.items()}
        for name, grad in grad_of_loss(theirs, tokens, targets, tiny_config).items():
            leaves[name].grad = grad
        for group in reference.param_groups:
            group["lr"] = schedule(step)
        reference.step()
    assert_close_to_torch(params, leaves)


def test_inplace_update_equals_pure_update_bitwise(generator):
    opt = adamw(2e-3, weight_decay=0.3, decay_mask=lambda p: {n: "wte" in n for n in p})
    pure_params = small_params(generator)
    pure_state = opt.init(pure_params)
    inplace_params, inplace_state = clone(pure_params), opt.init(pure_params)
    for _ in range(5):
        grads = random_grads(pure_params, generator)
        pure_params, pure_state = opt.update(grads, pure_state, pure_params)
        opt.update_(grads, inplace_state, inplace_params)
    for name in pure_params:
        assert torch.equal(pure_params[name], inplace_params[name])
    for key in pure_state:
        assert torch.equal(pure_state[key], inplace_state[key])


def test_update_leaves_its_inputs_untouched_and_shares_no_memory(generator):
    opt = adamw(1e-2)
    params = small_params(generator)
    params, state = opt.update(random_grads(params, generator), opt.init(params), params)
    grads = random_grads(params, generator)
    before = [clone(params), clone(state), clone(grads)]
    new_params, new_state = opt.update(grads, state, params)
    for old, now in zip(before, [params, state, grads], strict=True):
        assert all(torch.equal(old[k], now[k]) for k in old)
    inputs = {t.data_ptr() for t in [*params.values(), *state.values(), *grads.values()]}
    assert not inputs & {t.data_ptr() for t in [*new_params.values(), *new_state.values()]}


def test_inplace_update_writes_into_the_same_tensors(generator):
    opt = adamw(1e-2)
    params = small_params(generator)
    state = opt.init(params)
    pointers = {k: t.data_ptr() for k, t in [*params.items(), *state.items()]}
    snapshot = clone(params)
    returned = opt.update_(random_grads(params, generator), state, params)
    assert returned is state
    assert pointers == {k: t.data_ptr() for k, t in [*params.items(), *state.items()]}
    assert not any(torch.equal(snapshot[k], params[k]) for k in params)


def test_inplace_update_accepts_parameters_that_require_grad(generator):
    opt = adamw(1e-2)
    params = {k: torch.nn.Parameter(v) for k, v in small_params(generator).items()}
    opt.update_(random_grads(params, generator), opt.init(params), params)
    assert all(p.requires_grad and p.grad_fn is None for p in params.values())


def test_default_decay_mask_decays_matrices_only(tiny_config):
    mask = default_decay_mask(gpt_fn.init_params(tiny_config, seed=0))
    decayed = {name for name, decay in mask.items() if decay}
    layer_matrices = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    expected = {"wte.weight", "wpe.weight"} | {
        f"h.{i}.{m}.weight" for i in range(tiny_config.n_layer) for m in layer_matrices
    }
    assert decayed == expected


@pytest.mark.parametrize("use_inplace", [False, True])
def test_zero_grads_only_shrink_the_masked_params_by_one_minus_lr_times_decay(
    generator, use_inplace
):
    lr, weight_decay = 0.1, 0.5
    params = small_params(generator)
    mask = {name: name.startswith("h.0") for name in params}
    opt = adamw(lr, weight_decay=weight_decay, decay_mask=mask)
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    new = clone(params)
    if use_inplace:
        opt.update_(zeros, opt.init(new), new)
    else:
        new, _ = opt.update(zeros, opt.init(params), params)
    for name, p in params.items():
        # m = v = 0 makes the Adam term 0 / (0 + eps) = 0: only the decoupled decay moves p.
        factor = 1 - lr * weight_decay if mask[name] else 1.0
        assert torch.equal(new[name], p * factor)


def test_state_survives_a_safetensors_round_trip(generator, tmp_path):
    opt = adamw(warmup_cosine(1e-2, 1e-3, warmup_steps=3, decay_steps=10))
    params = small_params(generator)
    state = opt.init(params)
    grads = [random_grads(params, generator) for _ in range(6)]
    for g in grads[:3]:
        params, state = opt.update(g, state, params)
    save_file(state, tmp_path / "opt.safetensors")
    save_file(params, tmp_path / "params.safetensors")
    resumed_state = load_file(tmp_path / "opt.safetensors")
    resumed_params = load_file(tmp_path / "params.safetensors")
    for g in grads[3:]:
        params, state = opt.update(g, state, params)
        resumed_params, resumed_state = opt.update(g, resumed_state, resumed_params)
    assert all(torch.equal(params[k], resumed_params[k]) for k in params)


def test_schedule_is_asked_with_the_number_of_updates_so_far(generator):
    asked: list[int] = []

    def schedule(step: int) -> float:
        asked.append(step)
        return 1e-3

    opt = adamw(schedule)
    params = small_params(generator)
    state = opt.init(params)
    for _ in range(3):
        params, state = opt.update(random_grads(params, generator), state, params)
    assert asked == [0, 1, 2]
    assert state["step"].dtype == torch.int64 and int(state["step"]) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": 1e-3, "betas": (1.0, 0.95)}, r"betas\[0\]"),
        ({"lr": 1e-3, "betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"lr": 1e-3, "eps": -1e-8}, "eps"),
        ({"lr": 1e-3, "weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_fail_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adamw(**kwargs)


def test_decay_mask_naming_other_params_fails_at_init(generator):
    params = small_params(generator)
    opt = adamw(1e-3, decay_mask={"wte.weight": True})
    with pytest.raises(KeyError, match="decay_mask"):
        opt.init(params)


def test_schedule_giving_a_negative_lr_fails_at_update(generator):
    opt = adamw(lambda step: -1.0)
    params = small_params(generator)
    with pytest.raises(ValueError, match="step 0"):
        opt.update(random_grads(params, generator), opt.init(params), params)


@pytest.mark.parametrize("use_inplace", [False, True])
def test_mismatched_grads_or_state_raise_naming_the_problem(generator, use_inplace):
    opt = adamw(1e-3)
    params = small_params(generator)
    state = opt.init(params)
    update = opt.update_ if use_inplace else opt.update
    grads = random_grads(params, generator)
    with pytest.raises(KeyError, match="grads"):
        update({k: g for k, g in grads.items() if k != "ln_f.weight"}, state, params)
    with pytest.raises(ValueError, match="'h.0.mlp.c_fc.bias' has shape"):
        update({**grads, "h.0.mlp.c_fc.bias": torch.zeros(3)}, state, params)
    with pytest.raises(KeyError, match="exp_avg_sq.wte.weight"):
        update(grads, {k: v for k, v in state.items() if k != "exp_avg_sq.wte.weight"}, params)
    none = pytest.raises(TypeError, match="grad 'h.0.mlp.c_fc.bias' is None: no gradient reached")
    with shape_checks(False), none:  # what a caller without jaxtyping's hook meets
        update({**grads, "h.0.mlp.c_fc.bias": None}, state, params)
