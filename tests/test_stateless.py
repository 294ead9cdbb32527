"""The stateless optimizer layer: one step, run pure (new tensors, torch.func) or in place (foreach)."""

import pytest
import torch

from gpt_fn.optim import adamw, from_step, muon
from gpt_fn.optim.stateless import foreach, new_tensors
from gpt_fn.shapes import Params


def tensors(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(3, 4, generator=generator), torch.rand(5, generator=generator) + 0.1]


@pytest.mark.parametrize(
    ("op", "args", "kwargs"),
    [
        ("mul_", (0.9,), {}),
        ("lerp_", ("list", 0.1), {}),
        ("addcmul_", ("list", "list"), {"value": 0.05}),
        ("addcdiv_", ("list", "positive list"), {"value": -0.01}),
        ("add_", ("list",), {"alpha": -0.3}),
        ("sqrt", (), {}),
    ],
)
def test_foreach_and_new_tensors_give_the_same_bits_and_only_foreach_writes(
    generator, op, args, kwargs
):
    first = [t.abs() for t in tensors(generator)]
    lists = {"list": tensors(generator), "positive list": [t.abs() + 1 for t in first]}
    resolved = [lists[a] if isinstance(a, str) else a for a in args]
    before = [t.clone() for t in first]
    fresh = new_tensors(op, first, *resolved, **kwargs)
    assert all(torch.equal(t, b) for t, b in zip(first, before, strict=True))  # untouched
    written = foreach(op, first, *resolved, **kwargs)
    assert all(torch.equal(f, w) for f, w in zip(fresh, written, strict=True))
    # An in-place op returns the very tensors it wrote into; an out-of-place one new tensors.
    assert all((w is t) == op.endswith("_") for w, t in zip(written, first, strict=True))


def stacked(members: list[Params]) -> Params:
    return {name: torch.stack([m[name] for m in members]) for name in members[0]}


def matrices(generator: torch.Generator) -> Params:
    return {
        "h.0.wide.weight": torch.randn(4, 6, generator=generator),
        "h.0.tall.weight": torch.randn(6, 4, generator=generator),
    }


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_pure_update_under_vmap_equals_each_member_updated_alone(generator, name):
    # AdamW is elementwise: the batched kernels give the same bits. Muon's Newton-Schulz runs
    # batched matmuls, which may sum in another order: fp32 rounding, ~1e-6 after 3 steps.
    opt = adamw(1e-2) if name == "adamw" else muon(0.02, ns_dtype=torch.float32)
    members = [matrices(generator) for _ in range(3)]
    states = [opt.init(m) for m in members]
    # The step counter is shared by the ensemble (not vmapped), as experiments/ensemble_vmap.py.
    state = {
        k: (v if k == "step" else torch.stack([s[k] for s in states])) for k, v in states[0].items()
    }
    params = stacked(members)
    in_dims = (
        {k: 0 for k in params},
        {k: None if k == "step" else 0 for k in state},
        {k: 0 for k in params},
    )
    out_dims = (0, {k: None if k == "step" else 0 for k in state})
    vmapped = torch.func.vmap(opt.update, in_dims=in_dims, out_dims=out_dims)
    for _ in range(3):
        grads = [
            {k: torch.randn(v.shape, generator=generator) for k, v in m.items()} for m in members
        ]
        params, state = vmapped(stacked(grads), state, params)
        updated = [opt.update(g, s, m) for g, s, m in zip(grads, states, members, strict=True)]
        members, states = [u[0] for u in updated], [u[1] for u in updated]
    atol = 0.0 if name == "adamw" else 1e-5
    for i, member in enumerate(members):
        for k, value in member.items():
            torch.testing.assert_close(params[k][i], value, atol=atol, rtol=0)
    assert int(state["step"]) == 3


def test_pure_update_is_differentiable_and_decay_is_its_only_dependence_on_params(generator):
    # m and v do not depend on the params, so d(new param)/d(param) is the decay factor
    # 1 - lr * wd where the mask decays, 1 elsewhere: exact in fp32 (one multiply by a scalar).
    lr, wd = 1e-2, 0.1
    opt = adamw(lr, weight_decay=wd)
    params = {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)}
    grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
    state = opt.init(params)

    def total(p: Params) -> torch.Tensor:
        new, _ = opt.update(grads, state, p)
        return sum(v.sum() for v in new.values())

    sensitivity = torch.func.grad(total)(params)
    assert torch.equal(sensitivity["w"], torch.full((3, 4), 1 - lr * wd))
    assert torch.equal(sensitivity["b"], torch.ones(4))


def test_an_optimizer_written_as_one_step_gets_both_twins_equal_to_torch_sgd(generator):
    # A new optimizer is one `step`: plain SGD, `p - lr * g`, torch's single-tensor op.
    lr = 0.1

    def step(each, grads, state, params):
        new = each("add_", list(params.values()), [grads[n] for n in params], alpha=-lr)
        return dict(zip(params, new, strict=True)), {}

    opt = from_step(step, buffers=())
    params = matrices(generator)
    inplace = {k: v.clone() for k, v in params.items()}
    state, inplace_state = opt.init(params), opt.init(inplace)
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    reference = torch.optim.SGD(leaves.values(), lr=lr, foreach=False)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
        params, state = opt.update(grads, state, params)
        opt.update_(grads, inplace_state, inplace)
        for k, leaf in leaves.items():
            leaf.grad = grads[k].clone()
        reference.step()
    for k, leaf in leaves.items():
        assert torch.equal(params[k], leaf.detach()) and torch.equal(inplace[k], leaf.detach())
    assert int(state["step"]) == int(inplace_state["step"]) == 3
