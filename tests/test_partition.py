"""partition: equal to each optimizer on its own subset, GPT's Muon/AdamW split, checkpointable."""

import pytest
import torch

import gpt_fn
from gpt_fn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gpt_fn.optim import (
    FUSED_QKV,
    adamw,
    gpt_muon_adamw,
    gpt_muon_label,
    muon,
    partition,
    warmup_cosine,
)
from gpt_fn.shapes import Params


def random_grads(params: Params, generator: torch.Generator) -> Params:
    return {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}


def subset(tensors: Params, names: list[str]) -> Params:
    return {name: tensors[name] for name in names}


def clone(tensors: Params) -> Params:
    return {name: t.clone() for name, t in tensors.items()}


@pytest.mark.parametrize("use_inplace", [False, True])
def test_partition_equals_each_optimizer_on_its_own_subset(tiny_config, generator, use_inplace):
    params = gpt_fn.init_params(tiny_config, seed=0)
    muon_opt, adamw_opt = muon(0.02, split_fused=FUSED_QKV), adamw(1e-3)
    opt = gpt_muon_adamw(muon_opt, adamw_opt)
    matrices = [n for n, p in params.items() if n.startswith("h.") and p.ndim == 2]
    rest = [n for n in params if n not in matrices]
    state = opt.init(params)
    alone = {
        "muon": (subset(params, matrices), muon_opt.init(subset(params, matrices))),
        "adamw": (subset(params, rest), adamw_opt.init(subset(params, rest))),
    }
    work = clone(params)
    for _ in range(3):
        grads = random_grads(params, generator)
        if use_inplace:
            assert opt.update_(grads, state, work) is state
        else:
            work, state = opt.update(grads, state, work)
        for key, names, sub in (("muon", matrices, muon_opt), ("adamw", rest, adamw_opt)):
            sub_params, sub_state = alone[key]
            alone[key] = sub.update(subset(grads, names), sub_state, sub_params)
    assert list(work) == list(params)  # the params' order survives the routing
    for key, (sub_params, sub_state) in alone.items():
        assert all(torch.equal(work[name], value) for name, value in sub_params.items())
        for name, value in sub_state.items():
            assert torch.equal(state[f"{key}/{name}"], value), name
    assert len(state) == len(alone["muon"][1]) + len(alone["adamw"][1])


def test_gpt_split_gives_muon_the_block_matrices_and_adamw_the_rest(tiny_config):
    params = gpt_fn.init_params(tiny_config, seed=0)
    labels = {name: gpt_muon_label(name, p) for name, p in params.items()}
    layer_matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    expected = {f"h.{i}.{m}.weight" for i in range(tiny_config.n_layer) for m in layer_matrices}
    assert {name for name, label in labels.items() if label == "muon"} == expected
    adamw_names = {name for name, label in labels.items() if label == "adamw"}
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= adamw_names
    assert all(params[n].ndim == 1 for n in adamw_names - {"wte.weight", "wpe.weight"})
    state = gpt_muon_adamw(muon(0.02), adamw(1e-3)).init(params)
    assert "muon/momentum_buffer.h.0.attn.c_attn.weight" in state
    assert "adamw/exp_avg.wte.weight" in state and "adamw/exp_avg_sq.h.1.ln_2.bias" in state
    assert {"muon/step", "adamw/step"} <= state.keys()


