"""Logit transforms: hypothesis properties of every transform, HF equality, argument checks."""

import inspect
import math
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError
from transformers.generation import logits_process as hf

import gpt_fn
from gpt_fn.sampling import (
    ban_tokens,
    beam_search,
    chain,
    frequency_penalty,
    generate,
    logit_bias,
    make_transform,
    min_p,
    no_repeat_ngram,
    presence_penalty,
    repetition_penalty,
    speculative_generate,
    temperature,
    top_k,
    top_p,
    typical_p,
)
from gpt_fn.shapes import shape_checks

NEG_INF = float("-inf")
# Small tensors: a property test is about the rule, not the size; keeps the file fast.
PROPERTY = settings(max_examples=60, deadline=None)
MIN_VOCAB = 4  # logit_bias/ban ids below are drawn from [0, MIN_VOCAB)


@st.composite
def logits_and_context(draw, *, distinct=False, allow_neg_inf=True):
    """Random `(batch, vocab)` fp32 logits and a `(batch, seq)` context of ids.

    Hypothesis picks the shapes and the kind of row (scale, rounded to make ties, share of -inf
    standing for already-filtered tokens); torch draws the values from a hypothesis-chosen seed,
    which is much cheaper than drawing every float through hypothesis.
    """
    batch, vocab, seq = (
        draw(st.integers(1, 4)),
        draw(st.integers(MIN_VOCAB, 24)),
        draw(st.integers(0, 10)),
    )
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    logits = torch.randn(batch, vocab, generator=generator) * draw(
        st.sampled_from([0.1, 1.0, 10.0, 40.0])
    )
    if distinct:
        assume(all(len(set(row)) == vocab for row in logits.tolist()))
    else:
        if draw(st.booleans()):
            logits = logits.round()  # ties
        if allow_neg_inf:
            share = draw(st.sampled_from([0.0, 0.3, 0.9]))
            logits[torch.rand(batch, vocab, generator=generator) < share] = NEG_INF
            dead = torch.isinf(logits).all(dim=-1)
            logits[dead, 0] = 0.0  # a row with no finite logit is the samplers' error case
    context = torch.randint(0, vocab, (batch, seq), generator=generator)
    return logits, context


def recipe(constructor, *args, **kwargs):
    """A strategy of zero-argument builders of `constructor(...)`.

    Tests build the transform themselves: building inside a strategy would run beartype's
    container checks, which draw from `random`, inside hypothesis' data generation.
    """
    return st.builds(partial, st.just(constructor), *args, **kwargs)


def _chain_of(makes):
    return chain(*(make() for make in makes))


filters = st.one_of(
    recipe(temperature, st.just(0)),
    recipe(top_k, st.integers(1, 30), keep_ties=st.booleans()),
    recipe(top_p, st.floats(0.01, 1.0)),
    recipe(min_p, st.floats(0.0, 1.0)),
    recipe(typical_p, st.floats(0.01, 0.99)),
)
penalties = st.one_of(
    recipe(temperature, st.floats(0.05, 5.0)),
    recipe(repetition_penalty, st.floats(0.1, 5.0)),
    recipe(frequency_penalty, st.floats(-2.0, 2.0)),
    recipe(presence_penalty, st.floats(-2.0, 2.0)),
    recipe(logit_bias, st.dictionaries(st.integers(0, MIN_VOCAB - 1), st.floats(-10.0, 10.0))),
)
# These two may ban every token by design; the samplers then raise (tested in test_samplers).
bans = st.one_of(
    recipe(ban_tokens, st.lists(st.integers(0, MIN_VOCAB - 1))),
    recipe(no_repeat_ngram, st.integers(1, 4)),
)
chains = st.lists(st.one_of(filters, penalties), max_size=3).map(lambda ms: partial(_chain_of, ms))
any_transform = st.one_of(filters, penalties, bans, chains)


# Tensors here hold tens of numbers: handing them to a second thread costs more than the
# work (10x slower sorts on a busy 2-core machine), so this file runs single-threaded.
pytestmark = pytest.mark.usefixtures("one_thread")


def _kept(out):
    return out != NEG_INF


# ---------------------------------------------------------------- properties of every transform


