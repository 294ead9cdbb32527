"""Learning-rate schedules: pure functions `step -> lr`, built by validated factories.

A schedule needs no optimizer, so it can be plotted, tested and resumed on its own; the
optimizer reads the step from its state and asks the schedule (optax's design: `optax.schedules`).
`step` counts the updates already applied, so the first update uses `schedule(0)`.

- `constant`, `linear_warmup`, `cosine_decay`: the pieces (optax's `constant_schedule`,
  `linear_schedule`, `cosine_decay_schedule`).
- `join`: pieces one after another; after a boundary the next piece sees `step - boundary`
  (optax's `join_schedules`).
- `warmup_cosine`: build-nanogpt's `get_lr` exactly (Karpathy, build-nanogpt `train_gpt2.py`):
  linear warmup to `max_lr` reaching it at step `warmup_steps - 1`, cosine down to `min_lr` at
  `decay_steps`, `min_lr` after.

Factories raise `ValueError` naming the bad argument; a schedule raises `ValueError` on a
negative step.
"""

import math
import operator
from collections.abc import Callable, Sequence
from itertools import pairwise

from gpt_fn.checks import check_int, check_number

Schedule = Callable[[int], float]
"""`step -> lr`: the learning rate for the update made after `step` updates."""


def constant(lr: float) -> Schedule:
    """The same `lr` at every step."""
    lr = check_number("lr", lr, at_least=0.0)

    def schedule(step: int) -> float:
        _check_step(step)
        return lr

    return schedule


def linear_warmup(init_lr: float, peak_lr: float, warmup_steps: int) -> Schedule:
    """`init_lr` at step 0 rising linearly to `peak_lr` at `warmup_steps`, `peak_lr` after."""
    init_lr, peak_lr = _check_lrs(("init_lr", init_lr), ("peak_lr", peak_lr), " for a warmup")
    warmup_steps = check_int("warmup_steps", warmup_steps, at_least=1)

    def schedule(step: int) -> float:
        return init_lr + _fraction(step, warmup_steps) * (peak_lr - init_lr)

    return schedule


def cosine_decay(init_lr: float, final_lr: float, decay_steps: int) -> Schedule:
    """Half a cosine from `init_lr` at step 0 down to `final_lr` at `decay_steps`, `final_lr` after."""
    final_lr, init_lr = _check_lrs(("final_lr", final_lr), ("init_lr", init_lr), " for a decay")
    decay_steps = check_int("decay_steps", decay_steps, at_least=1)

    def schedule(step: int) -> float:
        fraction = _fraction(step, decay_steps)
        return final_lr + 0.5 * (1.0 + math.cos(math.pi * fraction)) * (init_lr - final_lr)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """`schedules[i]` from `boundaries[i-1]` on, seeing `step - boundaries[i-1]` (optax semantics)."""
    schedules, boundaries = tuple(schedules), tuple(boundaries)
    if not schedules:
        raise ValueError("schedules must not be empty")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"need len(schedules) - 1 = {len(schedules) - 1} boundaries, got {len(boundaries)}"
        )
    for i, boundary in enumerate(boundaries):
        check_int(f"boundaries[{i}]", boundary, at_least=1)
    if any(b >= c for b, c in pairwise(boundaries)):
        raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")

    def schedule(step: int) -> float:
        step = _check_step(step)
        # The last boundary at or below `step` picks the piece and where its clock starts.
        start, piece = 0, schedules[0]
        for boundary, next_piece in zip(boundaries, schedules[1:], strict=True):
            if step < boundary:
                break
            start, piece = boundary, next_piece
        return piece(step - start)

    return schedule


def warmup_cosine(max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> Schedule:
    """build-nanogpt's `get_lr`: `max_lr * (s+1) / warmup_steps`, then cosine to `min_lr` at `decay_steps`.

    Written as in build-nanogpt rather than as `join(linear_warmup, cosine_decay)`: its warmup
    is shifted by one step (`s + 1`, so step 0 already trains) and its float operations are
    kept in the same order, so a run reproduces its learning rates bit for bit.
    """
    min_lr, max_lr = _check_lrs(("min_lr", min_lr), ("max_lr", max_lr))
    warmup_steps = check_int("warmup_steps", warmup_steps, at_least=0)
    decay_steps = check_int("decay_steps", decay_steps, at_least=1)
    # Equal steps would leave the cosine an empty interval (build-nanogpt divides by zero there).
    if warmup_steps >= decay_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be < decay_steps ({decay_steps})")

    def schedule(step: int) -> float:
        step = _check_step(step)
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        if step > decay_steps:
            return min_lr
        decay_ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return min_lr + coeff * (max_lr - min_lr)

    return schedule


def _check_step(step: int) -> int:
    # operator.index accepts any integer (numpy, 0-d integer tensors) and refuses floats.
    return check_int("step", operator.index(step), at_least=0)


def _check_lrs(
    low: tuple[str, float], high: tuple[str, float], purpose: str = ""
) -> tuple[float, float]:
    """The `(name, lr)` pairs' lrs as floats: `ValueError` unless each is finite and >= 0 and
    `low`'s is <= `high`'s (the message ends with `purpose`, e.g. `" for a warmup"`)."""
    (low_name, low_lr), (high_name, high_lr) = low, high
    low_lr = check_number(low_name, low_lr, at_least=0.0)
    high_lr = check_number(high_name, high_lr, at_least=0.0)
    if low_lr > high_lr:
        raise ValueError(f"{low_name} ({low_lr}) must be <= {high_name} ({high_lr}){purpose}")
    return low_lr, high_lr


def _fraction(step: int, steps: int) -> float:
    """How far `step` is through `steps` steps: in [0, 1], 1 from `steps` on."""
    return min(_check_step(step), steps) / steps