def test_gpt_split_training_the_real_model_matches_torch_muon_plus_adamw(tiny_config, generator):
    # The setup torch's Muon docs give: Muon on the hidden matrices, AdamW (nanoGPT's decay
    # groups) on the rest; both sides differentiate at their own params.
    schedule = warmup_cosine(1e-3, 1e-4, warmup_steps=2, decay_steps=6)
    opt = gpt_muon_adamw(muon(0.02), adamw(schedule, weight_decay=0.1))
    params = gpt_fn.init_params(tiny_config, seed=0)
    state = opt.init(params)
    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    hidden = [leaves[n] for n, p in params.items() if gpt_muon_label(n, p) == "muon"]
    others = [(n, leaves[n]) for n, p in params.items() if gpt_muon_label(n, p) == "adamw"]
    torch_muon = torch.optim.Muon(hidden, lr=0.02)
    torch_adamw = torch.optim.AdamW(
        [
            {"params": [p for _, p in others if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in others if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1.0,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    grad_of_loss = torch.func.grad(gpt_fn.loss)
    for step in range(4):
        tokens = torch.randint(tiny_config.vocab_size, (2, 9), generator=generator)
        targets = torch.randint(tiny_config.vocab_size, (2, 9), generator=generator)
        params, state = opt.update(
            grad_of_loss(params, tokens, targets, tiny_config), state, params
        )
        theirs = {name: leaf.detach() for name, leaf in leaves.items()}
        for name, grad in grad_of_loss(theirs, tokens, targets, tiny_config).items():
            leaves[name].grad = grad
        for group in torch_adamw.param_groups:
            group["lr"] = schedule(step)
        torch_muon.step()
        torch_adamw.step()
    # Same ops in the same order on the same CPU: bitwise (AdamW's own test allows 1e-6 for GPUs).
    assert all(torch.equal(params[name], leaf.detach()) for name, leaf in leaves.items())


def test_state_round_trips_through_a_checkpoint(tiny_config, generator, tmp_path):
    opt = gpt_muon_adamw(muon(0.02, split_fused=FUSED_QKV), adamw(1e-3))
    params = gpt_fn.init_params(tiny_config, seed=0)
    state = opt.init(params)
    grads = [random_grads(params, generator) for _ in range(4)]
    for g in grads[:2]:
        opt.update_(g, state, params)
    save_checkpoint(tmp_path, Checkpoint(params, state, 2, tiny_config, {}))
    saved = load_checkpoint(tmp_path)
    assert saved.optimizer_state.keys() == state.keys()
    resumed_params, resumed_state = saved.params, saved.optimizer_state
    for g in grads[2:]:
        opt.update_(g, state, params)
        resumed_params, resumed_state = opt.update(g, resumed_state, resumed_params)
    assert all(torch.equal(params[k], resumed_params[k]) for k in params)
    assert all(torch.equal(state[k], resumed_state[k]) for k in state)


def test_label_mapping_and_unused_labels(generator):
    params = {"a": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator)}
    opt = partition(
        {"fast": adamw(1e-2), "slow": adamw(1e-4), "unused": muon(0.02)},
        {"a": "fast", "b": "slow"},
    )
    state = opt.init(params)
    assert not any(key.startswith("unused/") for key in state)  # a label without params: no state
    new, _ = opt.update(random_grads(params, generator), state, params)
    assert new.keys() == params.keys()


def test_unknown_or_missing_labels_are_clear_errors(generator):
    params = {"a": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator)}
    opts = {"muon": muon(0.02), "adamw": adamw(1e-3)}
    with pytest.raises(KeyError, match="'b' is labelled 'sgd', which is not one of"):
        partition(opts, lambda name, p: "muon" if p.ndim == 2 else "sgd").init(params)
    with pytest.raises(KeyError, match="'b' has no label"):
        partition(opts, lambda name, p: "muon" if p.ndim == 2 else None).init(params)
    with pytest.raises(
        KeyError, match=r"label mapping must name exactly the params: missing 1 key \['b'\]"
    ):
        partition(opts, {"a": "muon"}).init(params)
    with pytest.raises(ValueError, match="'/'"):
        partition({"a/b": adamw(1e-3)}, lambda name, p: "a/b")
    with pytest.raises(ValueError, match="empty"):
        partition({}, lambda name, p: "x")
    with pytest.raises(TypeError, match="Optimizer"):
        partition({"x": "adamw"}, lambda name, p: "x")


@pytest.mark.parametrize("use_inplace", [False, True])
def test_state_or_grads_that_do_not_fit_raise_naming_the_problem(
    tiny_config, generator, use_inplace
):
    opt = gpt_muon_adamw(muon(0.02), adamw(1e-3))
    params = gpt_fn.init_params(tiny_config, seed=0)
    state = opt.init(params)
    update = opt.update_ if use_inplace else opt.update
    grads = random_grads(params, generator)
    with pytest.raises(KeyError, match="grads"):
        update({k: g for k, g in grads.items() if k != "wte.weight"}, state, params)
    with pytest.raises(KeyError, match="'sgd/step' belongs to none"):
        update(grads, {**state, "sgd/step": torch.zeros(())}, params)
    with pytest.raises(KeyError, match="no 'muon'/... entries"):
        update(grads, {k: v for k, v in state.items() if not k.startswith("muon/")}, params)
    adamw_only = partition({"adamw": adamw(1e-3)}, lambda name, p: "adamw")
    with pytest.raises(KeyError, match="'muon/step' belongs to none"):
        adamw_only.update(grads, state, params)