@PROPERTY
@given(any_transform, logits_and_context())
def test_every_transform_keeps_shape_returns_fp32_and_leaves_input_unmodified(make, data):
    f, (logits, context) = make(), data
    before_logits, before_context = logits.clone(), context.clone()
    out = f(logits, context)
    assert out.shape == logits.shape and out.dtype == torch.float32
    assert torch.equal(logits, before_logits) and torch.equal(context, before_context)
    assert not out.isnan().any()


@PROPERTY
@given(any_transform, logits_and_context())
def test_every_transform_treats_rows_independently(make, data):
    f, (logits, context) = make(), data
    out = f(logits, context)
    for row in range(logits.shape[0]):
        alone = f(logits[row : row + 1], context[row : row + 1])
        torch.testing.assert_close(out[row : row + 1], alone, rtol=0, atol=0)


@PROPERTY
@given(st.one_of(filters, penalties), logits_and_context())
def test_filters_and_penalties_keep_at_least_one_finite_logit(make, data):
    f, (logits, context) = make(), data
    assert torch.isfinite(f(logits, context)).any(dim=-1).all()


@PROPERTY
@given(st.one_of(filters, bans), logits_and_context())
def test_filters_keep_kept_logits_bit_for_bit_and_set_the_rest_to_neg_inf(make, data):
    f, (logits, context) = make(), data
    out = f(logits, context)
    assert ((out == logits) | (out == NEG_INF)).all()


