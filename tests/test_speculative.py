"""Speculative decoding: greedy tokens are exactly the target's greedy tokens (random models,
ragged batches, eos, stop strings, past block_size), samples follow the target's distribution
(chi-square against the exact distribution, with a check that the test tells a wrong rule
apart), and a draft of another vocabulary or bad arguments are named."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import gpt_fn
from gpt_fn.nn.padding import pad
from gpt_fn.sampling import (
    chain,
    generate,
    make_transform,
    speculative_generate,
    temperature,
    top_k,
)
from gpt_fn.sampling import speculative as speculative_module
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = gpt_fn.GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)


def _spread(params):
    # As in test_decoding: wider logit gaps than a random init, so greedy paths are far from
    # ties (a chunk of k+1 tokens and one token at a time round differently, by ~1e-6).
    return {
        **params,
        "wte.weight": params["wte.weight"] * 10,
        "wpe.weight": params["wpe.weight"] * 100,
    }


TARGET_PARAMS = _spread(gpt_fn.init_params(TARGET, seed=0))


def _draft(kind: str, seed: int, n_layer: int, n_head: int, d_head: int, block_size: int):
    """A draft of the target's vocabulary: the target itself (every proposal accepted), the
    target with noise (some accepted), or another random model (few accepted)."""
    if kind == "same":
        return TARGET_PARAMS, TARGET
    if kind == "noisy":
        generator = torch.Generator().manual_seed(seed)
        noisy = {
            name: value + 0.3 * value.std() * torch.randn(value.shape, generator=generator)
            for name, value in TARGET_PARAMS.items()
        }
        return noisy, TARGET
    config = gpt_fn.GPTConfig(
        vocab_size=TARGET.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
        n_embd=n_head * d_head,
    )  # fmt: skip
    return _spread(gpt_fn.init_params(config, seed=seed)), config


prompts = st.lists(
    st.lists(st.integers(0, TARGET.vocab_size - 1), min_size=1, max_size=8), min_size=1, max_size=3
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=prompts,
    kind=st.sampled_from(["same", "noisy", "other"]),
    seed=st.integers(0, 1000),
    n_layer=st.integers(1, 3),
    n_head=st.integers(1, 3),
    d_head=st.integers(2, 8),
    block_size=st.sampled_from([8, 16, 32]),
    k=st.integers(1, 5),
    new=st.integers(1, 24),  # past the target's 16 positions too
    eos=st.booleans(),
)
def test_greedy_speculative_tokens_are_exactly_the_targets_greedy_tokens(
    rows, kind, seed, n_layer, n_head, d_head, block_size, k, new, eos
):
    draft_params, draft_config = _draft(kind, seed, n_layer, n_head, d_head, block_size)
    eos_id = None
    if eos:  # a token the target makes in row 0, so rows stop at different steps
        free = generate(TARGET_PARAMS, rows, TARGET, max_new_tokens=new, greedy=True)[0]
        eos_id = free[len(rows[0]) + (new - 1) // 2]
    expected = generate(
        TARGET_PARAMS, rows, TARGET, max_new_tokens=new, greedy=True, eos_token_id=eos_id
    )
    out = speculative_generate(
        TARGET_PARAMS, rows, TARGET, draft_params=draft_params, draft_config=draft_config,
        max_new_tokens=new, num_draft_tokens=k, greedy=True, eos_token_id=eos_id,
    )  # fmt: skip
    assert out.tokens == expected
    assert out.stats.new_tokens == sum(len(o) - len(r) for o, r in zip(expected, rows, strict=True))
    assert 0 <= out.stats.accepted <= out.stats.proposed
    if kind == "same" and out.stats.proposed:
        assert out.stats.acceptance_rate == 1.0


def test_a_draft_that_is_the_target_makes_k_plus_one_tokens_per_target_forward():
    rows = [[1, 2, 3], [4]]
    out = speculative_generate(
        TARGET_PARAMS, rows, TARGET, draft_params=TARGET_PARAMS, draft_config=TARGET,
        max_new_tokens=10, num_draft_tokens=4, greedy=True,
    )  # fmt: skip
    assert out.stats.acceptance_rate == 1.0
    # Rounds of 5, 5: two target forwards for ten tokens per row (plain decoding: ten).
    assert out.stats.rounds == 2 and out.stats.row_rounds == 4 and out.stats.new_tokens == 20


def test_a_padded_tensor_with_its_mask_gives_what_token_lists_give():
    rows = [[5, 6, 7, 8], [9], [3, 4]]
    tokens, mask = pad(rows, side="left")
    draft_params, draft_config = _draft("noisy", 0, 0, 0, 0, 0)
    options = dict(draft_params=draft_params, draft_config=draft_config, max_new_tokens=6)
    as_tensor = speculative_generate(
        TARGET_PARAMS, tokens, TARGET, attention_mask=mask, greedy=True, **options
    ).tokens
    assert torch.equal(
        as_tensor,
        generate(TARGET_PARAMS, tokens, TARGET, attention_mask=mask, max_new_tokens=6, greedy=True),
    )
    as_lists = speculative_generate(TARGET_PARAMS, rows, TARGET, greedy=True, **options).tokens
    assert [row[-6:] for row in as_lists] == as_tensor[:, 4:].tolist()


class LetterTokenizer:
    """Token i decodes to one letter (as in test_ragged)."""

    n_vocab = 101  # the model's every id has a letter

    def decode_single_token_bytes(self, token: int) -> bytes:
        return bytes([ord("a") + token % 26])


def test_stop_strings_stop_rows_where_generate_stops_them():
    rows = [[1, 2], [3]]
    free = generate(TARGET_PARAMS, rows, TARGET, max_new_tokens=10, greedy=True)
    text = "".join(chr(ord("a") + t % 26) for t in free[0][2:])
    stop = [text[3:5]]  # spans a token boundary, inside a round of accepted tokens
    options = dict(max_new_tokens=10, greedy=True, stop=stop, tokenizer=LetterTokenizer())
    expected = generate(TARGET_PARAMS, rows, TARGET, **options)
    assert len(expected[0]) < len(free[0])
    out = speculative_generate(
        TARGET_PARAMS, rows, TARGET, draft_params=TARGET_PARAMS, draft_config=TARGET, **options
    )
    assert out.tokens == expected


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds():
    draft_params, draft_config = _draft("noisy", 1, 0, 0, 0, 0)
    transform = make_transform(temperature=1.5, top_k=40)

    def sample(seed):
        return speculative_generate(
            TARGET_PARAMS, [[1, 2, 3], [7]], TARGET, draft_params=draft_params,
            draft_config=draft_config, max_new_tokens=12, transform=transform, seed=seed,
        ).tokens  # fmt: skip

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


# ---------------------------------------------------------------- the target's distribution

VOCAB, PROMPT, NEW, SAMPLES = 5, [0, 1], 3, 4000
SMALL_TARGET = gpt_fn.GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=2, n_head=2, n_embd=16)
SMALL_DRAFT = gpt_fn.GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=1, n_embd=8)


def _scaled(config, seed):
    # Embeddings x3: distributions neither flat nor peaked (top sequence ~6%), and a draft
    # whose 3-token distribution is ~0.2-0.5 in total variation from the target's.
    params = gpt_fn.init_params(config, seed=seed)
    return {**params, "wte.weight": params["wte.weight"] * 3}


def _exact_distribution(params, config, transform):
    """P(the NEW tokens after PROMPT) for every sequence, by enumeration, under `transform`."""
    sequences = torch.tensor(
        [PROMPT + list(c) for c in itertools.product(range(VOCAB), repeat=NEW)]
    )
    logits = gpt_fn.forward(params, sequences, config)
    log_p = torch.zeros(len(sequences))
    for i in range(NEW):
        position = len(PROMPT) - 1 + i
        step = logits[:, position]
        if transform is not None:
            step = transform(step, sequences[:, : position + 1])
        log_p += step.float().log_softmax(-1).gather(1, sequences[:, position + 1, None])[:, 0]
    return log_p.exp().double()


def _chi_square_p_value(samples, probabilities):
    """Pearson's test of the samples' sequence counts against `probabilities`; cells expected
    fewer than 5 times are pooled (the test's usual validity rule)."""
    index = torch.tensor(
        [sum(t * VOCAB ** (NEW - 1 - j) for j, t in enumerate(s[-NEW:])) for s in samples]
    )
    observed = torch.bincount(index, minlength=VOCAB**NEW).double()
    expected = probabilities * len(samples)
    big = expected >= 5
    observed = torch.cat([observed[big], observed[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    if expected[-1] < 1e-9:  # nothing to pool (e.g. top_k left those sequences no mass)
        observed, expected = observed[:-1], expected[:-1]
    expected = expected * observed.sum() / expected.sum()
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


def _wrong_correction(self, p, proposals, q_probs):
    """The rule with a plausible bug: on rejection, draw from p instead of norm(max(0, p - q))."""
    accepted, _ = _RIGHT_RULE(self, p, proposals, q_probs)
    index = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    return accepted, speculative_module.samplers.categorical_unchecked(
        p.gather(1, index)[:, 0].log(), self.gens
    )


_RIGHT_RULE = speculative_module._Speculation._accept


@pytest.mark.parametrize("transform", [None, chain(temperature(0.7), top_k(3))], ids=repr)
def test_speculative_samples_follow_the_targets_distribution(transform, monkeypatch):
    target, draft = _scaled(SMALL_TARGET, 0), _scaled(SMALL_DRAFT, 1)
    p = _exact_distribution(target, SMALL_TARGET, transform)
    q = _exact_distribution(draft, SMALL_DRAFT, transform)
    assert 0.5 * float((p - q).abs().sum()) > 0.2  # the draft's distribution is another one

    def samples():
        # One batch of SAMPLES copies of the prompt: each row its own generator (seeded).
        return speculative_generate(
            target, [PROMPT] * SAMPLES, SMALL_TARGET, draft_params=draft,
            draft_config=SMALL_DRAFT, max_new_tokens=NEW, num_draft_tokens=2,
            transform=transform, seed=1,
        )  # fmt: skip

    out = samples()
    assert 0.5 < out.stats.acceptance_rate < 0.95  # both accepting and rejecting happen
    # Fixed seed: the p-value is a fixed number. 1e-3 leaves room; at 4000 samples a wrong
    # rule scores below 1e-20 (next lines), the draft's own distribution below 1e-100.
    assert _chi_square_p_value(out.tokens, p) > 1e-3
    assert _chi_square_p_value(out.tokens, q) < 1e-6
    monkeypatch.setattr(speculative_module._Speculation, "_accept", _wrong_correction)
    assert _chi_square_p_value(samples().tokens, p) < 1e-6


# ---------------------------------------------------------------- errors


def test_a_draft_of_another_vocabulary_is_named():
    other = gpt_fn.GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="the draft model's vocab_size is 50, the target's 101"):
        speculative_generate(
            TARGET_PARAMS, [[1]], TARGET, draft_params=gpt_fn.init_params(other, seed=0),
            draft_config=other, max_new_tokens=2, greedy=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(num_draft_tokens=0), ValueError, "num_draft_tokens must be a positive int"),
        (dict(greedy=False), ValueError, "seed must be an int"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(draft_params={}), KeyError, "draft_params: .*missing"),
        (dict(prompt=[[1], []]), ValueError, "row 1 has no tokens"),
        (
            dict(prompt=torch.zeros(1, 17, dtype=torch.long)),
            ValueError,
            "longer than block_size=16",
        ),
        (
            dict(prompt=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 2)),
            ValueError,
            "attention_mask has shape \\(2, 2\\)",
        ),
        (
            dict(
                prompt=torch.ones(2, 3, dtype=torch.long),
                attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]),
            ),
            ValueError,
            "attention_mask row 1 has no real token",
        ),
    ],
)
def test_bad_arguments_are_named_before_anything_runs(change, error, message):
    arguments = dict(
        prompt=[[1, 2]], draft_params=TARGET_PARAMS, draft_config=TARGET, max_new_tokens=4,
        greedy=True,
    ) | change  # fmt: skip
    with shape_checks(False), pytest.raises(error, match=message):
        speculative_generate(TARGET_PARAMS, arguments.pop("prompt"), TARGET, **arguments)
