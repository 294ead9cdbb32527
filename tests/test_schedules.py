"""Schedules: build-nanogpt's exact values, continuity, monotone pieces, optax's join semantics."""

import math
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn.optim import constant, cosine_decay, join, linear_warmup, warmup_cosine


def nanogpt_get_lr(step: int, max_lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """build-nanogpt `train_gpt2.py` `get_lr`, restated as the specification."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


warmup_cosine_args = st.tuples(
    st.floats(1e-6, 1.0),  # max_lr
    st.floats(0.0, 1.0),  # min_lr as a fraction of max_lr
    st.integers(0, 50),  # warmup_steps
    st.integers(1, 200),  # decay_steps - warmup_steps
).map(lambda a: (a[0], a[0] * a[1], a[2], a[2] + a[3]))


@pytest.mark.parametrize(
    ("max_lr", "min_lr", "warmup", "decay"),
    [(6e-4, 6e-5, 10, 50), (6e-4, 6e-5, 715, 19073), (1.0, 0.0, 0, 7), (3e-4, 3e-4, 3, 4)],
)
def test_warmup_cosine_equals_build_nanogpt_bit_for_bit(max_lr, min_lr, warmup, decay):
    schedule = warmup_cosine(max_lr, min_lr, warmup, decay)
    steps = [*range(min(decay + 20, 200)), decay - 1, decay, decay + 1, 10 * decay]
    for step in steps:
        assert schedule(step) == nanogpt_get_lr(step, max_lr, min_lr, warmup, decay), step


def test_warmup_cosine_landmark_values():
    schedule = warmup_cosine(6e-4, 6e-5, warmup_steps=10, decay_steps=50)
    assert schedule(0) == pytest.approx(6e-5)  # (0 + 1) / 10 of max_lr: step 0 already trains
    assert schedule(9) == pytest.approx(6e-4)  # warmup reaches max_lr at its last step
    assert schedule(10) == 6e-4  # cosine starts at max_lr
    assert schedule(30) == pytest.approx((6e-4 + 6e-5) / 2)  # half way: the cosine's mean
    assert schedule(50) == pytest.approx(6e-5)
    assert schedule(51) == schedule(10_000) == 6e-5


@settings(max_examples=50, deadline=None)
@given(warmup_cosine_args)
def test_warmup_cosine_steps_change_lr_by_at_most_the_steepest_slope(args):
    max_lr, min_lr, warmup, decay = args
    schedule = warmup_cosine(max_lr, min_lr, warmup, decay)
    # Warmup climbs max_lr / warmup per step; the cosine's slope is at most pi/2 (max-min)/(decay-warmup).
    bound = max(max_lr / max(warmup, 1), math.pi / 2 * (max_lr - min_lr) / (decay - warmup))
    lrs = [schedule(s) for s in range(decay + 3)]
    assert all(abs(b - a) <= bound * (1 + 1e-9) for a, b in pairwise(lrs))


@settings(max_examples=50, deadline=None)
@given(warmup_cosine_args)
def test_warmup_cosine_rises_then_falls_within_its_bounds(args):
    max_lr, min_lr, warmup, decay = args
    schedule = warmup_cosine(max_lr, min_lr, warmup, decay)
    rising = [schedule(s) for s in range(warmup)]
    falling = [schedule(s) for s in range(warmup, decay + 3)]
    assert all(a <= b for a, b in pairwise(rising))
    assert all(a >= b for a, b in pairwise(falling))
    # 1e-12 relative: `min_lr + 1.0 * (max_lr - min_lr)` may round one ulp past max_lr.
    assert all(0.0 < lr <= max_lr * (1 + 1e-12) for lr in rising)
    assert all(min_lr * (1 - 1e-12) <= lr <= max_lr * (1 + 1e-12) for lr in falling)


def test_constant_is_the_same_at_every_step():
    assert {constant(3e-4)(s) for s in (0, 1, 10**9)} == {3e-4}


def test_linear_warmup_values():
    schedule = linear_warmup(0.1, 1.1, warmup_steps=4)
    assert [schedule(s) for s in range(6)] == pytest.approx([0.1, 0.35, 0.6, 0.85, 1.1, 1.1])


def test_cosine_decay_values():
    schedule = cosine_decay(1.0, 0.2, decay_steps=10)
    assert schedule(0) == 1.0
    assert schedule(5) == pytest.approx(0.6)
    assert schedule(10) == pytest.approx(0.2)
    assert schedule(11) == schedule(1000) == pytest.approx(0.2)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(1, 100))
def test_linear_warmup_is_non_decreasing_and_cosine_decay_non_increasing(a, b, steps):
    low, high = sorted((a, b))
    up = [linear_warmup(low, high, steps)(s) for s in range(steps + 3)]
    down = [cosine_decay(high, low, steps)(s) for s in range(steps + 3)]
    assert all(x <= y for x, y in pairwise(up))
    assert all(x >= y for x, y in pairwise(down))
    assert up[0] == down[-1] == pytest.approx(low) and up[-1] == down[0] == pytest.approx(high)


def test_join_gives_each_schedule_the_steps_since_its_boundary():
    seen: list[tuple[str, int]] = []

    def recorder(tag: str):
        def schedule(step: int) -> float:
            seen.append((tag, step))
            return float(step)

        return schedule

    joined = join([recorder("a"), recorder("b"), recorder("c")], [3, 5])
    lrs = [joined(s) for s in range(8)]
    assert lrs == [0, 1, 2, 0, 1, 0, 1, 2]
    assert [tag for tag, _ in seen] == ["a"] * 3 + ["b"] * 2 + ["c"] * 3


def test_join_of_warmup_and_cosine_is_continuous_at_the_boundary():
    joined = join([linear_warmup(0.0, 1.0, 10), cosine_decay(1.0, 0.1, 20)], [10])
    assert joined(10) == 1.0 == linear_warmup(0.0, 1.0, 10)(10)
    assert joined(30) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: constant(-1e-3), "lr"),
        (lambda: constant(float("nan")), "lr"),
        (lambda: linear_warmup(1.0, 0.5, 10), "init_lr"),
        (lambda: linear_warmup(0.0, 1.0, 0), "warmup_steps"),
        (lambda: cosine_decay(0.5, 1.0, 10), "final_lr"),
        (lambda: cosine_decay(1.0, 0.0, -3), "decay_steps"),
        (lambda: warmup_cosine(6e-4, 6e-3, 10, 50), "min_lr"),
        (lambda: warmup_cosine(-6e-4, 0.0, 10, 50), "max_lr"),
        (lambda: warmup_cosine(6e-4, 6e-5, 60, 50), "warmup_steps"),
        (lambda: warmup_cosine(6e-4, 6e-5, 50, 50), "warmup_steps"),
        (lambda: warmup_cosine(6e-4, 6e-5, -1, 50), "warmup_steps"),
        (lambda: join([], []), "schedules"),
        (lambda: join([constant(1.0), constant(2.0)], []), "boundaries"),
        (lambda: join([constant(1.0)] * 3, [5, 5]), "increasing"),
        (lambda: join([constant(1.0)] * 2, [0]), "boundaries"),
    ],
)
def test_bad_arguments_fail_when_the_schedule_is_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "schedule",
    [
        constant(1.0),
        linear_warmup(0.0, 1.0, 5),
        cosine_decay(1.0, 0.0, 5),
        join([constant(1.0), constant(2.0)], [3]),
        warmup_cosine(1.0, 0.1, 2, 5),
    ],
)
def test_negative_step_raises(schedule):
    with pytest.raises(ValueError, match="step"):
        schedule(-1)
