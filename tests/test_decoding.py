"""Decoding: KV cache equals recomputation, cropping past block_size, batching, seeds, eos,
streaming, argument errors, and greedy tokens equal to HF `generate` on converted GPT-2 weights."""

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gpt_fn
from gpt_fn import GPTConfig, hf
from gpt_fn.sampling import (
    decode_step,
    generate,
    generate_stream,
    make_transform,
    prefill,
    temperature,
    top_k,
)
from gpt_fn.shapes import shape_checks

# Cached and uncached decoding compute the same sums in different groupings (one key block vs
# a cache concatenated with a new key); in fp32 that differs by a few ulps of logits ~1-10.
CACHE_ATOL = 1e-5


# A 2-layer, 24-wide model: a second thread costs more than it saves (much more on a busy
# 2-core machine), so this file runs single-threaded.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def params(tiny_config):
    params = gpt_fn.init_params(tiny_config, seed=0)
    # A random GPT-2 with tied embeddings mostly repeats its last token, by tiny logit gaps.
    # Larger embeddings, positions above all, make the greedy path vary with position and
    # widen the argmax gaps far beyond the 1e-5 cache tolerance.
    return {
        **params,
        "wte.weight": params["wte.weight"] * 10,
        "wpe.weight": params["wpe.weight"] * 100,
    }


def _prompt(config, batch=3, seq=5, seed=1):
    return torch.randint(
        0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )


def _reference_logits(params, tokens, config):
    """Next-token logits by the definition: a full forward over the last block_size tokens."""
    return gpt_fn.forward(params, tokens[:, -config.block_size :], config)[:, -1]


# ---------------------------------------------------------------- cache == recomputation


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_cached_and_uncached_decoding_give_the_same_logits_also_past_block_size(
    params, tiny_config, attention
):
    prompt = _prompt(tiny_config)
    cached = prefill(params, prompt, tiny_config, attention=attention)
    uncached = prefill(params, prompt, tiny_config, use_cache=False)
    assert uncached.cache is None
    steps = 2 * tiny_config.block_size  # well past the 16 positions the model has
    for _ in range(steps):
        torch.testing.assert_close(cached.logits, uncached.logits, atol=CACHE_ATOL, rtol=0)
        reference = _reference_logits(params, cached.tokens, tiny_config)
        torch.testing.assert_close(cached.logits, reference, atol=CACHE_ATOL, rtol=0)
        token = cached.logits.argmax(dim=-1)
        cached = decode_step(params, cached, token, tiny_config, attention=attention)
        uncached = decode_step(params, uncached, token, tiny_config)
        # The cache holds each row's window: the whole context, then its last block_size.
        filled = int(cached.cache.lengths.max())
        assert filled == min(cached.tokens.shape[1], tiny_config.block_size)
        assert uncached.cache is None
    assert cached.tokens.shape == (3, 5 + steps)


def test_cached_and_uncached_generate_give_the_same_greedy_tokens(params, tiny_config):
    prompt = _prompt(tiny_config)
    with_cache = generate(params, prompt, tiny_config, max_new_tokens=40, greedy=True)
    without = generate(params, prompt, tiny_config, max_new_tokens=40, greedy=True, use_cache=False)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, 5:].flatten().tolist())) > 6  # not a degenerate repeat


def test_generation_past_block_size_crops_the_context_to_its_last_block_size_tokens(
    params, tiny_config
):
    prompt = _prompt(tiny_config, batch=2, seq=tiny_config.block_size)  # a full block already
    tokens = prompt
    for _ in range(10):  # nanoGPT's loop: forward on idx[:, -block_size:], take the argmax
        tokens = torch.cat(
            [tokens, _reference_logits(params, tokens, tiny_config).argmax(-1, keepdim=True)], 1
        )
    assert torch.equal(
        generate(params, prompt, tiny_config, max_new_tokens=10, greedy=True), tokens
    )


