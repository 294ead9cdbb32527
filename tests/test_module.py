"""The thin nn.Module wrapper: same dict, same names, and it works with the Module tools."""

import copy
import dataclasses

import pytest
import torch

from gpt_fn import GPT, forward, init_params, loss
from gpt_fn.shapes import shape_checks


def _tokens(config, generator, batch=2):
    return torch.randint(0, config.vocab_size, (batch, config.block_size), generator=generator)


def test_state_dict_keys_are_the_param_names(tiny_config):
    module = GPT(tiny_config, seed=0)
    params = init_params(tiny_config, seed=0)
    state = module.state_dict()
    assert list(state) == list(params)
    assert all(torch.equal(state[k], params[k]) for k in params)


def test_forward_equals_the_pure_function(tiny_config, generator):
    module = GPT(tiny_config, seed=3)
    tokens = _tokens(tiny_config, generator)
    torch.testing.assert_close(
        module(tokens), forward(module.params(), tokens, tiny_config), rtol=0, atol=0
    )
    manual = GPT.from_params(module.params(), tiny_config, attention="manual")
    torch.testing.assert_close(manual(tokens), module(tokens), atol=1e-5, rtol=0)


def test_from_params_shares_storage(tiny_config):
    params = init_params(tiny_config, seed=0)
    module = GPT.from_params(params, tiny_config)
    with torch.no_grad():
        module.params()["wte.weight"][0, 0] = 42.0
    assert params["wte.weight"][0, 0].item() == 42.0


def test_load_state_dict_round_trip(tiny_config, generator):
    source, target = GPT(tiny_config, seed=0), GPT(tiny_config, seed=1)
    target.load_state_dict(source.state_dict())
    tokens = _tokens(tiny_config, generator)
    torch.testing.assert_close(target(tokens), source(tokens), rtol=0, atol=0)


def test_forward_with_targets_is_the_loss(tiny_config, generator):
    module = GPT(tiny_config, seed=0)
    tokens = _tokens(tiny_config, generator)
    torch.testing.assert_close(
        module(tokens, tokens), loss(module.params(), tokens, tokens, tiny_config)
    )


def test_backward_fills_grads_of_every_parameter(tiny_config, generator):
    module = GPT(tiny_config, seed=0)
    tokens = _tokens(tiny_config, generator)
    module(tokens, tokens).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_functional_call_and_func_grad_over_the_dict(tiny_config, generator):
    module = GPT(tiny_config, seed=0)
    other = init_params(tiny_config, seed=5)
    tokens = _tokens(tiny_config, generator)
    swapped = torch.func.functional_call(module, other, (tokens,))
    torch.testing.assert_close(swapped, forward(other, tokens, tiny_config), rtol=0, atol=0)

    def loss_of(params):
        logits = torch.func.functional_call(module, params, (tokens,))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    grads = torch.func.grad(loss_of)(other)
    assert set(grads) == set(other)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_vmap_over_stacked_param_dicts(tiny_config, generator):
    modules = [GPT(tiny_config, seed=s) for s in range(3)]
    stacked, _ = torch.func.stack_module_state(modules)
    base = copy.deepcopy(modules[0]).to("meta")
    tokens = _tokens(tiny_config, generator)

    def run(params):
        return torch.func.functional_call(base, params, (tokens,))

    batched = torch.func.vmap(run)(stacked)
    for i, module in enumerate(modules):  # vmapped matmuls may reorder sums: fp32 noise only
        torch.testing.assert_close(batched[i], module(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_gives_the_eager_logits(tiny_config, generator):
    module = GPT(tiny_config, seed=0)
    tokens = _tokens(tiny_config, generator)
    with shape_checks(False):  # compiled code runs unchecked (jaxtyping under dynamo recompiles)
        compiled = torch.compile(module)
        eager = module(tokens)
        out = compiled(tokens)
    # Inductor fuses and reorders fp32 reductions: ~1e-6 apart.
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_an_unknown_attention_kernel_fails_when_the_module_is_built(tiny_config):
    with shape_checks(False), pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        GPT(tiny_config, attention="flash")


def _loss_and_grads(module, tokens, generator=None):
    module.zero_grad()
    value = module(tokens, tokens, generator)
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_plain_loss_and_gradients(tiny_config, dropout):
    # Recomputation runs the same ops on the same inputs in the same order (and replays the
    # dropout generator), so losses and gradients agree to rounding: 1e-6 in fp32 (measured 0).
    config = dataclasses.replace(tiny_config, dropout=dropout)
    plain = GPT(config, seed=5)
    recomputed = GPT.from_params(
        {k: v.detach().clone() for k, v in plain.params().items()}, config, checkpoint_blocks=True
    )
    tokens = _tokens(config, torch.Generator().manual_seed(0))
    seeds = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    want_loss, want_grads = _loss_and_grads(plain, tokens, seeds[0])
    got_loss, got_grads = _loss_and_grads(recomputed, tokens, seeds[1])
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=1e-6)
    # The generator moved on exactly as the plain module moved it (the next batch's dropout).
    assert torch.equal(seeds[0].get_state(), seeds[1].get_state())


def test_activation_checkpointing_recomputes_the_blocks_in_backward(tiny_config):
    # What is saved for backward: only each block's input (and the LM head's), not the
    # attention and MLP intermediates, so far fewer tensors are held between forward and backward.
    def saved_tensors(module):
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        tokens = _tokens(tiny_config, torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(tokens, tokens).backward()
        return count

    plain = GPT(tiny_config, seed=0)
    recomputed = GPT(tiny_config, seed=0, checkpoint_blocks=True)
    assert saved_tensors(recomputed) < saved_tensors(plain) // 2


def test_activation_checkpointing_leaves_inference_as_it_was(tiny_config, generator):
    module = GPT(tiny_config, seed=0, checkpoint_blocks=True)
    tokens = _tokens(tiny_config, generator)
    with torch.no_grad():
        torch.testing.assert_close(
            module(tokens), forward(module.params(), tokens, tiny_config), rtol=0, atol=0
        )