@PROPERTY
@given(
    recipe(top_k, st.integers(1, 30), keep_ties=st.booleans())
    | recipe(top_p, st.floats(0.01, 1.0))
    | recipe(min_p, st.floats(0.0, 1.0))
    | recipe(temperature, st.just(0)),
    logits_and_context(),
)
def test_top_k_top_p_min_p_and_greedy_temperature_keep_the_argmax(make, data):
    f, (logits, context) = make(), data
    argmax = logits.argmax(dim=-1, keepdim=True)  # lowest id among ties, as `greedy` picks
    out = f(logits, context)
    assert torch.equal(out.gather(-1, argmax), logits.gather(-1, argmax))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_upcast_and_kept_logits_are_the_upcast_values(dtype):
    logits = (torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    context = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    for f in (top_k(5), top_p(0.8), min_p(0.1), typical_p(0.9), ban_tokens([1, 2]), chain()):
        out = f(logits, context)
        assert out.dtype == torch.float32
        kept = _kept(out)
        assert torch.equal(out[kept], logits.float()[kept])
    assert torch.equal(temperature(2.0)(logits, context), logits.float() / 2.0)


# ---------------------------------------------------------------- transform-specific properties


@PROPERTY
@given(st.integers(1, 30), logits_and_context(distinct=True))
def test_top_k_keeps_exactly_k_without_ties(k, data):
    logits, context = data
    for keep_ties in (True, False):
        out = top_k(k, keep_ties=keep_ties)(logits, context)
        kept = _kept(out)
        assert (kept.sum(dim=-1) == min(k, logits.shape[-1])).all()
        # ... and they are the k largest: every kept logit beats every dropped one.
        smallest_kept = torch.where(kept, logits, math.inf).amin(dim=-1)
        largest_dropped = torch.where(kept, NEG_INF, logits).amax(dim=-1)
        assert (smallest_kept > largest_dropped).all()


@PROPERTY
@given(st.integers(1, 30), logits_and_context())
def test_top_k_keeps_boundary_ties_only_when_asked(k, data):
    logits, context = data
    kept_count = min(k, logits.shape[-1])
    kth = torch.sort(logits, descending=True).values[:, kept_count - 1 : kept_count]
    with_ties = _kept(top_k(k)(logits, context))
    assert torch.equal(with_ties, (logits >= kth) & (logits != NEG_INF))
    exact = _kept(top_k(k, keep_ties=False)(logits, context))
    assert not (exact & ~with_ties).any()
    # Exactly k survive; seen on finite logits, as a kept -inf cannot be told from a dropped one.
    finite = logits.clamp(min=-1e30)
    assert (_kept(top_k(k, keep_ties=False)(finite, context)).sum(dim=-1) == kept_count).all()


@PROPERTY
@given(st.floats(0.01, 1.0), logits_and_context())
def test_top_p_keeps_smallest_prefix_with_mass_at_least_p(p, data):
    logits, context = data
    kept = _kept(top_p(p)(logits, context))
    probs = logits.double().softmax(dim=-1)
    # fp32 softmax + cumsum in the transform vs float64 here: boundary decisions can differ by
    # rounding, so masses are compared with a margin of a few fp32 ulps of 1.
    margin = 1e-5
    for row in range(logits.shape[0]):
        order = torch.sort(logits[row], descending=True, stable=True).indices
        kept_sorted = kept[row, order]
        m = int(kept_sorted.sum())
        assert kept_sorted[:m].all(), "kept tokens must be a prefix of the most probable ones"
        mass = probs[row, order[:m]].sum()
        assert mass >= p - margin
        if m > 1:  # dropping the least probable kept token would fall short of p
            assert mass - probs[row, order[m - 1]] < p + margin


@PROPERTY
@given(st.floats(0.0, 1.0), logits_and_context())
def test_min_p_keeps_exactly_tokens_with_probability_at_least_p_times_the_top(p, data):
    logits, context = data
    kept = _kept(min_p(p)(logits, context))
    probs = logits.softmax(dim=-1)  # the same fp32 arithmetic as the transform
    threshold = p * probs.amax(dim=-1, keepdim=True)
    assert torch.equal(kept, (probs >= threshold) & (logits != NEG_INF))


@PROPERTY
@given(st.floats(0.05, 5.0), logits_and_context())
def test_temperature_keeps_the_order_of_logits(t, data):
    logits, context = data
    out = temperature(t)(logits, context)
    below = logits[:, :, None] < logits[:, None, :]
    assert (out[:, :, None] <= out[:, None, :])[below].all()
    assert torch.equal(out.argmax(dim=-1), logits.argmax(dim=-1))


@PROPERTY
@given(logits_and_context(distinct=True))
def test_temperature_tends_to_greedy_as_t_goes_to_zero(data):
    logits, context = data
    greedy = temperature(0)(logits, context)
    assert (_kept(greedy).sum(dim=-1) == 1).all()
    # Distinct fp32 draws in [-20, 20] can be ~1e-6 apart; t = 1e-9 still makes the gap huge.
    cold = temperature(1e-9)(logits, context).softmax(dim=-1)
    hot_one = torch.zeros_like(cold).scatter(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    gap = torch.sort(logits, descending=True).values
    clear = (gap[:, 0] - gap[:, 1]) > 1e-6
    torch.testing.assert_close(cold[clear], hot_one[clear], atol=1e-6, rtol=0)
    torch.testing.assert_close(greedy.softmax(dim=-1), hot_one, atol=0, rtol=0)


@PROPERTY
@given(st.floats(1.0, 5.0), logits_and_context())
def test_repetition_penalty_changes_only_context_tokens_and_never_raises_them(theta, data):
    logits, context = data
    out = repetition_penalty(theta)(logits, context)
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, context, True)
    assert torch.equal(out[~seen], logits[~seen])
    assert (out[seen] <= logits[seen]).all()


@PROPERTY
@given(st.floats(-2.0, 2.0), logits_and_context(allow_neg_inf=False))
def test_frequency_and_presence_penalties_change_only_seen_tokens_by_the_stated_amounts(a, data):
    logits, context = data
    counts = torch.zeros_like(logits).scatter_add(-1, context, torch.ones_like(context).float())
    seen = counts > 0
    by_frequency = frequency_penalty(a)(logits, context)
    by_presence = presence_penalty(a)(logits, context)
    assert torch.equal(by_frequency[~seen], logits[~seen])
    assert torch.equal(by_presence[~seen], logits[~seen])
    # Exactly the stated fp32 arithmetic: logit - a * count, logit - a.
    assert torch.equal(by_frequency[seen], logits[seen] - a * counts[seen])
    assert torch.equal(by_presence[seen], logits[seen] - a)


@PROPERTY
@given(st.dictionaries(st.integers(0, MIN_VOCAB - 1), st.floats(-10.0, 10.0)), logits_and_context())
def test_logit_bias_adds_its_bias_to_named_tokens_only(bias, data):
    logits, context = data
    out = logit_bias(bias)(logits, context)
    expected = logits.clone()
    for token, value in bias.items():
        expected[:, token] += value
    assert torch.equal(out, expected)


@PROPERTY
@given(st.lists(st.integers(0, MIN_VOCAB - 1)), logits_and_context())
def test_ban_tokens_sets_exactly_the_banned_ids_to_neg_inf(ids, data):
    logits, context = data
    out = ban_tokens(ids)(logits, context)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool)
    banned[ids] = True
    assert (out[:, banned] == NEG_INF).all()
    assert torch.equal(out[:, ~banned], logits[:, ~banned])