def test_decode_step_leaves_its_state_unchanged_so_a_state_can_be_replayed(params, tiny_config):
    state = prefill(params, _prompt(tiny_config), tiny_config)
    snapshot = [state.tokens.clone(), state.logits.clone(), state.cache.clone()]
    token = torch.tensor([1, 2, 3])
    first = decode_step(params, state, token, tiny_config)
    again = decode_step(params, state, token, tiny_config)
    assert torch.equal(state.tokens, snapshot[0]) and torch.equal(state.logits, snapshot[1])
    for before, after in zip(snapshot[2], state.cache, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(first.logits, again.logits)
    assert torch.equal(first.tokens[:, -1], token)


# ---------------------------------------------------------------- batching and randomness


def test_each_row_of_a_batch_generates_what_its_prompt_generates_alone(params, tiny_config):
    prompt = _prompt(tiny_config, batch=4)
    batched = generate(params, prompt, tiny_config, max_new_tokens=12, greedy=True)
    for row in range(4):
        alone = generate(params, prompt[row : row + 1], tiny_config, max_new_tokens=12, greedy=True)
        assert torch.equal(batched[row : row + 1], alone)


def test_a_rows_samples_depend_only_on_the_seed_its_position_and_its_prompt(params, tiny_config):
    transform = make_transform(temperature=1.5, top_k=40)  # flat enough that samples vary
    prompt = _prompt(tiny_config, batch=3)
    other = prompt.clone()
    other[[0, 2]] = _prompt(tiny_config, batch=2, seed=9)
    a = generate(params, prompt, tiny_config, max_new_tokens=20, transform=transform, seed=7)
    b = generate(params, other, tiny_config, max_new_tokens=20, transform=transform, seed=7)
    assert torch.equal(a[1], b[1])  # same prompt in row 1, different neighbours
    first = generate(
        params, prompt[:1], tiny_config, max_new_tokens=20, transform=transform, seed=7
    )
    assert torch.equal(a[:1], first)  # row 0 does not depend on the batch size either


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(params, tiny_config):
    prompt = _prompt(tiny_config)

    def sample(seed):
        return generate(
            params, prompt, tiny_config, max_new_tokens=20, transform=temperature(1.5), seed=seed
        )

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_sampling_at_temperature_zero_is_greedy(params, tiny_config):
    prompt = _prompt(tiny_config)
    greedy = generate(params, prompt, tiny_config, max_new_tokens=20, greedy=True)
    cold = generate(
        params, prompt, tiny_config, max_new_tokens=20, transform=temperature(0), seed=3
    )
    assert torch.equal(cold, greedy)


def test_transforms_see_the_whole_sequence_not_the_models_cropped_window(params, tiny_config):
    seen_lengths = []

    def spy(logits, context):
        seen_lengths.append(context.shape[1])
        return logits

    generate(
        params,
        _prompt(tiny_config, seq=10),
        tiny_config,
        max_new_tokens=12,
        transform=spy,
        greedy=True,
    )
    assert seen_lengths == list(range(10, 22))


# ---------------------------------------------------------------- eos and streaming


def test_rows_that_produce_eos_are_padded_with_it_and_the_others_go_on(params, tiny_config):
    prompt = _prompt(tiny_config)
    free = generate(params, prompt, tiny_config, max_new_tokens=12, greedy=True)
    eos = int(free[0, 5 + 3])  # row 0's fourth new token
    stopped = generate(
        params, prompt, tiny_config, max_new_tokens=12, greedy=True, eos_token_id=eos
    )
    for row in range(3):
        new = free[row, 5:].tolist()
        end = new.index(eos) + 1 if eos in new else len(new)
        assert stopped[row, 5 : 5 + end].tolist() == new[:end]
        assert (stopped[row, 5 + end :] == eos).all()


def test_generation_ends_when_every_row_has_produced_eos(params, tiny_config):
    prompt = _prompt(tiny_config, batch=1)
    first_token = int(generate(params, prompt, tiny_config, max_new_tokens=1, greedy=True)[0, -1])
    out = generate(
        params, prompt, tiny_config, max_new_tokens=30, greedy=True, eos_token_id=first_token
    )
    assert out.shape == (1, 6)


def test_generate_stream_yields_the_tokens_generate_returns_one_step_at_a_time(params, tiny_config):
    prompt = _prompt(tiny_config)
    kwargs = dict(max_new_tokens=20, transform=top_k(5), seed=11)
    steps = list(generate_stream(params, prompt, tiny_config, **kwargs))
    assert all(step.shape == (3,) for step in steps) and len(steps) == 20
    assert torch.equal(
        torch.cat([prompt, torch.stack(steps, 1)], 1),
        generate(params, prompt, tiny_config, **kwargs),
    )


def test_generate_stream_does_not_switch_off_autograd_in_the_callers_loop(params, tiny_config):
    params = {k: v.requires_grad_() for k, v in params.items()}
    for token in generate_stream(
        params, _prompt(tiny_config), tiny_config, max_new_tokens=3, greedy=True
    ):
        assert torch.is_grad_enabled()
        assert not token.requires_grad


def test_zero_new_tokens_returns_the_prompt(params, tiny_config):
    prompt = _prompt(tiny_config)
    assert torch.equal(generate(params, prompt, tiny_config, max_new_tokens=0, greedy=True), prompt)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            dict(prompt=torch.zeros(1, 17, dtype=torch.long)),
            ValueError,
            "longer than block_size=16",
        ),
        (
            dict(prompt=torch.full((1, 3), 101)),
            ValueError,
            r"token id 101 is outside \[0, vocab_size=101\)",
        ),
        (dict(prompt=torch.tensor([[3, -1]])), ValueError, "token id -1"),
        (dict(prompt=torch.zeros(2, 0, dtype=torch.long)), ValueError, "at least one token"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(greedy=False), ValueError, "seed must be an int"),
        (dict(eos_token_id=101), ValueError, "eos_token_id"),
        (dict(params={}), KeyError, "missing"),
    ],
)
def test_bad_arguments_raise_clear_errors_before_any_token_is_made(
    params, tiny_config, change, error, message
):
    arguments = (
        dict(params=params, prompt=_prompt(tiny_config), max_new_tokens=4, greedy=True) | change
    )
    params_, prompt = arguments.pop("params"), arguments.pop("prompt")
    with pytest.raises(error, match=message):
        generate_stream(params_, prompt, tiny_config, **arguments)  # raises before iterating
    with pytest.raises(error, match=message):
        generate(params_, prompt, tiny_config, **arguments)


