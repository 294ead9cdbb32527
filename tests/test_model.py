"""The pure model: initialisation, forward, loss, kernels, dropout, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError

import gpt_fn
from gpt_fn import (
    GPTConfig,
    check_params,
    forward,
    init_params,
    loss,
    model,
    param_shapes,
    sampling,
)
from gpt_fn.shapes import shape_checks


def _tokens(config, generator, batch=2, seq=None):
    return torch.randint(
        0, config.vocab_size, (batch, seq or config.block_size), generator=generator
    )


def test_init_is_deterministic_for_a_seed_and_differs_across_seeds(tiny_config):
    a, b, c = (init_params(tiny_config, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_init_follows_gpt2(tiny_config):
    config = GPTConfig(vocab_size=4000, block_size=64, n_layer=4, n_head=4, n_embd=64)
    params = init_params(config, seed=0)
    assert list(params) == list(param_shapes(config))
    # Sample std of thousands of N(0, sigma) draws is within a few percent of sigma.
    assert params["wte.weight"].std().item() == pytest.approx(0.02, rel=0.03)
    assert params["h.0.mlp.c_fc.weight"].std().item() == pytest.approx(0.02, rel=0.03)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert params["h.3.mlp.c_proj.weight"].std().item() == pytest.approx(residual, rel=0.03)
    assert params["h.1.attn.c_proj.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(params["h.2.ln_1.weight"], torch.ones(64))
    assert torch.equal(params["h.2.attn.c_attn.bias"], torch.zeros(192))
    assert "lm_head.weight" not in params  # tied: wte is the LM head


def test_init_dtype_and_no_bias_variant(tiny_config):
    params = init_params(tiny_config, seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    no_bias = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False)
    names = list(init_params(no_bias, seed=0))
    assert not any(name.endswith(".bias") for name in names)
    logits = forward(init_params(no_bias, seed=0), torch.zeros(1, 8, dtype=torch.long), no_bias)
    assert logits.shape == (1, 8, 50)


def test_forward_shape_and_finite(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    logits = forward(params, _tokens(tiny_config, generator), tiny_config)
    assert logits.shape == (2, tiny_config.block_size, tiny_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_forward_does_not_modify_params(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    before = {k: v.clone() for k, v in params.items()}
    forward(params, _tokens(tiny_config, generator), tiny_config)
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_kernels_agree_on_the_whole_model_forward_and_backward(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    tokens = _tokens(tiny_config, generator)

    def loss_and_grads(kernel):
        return torch.func.grad_and_value(loss)(
            params, tokens, tokens, tiny_config, attention=kernel
        )

    (grads_sdpa, loss_sdpa), (grads_manual, loss_manual) = map(loss_and_grads, ("sdpa", "manual"))
    torch.testing.assert_close(
        forward(params, tokens, tiny_config, attention="sdpa"),
        forward(params, tokens, tiny_config, attention="manual"),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(loss_sdpa, loss_manual, atol=1e-5, rtol=0)
    for name in params:  # fp32, same math in another summation order: ~1e-7 apart
        torch.testing.assert_close(grads_sdpa[name], grads_manual[name], atol=1e-5, rtol=0)


def test_logits_are_causal(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    tokens = _tokens(tiny_config, generator, batch=1)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % tiny_config.vocab_size
    a, b = forward(params, tokens, tiny_config), forward(params, changed, tiny_config)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_loss_is_mean_cross_entropy_of_the_logits(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    tokens, targets = _tokens(tiny_config, generator), _tokens(tiny_config, generator)
    logits = forward(params, tokens, tiny_config)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss(params, tokens, targets, tiny_config), expected)
    # At init the predictions are near uniform: loss ~ ln(vocab).
    assert expected.item() == pytest.approx(math.log(tiny_config.vocab_size), rel=0.05)


def test_dropout_is_driven_by_the_generator_only(generator):
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.3)
    params = init_params(config, seed=0)
    tokens = torch.randint(0, 50, (2, 8), generator=generator)
    a = forward(params, tokens, config, generator=torch.Generator().manual_seed(7))
    b = forward(params, tokens, config, generator=torch.Generator().manual_seed(7))
    c = forward(params, tokens, config, generator=torch.Generator().manual_seed(8))
    without = forward(params, tokens, config)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, without)
    assert torch.equal(without, forward(params, tokens, config))  # no generator: deterministic


def test_forward_is_a_plain_function_of_the_dict_for_torch_func(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    tokens = _tokens(tiny_config, generator)
    grads = torch.func.grad(loss)(params, tokens, tokens, tiny_config)
    assert set(grads) == set(params)
    with_autograd = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(with_autograd, tokens, tokens, tiny_config).backward()
    for name in params:
        torch.testing.assert_close(grads[name], with_autograd[name].grad)


# --- bad input: each error names the problem ---------------------------------------------


def test_token_id_at_or_above_vocab_is_rejected(tiny_config):
    params = init_params(tiny_config, seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    tokens[0, 2] = tiny_config.vocab_size
    with pytest.raises(ValueError, match=r"token id 101 is outside \[0, vocab_size=101\)"):
        forward(params, tokens, tiny_config)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        forward(params, tokens.clamp(max=0) - 1, tiny_config)


def test_sequence_longer_than_block_size_is_rejected(tiny_config):
    params = init_params(tiny_config, seed=0)
    with pytest.raises(ValueError, match="17 positions is longer than block_size=16"):
        forward(params, torch.zeros(1, 17, dtype=torch.long), tiny_config)


def test_wrong_rank_or_dtype_is_rejected_by_the_shape_checker_and_by_the_model(tiny_config):
    params = init_params(tiny_config, seed=0)
    with pytest.raises(TypeCheckError):  # jaxtyping: Int[Tensor, "batch seq"]
        forward(params, torch.zeros(4, dtype=torch.long), tiny_config)
    with pytest.raises(TypeCheckError):
        forward(params, torch.zeros(1, 4), tiny_config)
    with shape_checks(False):  # users without the import hook get the model's own errors
        with pytest.raises(ValueError, match=r"shape \(batch, seq\), got shape \(4,\)"):
            forward(params, torch.zeros(4, dtype=torch.long), tiny_config)
        with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
            forward(params, torch.zeros(1, 4), tiny_config)


def test_shape_checker_names_the_inconsistent_dimension(tiny_config):
    from gpt_fn.nn import mlp

    params = init_params(tiny_config, seed=0)
    block = {k.removeprefix("h.0.mlp."): v for k, v in params.items() if k.startswith("h.0.mlp.")}
    with pytest.raises(TypeCheckError, match="batch seq d_model"):
        mlp(block, torch.zeros(2, 3))  # rank 2 where (batch, seq, d_model) is declared


def test_missing_or_misshapen_params_are_named(tiny_config):
    params = init_params(tiny_config, seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    missing = {k: v for k, v in params.items() if k != "h.1.mlp.c_fc.bias"}
    with pytest.raises(KeyError, match="'h.1.mlp.c_fc.bias'"):
        forward(missing, tokens, tiny_config)
    misshapen = {**params, "h.0.attn.c_proj.weight": torch.zeros(24, 25)}
    with pytest.raises(
        ValueError, match=r"'h.0.attn.c_proj.weight' has shape \(24, 25\), expected \(24, 24\)"
    ):
        forward(misshapen, tokens, tiny_config)
    with pytest.raises(KeyError, match="unexpected key.*'lm_head.weight'"):
        check_params({**params, "lm_head.weight": params["wte.weight"]}, tiny_config)


def test_loss_rejects_targets_of_another_shape_or_out_of_range(tiny_config):
    params = init_params(tiny_config, seed=0)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeCheckError, match="seq=4"):
        loss(params, tokens, tokens[:, :3], tiny_config)
    with shape_checks(False), pytest.raises(ValueError, match=r"targets shape \(2, 3\) differs"):
        loss(params, tokens, tokens[:, :3], tiny_config)
    with pytest.raises(ValueError, match="token id 500 is outside"):
        loss(params, tokens, tokens + 500, tiny_config)


def test_public_api_is_at_the_top_level():
    for name in (
        "GPTConfig",
        "init_params",
        "forward",
        "forward_from",
        "loss",
        "GPT",
        "Params",
        "Tokens",
        "Logits",
    ):
        assert hasattr(gpt_fn, name)


def test_vmap_of_grad_over_stacked_params_and_batched_tokens(tiny_config, generator):
    # Per-model grads of an ensemble: the token check must see through grad's wrapper that
    # the tokens are vmapped (their values cannot be read) instead of calling .item().
    stacked = {
        k: torch.stack([init_params(tiny_config, seed=s)[k] for s in range(2)])
        for k in param_shapes(tiny_config)
    }
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 3, 8), generator=generator)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, 0, None))(
        stacked, tokens, tokens, tiny_config
    )
    one = torch.func.grad(loss)(init_params(tiny_config, seed=1), tokens[1], tokens[1], tiny_config)
    for name in one:  # vmapped matmuls may reorder fp32 sums
        torch.testing.assert_close(grads[name][1], one[name], atol=1e-5, rtol=1e-4)


def test_params_of_mixed_dtypes_or_devices_or_not_floating_are_named(tiny_config):
    params = init_params(tiny_config, seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    one_bf16 = {**params, "h.1.mlp.c_fc.weight": params["h.1.mlp.c_fc.weight"].bfloat16()}
    with pytest.raises(TypeError, match="'h.1.mlp.c_fc.weight' has dtype torch.bfloat16 but"):
        forward(one_bf16, tokens, tiny_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the matmuls' operands
        assert forward(one_bf16, tokens, tiny_config).shape == (1, 4, tiny_config.vocab_size)
    on_meta = {**params, "h.0.mlp.c_fc.bias": params["h.0.mlp.c_fc.bias"].to("meta")}
    with pytest.raises(
        ValueError, match="'h.0.mlp.c_fc.bias' is on meta but 'wte.weight' is on cpu"
    ):
        forward(on_meta, tokens, tiny_config)
    with shape_checks(False):  # what a caller without jaxtyping's hook meets
        for value in ([0.0] * tiny_config.n_embd, params["ln_f.bias"].numpy()):
            with pytest.raises(TypeError, match=r"params: 'ln_f.bias' is a \w+, not a torch"):
                forward({**params, "ln_f.bias": value}, tokens, tiny_config)
    integer = {**params, "ln_f.bias": params["ln_f.bias"].long()}
    with pytest.raises(
        TypeError, match="'ln_f.bias' has dtype torch.int64; params must be floating"
    ):
        loss(integer, tokens, tokens, tiny_config)


def test_tokens_of_other_integer_dtypes_or_other_containers_are_refused_in_one_line(tiny_config):
    params = init_params(tiny_config, seed=0)
    tokens = torch.tensor([[1, 2, 3]])
    # int32 is an index dtype too: the same logits as int64; token lists are padded batches.
    assert torch.equal(
        forward(params, tokens.int(), tiny_config), forward(params, tokens, tiny_config)
    )
    assert torch.equal(
        forward(params, [[1, 2, 3]], tiny_config), forward(params, tokens, tiny_config)
    )
    with pytest.raises(TypeCheckError):
        forward(params, tokens.numpy(), tiny_config)
    with shape_checks(False):  # the shape checker refuses uint8 and arrays itself
        for dtype in (torch.uint8, torch.int16):
            with pytest.raises(
                TypeError, match=f"tokens must be an int64 or int32 tensor, got dtype {dtype}"
            ):
                forward(params, tokens.to(dtype), tiny_config)
            with pytest.raises(
                TypeError, match=f"targets must be an int64 or int32 tensor, got dtype {dtype}"
            ):
                loss(params, tokens, tokens.to(dtype), tiny_config)
        with pytest.raises(TypeError, match="tokens must be a \\(batch, seq\\) tensor or a list"):
            forward(params, tokens.numpy(), tiny_config)
        with pytest.raises(
            TypeError, match="tokens must be an integer tensor, got dtype torch.bool"
        ):
            forward(params, tokens.bool(), tiny_config)
        with pytest.raises(ValueError, match="targets must have as many tokens"):
            loss(params, tokens, [[1, 2]], tiny_config)


def test_out_of_range_targets_are_named_as_targets(tiny_config):
    params = init_params(tiny_config, seed=0)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets: token id 101 is outside \[0, vocab_size=101\)"):
        loss(params, tokens, tokens + 101, tiny_config)


def test_init_params_refuses_a_bad_seed_naming_the_range(tiny_config):
    with (
        shape_checks(False),
        pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"),
    ):
        init_params(tiny_config, seed=1.5)
    init_params(tiny_config, seed=2**64 - 1)  # torch.Generator's largest seed
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\), got 2361"):
        init_params(tiny_config, seed=2**71)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_forward_from_the_cached_residual_stream_equals_forward(tiny_config, generator, layer):
    params = init_params(tiny_config, seed=0)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=generator)
    resid = "h.1.resid_post" if layer == tiny_config.n_layer else f"h.{layer}.resid_pre"
    logits, cache = gpt_fn.run_with_cache(params, tokens, tiny_config, names=[resid])
    got = gpt_fn.forward_from(params, cache[resid], tiny_config, layer=layer)
    # The same kernels on the same inputs from `layer` on: bit for bit.
    assert torch.equal(got, logits)


def test_forward_from_takes_hooks_after_its_layer_and_a_padding_mask(tiny_config, generator):
    params = init_params(tiny_config, seed=0)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    hooks = {"h.1.attn.z": lambda z: 0.5 * z, "ln_f.scale": lambda s: 2 * s, "logits": abs}
    logits, cache = gpt_fn.run_with_cache(
        params, tokens, tiny_config, names=["h.1.resid_pre"], attention_mask=mask, hooks=hooks
    )
    got = gpt_fn.forward_from(
        params, cache["h.1.resid_pre"], tiny_config, layer=1, hooks=hooks, attention_mask=mask
    )
    torch.testing.assert_close(got, logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="hook at 'h.0.attn.z': forward_from\\(layer=1\\) starts"):
        gpt_fn.forward_from(
            params, cache["h.1.resid_pre"], tiny_config, layer=1, hooks={"h.0.attn.z": abs}
        )
    with pytest.raises(ValueError, match="layer must be in \\[0, n_layer=2\\], got 3"):
        gpt_fn.forward_from(params, cache["h.1.resid_pre"], tiny_config, layer=3)
    with pytest.raises(ValueError, match="resid_pre has shape \\(2, 9, 8\\); expected"):
        gpt_fn.forward_from(params, torch.zeros(2, 9, 8), tiny_config, layer=1)


def test_the_params_are_checked_once_per_call_not_per_layer_or_decode_step(
    tiny_config, monkeypatch
):
    params = init_params(tiny_config, seed=0)
    calls = []
    real = model.check_shapes

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "check_shapes", counting)
    forward(params, torch.zeros(1, 5, dtype=torch.long), tiny_config)
    assert len(calls) == 1
    counts = []
    for new_tokens in (1, 6):
        calls.clear()
        sampling.generate(
            params, torch.tensor([[1, 2]]), tiny_config, max_new_tokens=new_tokens, greedy=True
        )
        counts.append(len(calls))
    assert counts[0] == counts[1] >= 1  # the same for 1 and 6 new tokens: none per step