@PROPERTY
@given(st.integers(1, 4), logits_and_context())
def test_no_repeat_ngram_bans_exactly_the_tokens_that_would_repeat_an_ngram(n, data):
    logits, context = data
    out = no_repeat_ngram(n)(logits, context)
    for row, tokens in enumerate(context.tolist()):
        ngrams = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
        prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
        for token in range(logits.shape[-1]):
            repeats = len(tokens) >= n and (*prefix, token) in ngrams
            expected = NEG_INF if repeats else logits[row, token]
            assert out[row, token] == expected


@PROPERTY
@given(st.lists(st.one_of(filters, penalties, bans), max_size=4), logits_and_context())
def test_chain_applies_transforms_left_to_right(makes, data):
    fs, (logits, context) = [make() for make in makes], data
    expected = logits
    for f in fs:
        expected = f(expected, context)
    assert torch.equal(chain(*fs)(logits, context), expected)


def test_chain_order_matters():
    logits, context = torch.tensor([[0.0, 1.0, 2.0]]), torch.zeros(1, 0, dtype=torch.long)
    bias_then_top1 = chain(logit_bias({0: 5.0}), top_k(1))(logits, context)
    top1_then_bias = chain(top_k(1), logit_bias({0: 5.0}))(logits, context)
    assert torch.equal(bias_then_top1, torch.tensor([[5.0, NEG_INF, NEG_INF]]))
    assert torch.equal(top1_then_bias, torch.tensor([[NEG_INF, NEG_INF, 2.0]]))


# ---------------------------------------------------------------- equality with transformers


def _random_logits(seed, batch=4, vocab=300):
    g = torch.Generator().manual_seed(seed)
    # Rows from flat to near-one-hot; at scale 30 some probabilities underflow to exactly 0,
    # which top_p(1.0) drops as HF does.
    return torch.randn(batch, vocab, generator=g) * torch.tensor([[0.3], [1.0], [3.0], [30.0]])


def _random_context(seed, batch=4, vocab=300, seq=40):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


HF_PAIRS = [
    (temperature(0.7), hf.TemperatureLogitsWarper(0.7)),
    (temperature(1.9), hf.TemperatureLogitsWarper(1.9)),
    (top_k(1), hf.TopKLogitsWarper(1)),
    (top_k(17), hf.TopKLogitsWarper(17)),
    (top_k(1000), hf.TopKLogitsWarper(1000)),
    (top_p(0.05), hf.TopPLogitsWarper(0.05)),
    (top_p(0.9), hf.TopPLogitsWarper(0.9)),
    (top_p(1.0), hf.TopPLogitsWarper(1.0)),
    (min_p(0.05), hf.MinPLogitsWarper(0.05)),
    (min_p(0.5), hf.MinPLogitsWarper(0.5)),
    (typical_p(0.2), hf.TypicalLogitsWarper(0.2)),
    (typical_p(0.9), hf.TypicalLogitsWarper(0.9)),
    (repetition_penalty(1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)),
    (repetition_penalty(0.7), hf.RepetitionPenaltyLogitsProcessor(0.7)),
    (no_repeat_ngram(1), hf.NoRepeatNGramLogitsProcessor(1)),
    (no_repeat_ngram(2), hf.NoRepeatNGramLogitsProcessor(2)),
    (
        make_transform(repetition_penalty=1.2, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02),
        hf.LogitsProcessorList(
            [
                hf.RepetitionPenaltyLogitsProcessor(1.2),
                hf.TemperatureLogitsWarper(0.8),
                hf.TopKLogitsWarper(50),
                hf.TopPLogitsWarper(0.9),
                hf.MinPLogitsWarper(0.02),
            ]
        ),
    ),
]