def test_a_decode_step_with_the_wrong_batch_is_an_error(params, tiny_config):
    state = prefill(params, _prompt(tiny_config, batch=3), tiny_config)
    with pytest.raises(ValueError, match="next_tokens has 2 rows, the state 3"):
        decode_step(params, state, torch.tensor([1, 2]), tiny_config)


# ---------------------------------------------------------------- equality with HF generate


def _random_hf_gpt2(config: GPTConfig, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)  # HF initialises from the global generator
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        initializer_range=0.3,  # spread logits, as the `params` fixture does
    )
    return GPT2LMHeadModel(hf_config).eval()


@pytest.mark.parametrize("eos", [None, "from-free-run"])
def test_greedy_tokens_equal_hf_generate_on_converted_gpt2_weights(tiny_config, eos):
    model = _random_hf_gpt2(tiny_config, seed=0)
    params = hf.from_hf_state_dict(model.state_dict(), hf.config_from_hf(model.config))
    prompt = _prompt(tiny_config, batch=3, seq=4)
    new = tiny_config.block_size - 4  # HF GPT-2 cannot go past its positions; we crop instead
    eos_id = None
    if eos is not None:
        eos_id = int(
            generate(params, prompt, tiny_config, max_new_tokens=new, greedy=True)[1, 4 + 5]
        )
    ours = generate(
        params, prompt, tiny_config, max_new_tokens=new, greedy=True, eos_token_id=eos_id
    )
    with torch.no_grad():
        theirs = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=eos_id,
            pad_token_id=0 if eos_id is None else eos_id,  # HF pads finished rows with this
        )
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 4:].flatten().tolist())) > 6  # a real path, not one repeated token


