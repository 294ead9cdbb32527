"""Samplers: greedy ties, categorical matches softmax (χ²), zero-probability tokens, bad rows."""

import pytest
import torch
from scipy import stats

from gpt_fn.sampling import categorical, check_logits, greedy, top_k

NEG_INF = float("-inf")


def _generators(seed, n):
    return [torch.Generator().manual_seed(seed + row) for row in range(n)]


def test_greedy_picks_the_lowest_id_among_equal_maxima():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [NEG_INF, 2.0, NEG_INF, 2.0], [5.0] * 4])
    assert greedy(logits).tolist() == [1, 1, 0]


def test_categorical_draws_match_softmax_by_a_chi_squared_test():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 60_000
    tokens = categorical(logits.expand(draws, -1), torch.Generator().manual_seed(0))
    observed = torch.bincount(tokens, minlength=6).double()
    expected = logits.double().softmax(dim=-1) * draws
    # Fixed seed, so the test cannot flake; 1e-3 still rejects a sampler off by ~1% anywhere.
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # and the test has power: the same counts reject slightly different probabilities
    skewed = (logits * 1.05).double().softmax(dim=-1) * draws
    assert stats.chisquare(observed.numpy(), skewed.numpy()).pvalue < 1e-6


def test_categorical_never_draws_a_token_whose_probability_is_zero():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 50, generator=generator) * 3
    filtered = top_k(3)(logits, torch.zeros(2000, 0, dtype=torch.long))
    # -200 underflows to probability 0 in fp32 next to a logit of 0: also never drawn.
    underflow = torch.tensor([[0.0, -200.0, -200.0]]).expand(2000, -1)
    for rows in (filtered, underflow):
        tokens = categorical(rows, generator)
        assert torch.isfinite(rows.gather(-1, tokens[:, None])).all()
    assert (categorical(underflow, generator) == 0).all()


def test_categorical_is_reproducible_for_a_seed():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))

    def draw(seed):
        return categorical(logits, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(
        categorical(logits, _generators(5, 8)), categorical(logits, _generators(5, 8))
    )


def test_categorical_row_draws_depend_only_on_the_rows_generator_and_logits():
    base = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    other = base.clone()
    other[1:] = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    for seed in range(0, 2000, 100):
        first = categorical(base, _generators(seed, 4))[0]
        assert first == categorical(other, _generators(seed, 4))[0]
        assert first == categorical(base[:1], _generators(seed, 1))[0]


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (torch.tensor([[0.0, 1.0], [NEG_INF, NEG_INF]]), "every logit of row 1 is -inf"),
        (torch.tensor([[0.0, float("nan")]]), "row 0 contains NaN"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 1.0]]), r"row 1 contains NaN or \+inf"),
    ],
)
def test_samplers_raise_on_rows_they_cannot_draw_from(logits, message):
    with pytest.raises(ValueError, match=message):
        greedy(logits)
    with pytest.raises(ValueError, match=message):
        categorical(logits, torch.Generator().manual_seed(0))


def test_categorical_needs_one_generator_per_row_when_given_several():
    with pytest.raises(ValueError, match="3 generators for 2 rows"):
        categorical(torch.zeros(2, 5), _generators(0, 3))


def test_check_logits_blames_the_model_for_a_nan_row_a_filter_would_hide():
    model_logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 1.0, 2.0]])
    filtered = top_k(2)(model_logits, torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(filtered).any(dim=-1).all()  # the NaN is gone behind -inf
    check_logits(filtered)  # on its own the filtered row looks fine
    with pytest.raises(ValueError, match="the model's logits for row 1 contain NaN or"):
        check_logits(filtered, model_logits=model_logits)
    with pytest.raises(ValueError, match="the model's logits for row 1 contain NaN or"):
        check_logits(model_logits, model_logits=model_logits)  # no transform at all
    # A sound model and a transform that broke the row: the transforms' output is named.
    broken = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("inf"), 2.0]])
    with pytest.raises(ValueError, match=r"logits row 1 contains NaN or \+inf"):
        check_logits(broken, model_logits=torch.zeros(2, 3))
    check_logits(torch.zeros(2, 3), model_logits=torch.zeros(2, 3))