@pytest.mark.parametrize(("ours", "theirs"), HF_PAIRS, ids=lambda x: type(x).__name__)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transforms_equal_transformers_logits_processors(ours, theirs, seed):
    logits = _random_logits(seed)
    # A small vocabulary slice repeats in the context, so n-gram bans actually happen.
    context = _random_context(seed + 100) % 12
    expected = theirs(context, logits.clone())
    # Same fp32 operations on the same inputs (no ties in random normals): bit-for-bit.
    assert torch.equal(ours(logits, context), expected)


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: temperature(-1), "temperature"),
        (lambda: temperature(float("nan")), "temperature"),
        (lambda: temperature(float("inf")), "temperature"),
        (lambda: temperature(1e-40), "temperature must be 0 .greedy. or >= 1e-30"),
        (lambda: top_k(0), "top_k"),
        (lambda: top_k(-3), "top_k"),
        (lambda: top_k(True), "top_k"),
        (lambda: top_p(0.0), "top_p"),
        (lambda: top_p(1.5), "top_p"),
        (lambda: min_p(-0.1), "min_p"),
        (lambda: min_p(1.1), "min_p"),
        (lambda: typical_p(1.0), "typical_p"),
        (lambda: typical_p(0), "typical_p"),
        (lambda: repetition_penalty(0), "repetition_penalty"),
        (lambda: frequency_penalty(float("inf")), "frequency_penalty"),
        (lambda: presence_penalty(float("nan")), "presence_penalty"),
        (lambda: logit_bias({-1: 1.0}), "logit_bias"),
        (lambda: logit_bias({3: float("nan")}), "logit_bias[3]"),
        (lambda: ban_tokens([2, -5]), "ban_tokens"),
        (lambda: no_repeat_ngram(0), "no_repeat_ngram"),
        (lambda: make_transform(top_p=2.0), "top_p"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(build, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("(", r"\(")):
        build()


def test_arguments_of_the_wrong_type_raise_value_error_without_shape_checks_too():
    # Under pytest beartype rejects these first (TypeCheckError); users without it get this.
    with shape_checks(False):
        for build, name in [
            (lambda: chain(top_k(3), 7), "chain"),
            (lambda: top_k(2.5), "top_k"),
            (lambda: top_k(3, keep_ties="yes"), "keep_ties"),
            (lambda: presence_penalty("0.5"), "presence_penalty"),
            (lambda: logit_bias([1, 2]), "logit_bias"),
        ]:
            with pytest.raises(ValueError, match=name):
                build()


def test_token_ids_outside_the_vocabulary_raise_when_applied():
    logits, context = torch.zeros(2, 10), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ban_tokens: token id 10"):
        ban_tokens([10])(logits, context)
    with pytest.raises(ValueError, match="logit_bias: token id 12"):
        logit_bias({12: 1.0})(logits, context)
    with pytest.raises(ValueError, match="context token id 10"):
        repetition_penalty(1.2)(logits, torch.full((2, 3), 10))


def test_make_transform_with_no_options_is_the_identity_in_fp32():
    logits = torch.randn(2, 9).half()
    assert torch.equal(
        make_transform()(logits, torch.zeros(2, 0, dtype=torch.long)), logits.float()
    )


def test_the_smallest_temperature_keeps_a_models_logits_finite_and_acts_greedy():
    logits = torch.tensor([[-1000.0, 3.0, 3.5, 800.0], [1e8, -1e8, 0.0, 1.0]])
    cold = temperature(1e-30)(logits, torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(cold).all()
    assert torch.equal(
        cold.softmax(dim=-1), temperature(0)(logits, logits[:, :0].long()).softmax(-1)
    )


def test_context_of_a_float_dtype_is_refused_in_one_line():
    logits = torch.zeros(1, 5)
    with shape_checks(False), pytest.raises(TypeError, match="context must be an integer tensor"):
        repetition_penalty(1.2)(logits, torch.zeros(1, 3))


# ---------------------------------------------------------------- repr and make_transform


def test_transforms_show_the_call_that_built_them():
    assert repr(chain(temperature(0.8), top_k(200))) == "chain(temperature(0.8), top_k(200))"
    assert repr(top_k(5, keep_ties=False)) == "top_k(5, keep_ties=False)"
    assert repr(logit_bias({3: 2})) == "logit_bias({3: 2.0})"
    assert repr(ban_tokens(iter([4, 1]))) == "ban_tokens([4, 1])"
    assert repr(chain()) == "chain()"
    assert repr(chain(chain(top_p(0.9)), no_repeat_ngram(3))) == (
        "chain(chain(top_p(0.9)), no_repeat_ngram(3))"
    )
    # make_transform shows the chain it built, in the order it applies
    assert repr(make_transform(top_k=200, temperature=0.8)) == "chain(temperature(0.8), top_k(200))"
    assert repr(make_transform()) == "chain()"


def test_make_transform_has_one_option_per_constructor_it_calls():
    from gpt_fn.sampling.transforms import _MAKE_TRANSFORM_ORDER

    options = list(inspect.signature(make_transform).parameters)
    assert sorted(options) == sorted(c.__name__ for c in _MAKE_TRANSFORM_ORDER)
    for constructor, value in zip(
        _MAKE_TRANSFORM_ORDER,
        ({1: 1.0}, [2], 1.2, 0.5, 0.5, 2, 0.7, 3, 0.9, 0.1, 0.9),
        strict=True,
    ):
        assert repr(make_transform(**{constructor.__name__: value})) == (
            f"chain({constructor(value)!r})"
        )


@pytest.mark.parametrize(
    "make",
    [
        partial(repetition_penalty, 1.3),
        partial(frequency_penalty, 0.5),
        partial(presence_penalty, 0.5),
        partial(no_repeat_ngram, 2),
        partial(make_transform, repetition_penalty=1.2, no_repeat_ngram=2, top_k=3),
    ],
)
def test_transforms_that_read_the_context_work_under_vmap(make):
    # A batch of 3 decoding batches (2 rows each): the context check cannot read the values
    # under vmap, and steps aside as the model's token check does.
    f = make()
    logits = _random_logits(0, batch=4, vocab=300)[:3, None].expand(3, 2, 300) * 1.0
    context = _random_context(1, batch=6, seq=12).view(3, 2, 12) % 12
    batched = torch.func.vmap(f)(logits, context)
    for i in range(3):
        assert torch.equal(batched[i], f(logits[i], context[i]))


def test_a_transform_call_is_shape_checked_and_rows_must_match():
    logits, context = torch.zeros(2, 5), torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(TypeCheckError, match="batch"):
        top_k(3)(logits, context)
    with (
        shape_checks(False),
        pytest.raises(ValueError, match="context has 3 rows but logits have 2"),
    ):
        repetition_penalty(1.2)(logits, context)


def _wider(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits, logits[:, :3]], dim=-1)


def _integers(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return logits.long()


@pytest.mark.parametrize(
    ("transform", "error", "message"),
    [
        (
            _wider,
            ValueError,
            "transform _wider returned logits of shape \\(\\d+, 104\\), not \\(\\d+, 101\\)",
        ),
        (_integers, TypeError, "transform _integers returned dtype torch.int64, not floating"),
        (
            chain(top_k(5), _wider),
            ValueError,
            "transform chain\\(top_k\\(5\\), .*shape \\(\\d+, 104\\)",
        ),
    ],
)
def test_every_decoder_names_a_transform_that_returns_the_wrong_shape_or_dtype(
    tiny_config, transform, error, message
):
    params = gpt_fn.init_params(tiny_config, seed=0)
    prompt = [[1, 2], [3]]
    runs = [
        lambda: generate(params, prompt, tiny_config, max_new_tokens=2, seed=0, transform=transform),
        lambda: generate(params, prompt, tiny_config, max_new_tokens=2, greedy=True, transform=transform),
        lambda: beam_search(params, prompt, tiny_config, 2, max_new_tokens=2, transform=transform),
        lambda: speculative_generate(
            params, prompt, tiny_config, draft_params=params, draft_config=tiny_config,
            max_new_tokens=2, greedy=True, transform=transform,
        ),
    ]  # fmt: skip
    with shape_checks(False):  # our own check, as a user without the test-time hook meets it
        for run in runs:
            with pytest.raises(error, match=message):
                run()