# ---------------------------------------------------------------- bad values inside the loop


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "options",
    [
        dict(greedy=True),
        dict(transform=top_k(3), seed=0),
        dict(transform=make_transform(min_p=0.1), seed=0),
    ],
)
def test_nan_or_inf_in_the_models_logits_is_the_models_error_before_the_transforms(
    params, tiny_config, bad, options
):
    # A bad row of the tied embedding makes that token's logit bad in every row; top_k and
    # min_p would then quietly filter it out (NaN >= x is False) and sample on.
    broken = {**params, "wte.weight": params["wte.weight"].clone()}
    broken["wte.weight"][7] = bad
    prompt = _prompt(tiny_config) % 7  # the broken token is only in the head, not the input
    with pytest.raises(ValueError, match="the model's logits for row 0 contain NaN or"):
        generate(broken, prompt, tiny_config, max_new_tokens=3, **options)


def test_a_transform_that_makes_nan_is_named_as_the_transforms_output(params, tiny_config):
    def nan_maker(logits, context):
        return logits * float("nan")

    with pytest.raises(ValueError, match="logits row 0 contains NaN or"):
        generate(
            params, _prompt(tiny_config), tiny_config, max_new_tokens=2, transform=nan_maker, seed=0
        )


def test_prefill_and_decode_step_check_their_tokens_like_forward(params, tiny_config):
    with pytest.raises(ValueError, match=r"token id 101 is outside \[0, vocab_size=101\)"):
        prefill(params, torch.full((1, 3), 101), tiny_config)
    state = prefill(params, _prompt(tiny_config), tiny_config)
    with pytest.raises(ValueError, match=r"next_tokens: token id 101 is outside"):
        decode_step(params, state, torch.tensor([1, 101, 2]), tiny_config)
    with pytest.raises(ValueError, match="next_tokens: token id -1 is outside"):
        decode_step(params, state, torch.tensor([1, -1, 2]), tiny_config)
    with shape_checks(False):
        with pytest.raises(TypeError, match="next_tokens must be an int64 or int32 tensor"):
            decode_step(params, state, torch.tensor([1, 2, 3], dtype=torch.int16), tiny_config)
        with pytest.raises(ValueError, match=r"next_tokens must have shape \(batch,\)"):
            decode_step(params, state, torch.tensor([[1], [2], [3]]), tiny_config)
        with pytest.raises(TypeError, match="prompt must be a \\(batch, seq\\) tensor or a list"):
            prefill(params, torch.tensor([[1, 2]]).numpy(), tiny_config)
    with pytest.raises(KeyError, match="missing"):
        decode_step({}, state, torch.tensor([1, 2, 3]), tiny_config)


def test_prefill_of_a_prompt_longer_than_block_size_keeps_its_last_block_size_tokens(
    params, tiny_config
):
    prompt = _prompt(tiny_config, seq=tiny_config.block_size + 5)
    state = prefill(params, prompt, tiny_config)
    assert torch.equal(state.tokens, prompt)
    window = prefill(params, prompt[:, -tiny_config.block_size :], tiny_config)
    torch.testing.assert_close(state.logits, window.logits, rtol=0, atol=0)


def test_a_transform_that_is_not_callable_is_refused_before_any_token(params, tiny_config):
    with shape_checks(False), pytest.raises(ValueError, match="transform must be a function"):
        generate_stream(
            params, _prompt(tiny_config), tiny_config, max_new_tokens=2, transform=0.8, seed=0
        )


@pytest.mark.parametrize(
    ("change", "message", "use_cache"),
    [
        (dict(n_layer=3), "its n_layer is 2, the config's 3", True),
        (dict(n_head=2), "its n_head is 3, the config's 2", True),
        (dict(n_embd=48), "its head size \\(n_embd // n_head\\) is 8, the config's 16", True),
        (dict(vocab_size=120), "its vocab_size is 101, the config's 120", True),
        (dict(vocab_size=120), "its vocab_size is 101, the config's 120", False),
    ],
)
def test_decode_step_names_a_config_other_than_the_states(tiny_config, change, message, use_cache):
    params = gpt_fn.init_params(tiny_config, seed=0)
    state = prefill(params, [[1, 2, 3]], tiny_config, use_cache=use_cache)
    other = dataclasses.replace(tiny_config, **change)
    with (
        shape_checks(False),
        pytest.raises(ValueError, match="made with another config: " + message),
    ):
        decode_step(gpt_fn.init_params(other, seed=0), state, torch.tensor([4]), other)
