"""Samplers: final logits `(batch, vocab)` in, one token id per row out.

- `greedy`: the argmax, the lowest id among ties (`torch.max`'s documented rule).
- `categorical`: a draw from `softmax(logits)` with randomness from explicit generators, one
  shared or one per row (so a row's draws do not depend on its neighbours).

`categorical` draws by the exponential race (argmax of `p_i / E_i`, `E_i ~ Exp(1)`: the
smallest of independent `Exp(p_i)` clocks wins with probability `p_i`; gpt-fast and vLLM sample
this way) instead of `torch.multinomial`: a token with probability exactly 0 is masked out of
the race, so it can never be drawn, whatever the rounding of a cumulative sum.

Both raise `ValueError` on a row with NaN or +inf logits or with every logit −inf (a transform
chain that filtered everything), instead of returning an arbitrary id.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor


def greedy(logits: Float[Tensor, "*batch vocab"]) -> Int[Tensor, "*batch"]:
    """The most likely token of each row; the lowest id among equal maxima."""
    check_logits(logits)
    return greedy_unchecked(logits)


def categorical(
    logits: Float[Tensor, "batch vocab"],
    generator: torch.Generator | Sequence[torch.Generator],
) -> Int[Tensor, " batch"]:
    """One draw per row from `softmax(logits)` (in fp32).

    `generator`: one generator for the whole batch, or one per row, in which case row `i`
    consumes only `generator[i]`.
    """
    check_logits(logits)
    return categorical_unchecked(logits, generator)


def greedy_unchecked(logits: Float[Tensor, "*batch vocab"]) -> Int[Tensor, "*batch"]:
    """`greedy` without `check_logits`, for a caller that has checked the logits already."""
    # max(dim).indices is argmax with the same first-maximum rule, and faster on CPU for a few
    # rows of a GPT-2-sized vocabulary (argmax's reduction takes a slower path there).
    return logits.max(dim=-1).indices


def categorical_unchecked(
    logits: Float[Tensor, "batch vocab"], generator: torch.Generator | Sequence[torch.Generator]
) -> Int[Tensor, " batch"]:
    """`categorical` without `check_logits`, for a caller that has checked the logits already."""
    probs = logits.float().softmax(dim=-1)
    if isinstance(generator, torch.Generator):
        clocks = torch.empty_like(probs).exponential_(generator=generator)
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(
                f"categorical got {len(generator)} generators for {probs.shape[0]} rows"
            )
        clocks = torch.stack(
            [
                torch.empty_like(row).exponential_(generator=g)
                for row, g in zip(probs, generator, strict=True)
            ]
        )
    # Zero-probability tokens get -1, below every live token's p / E >= 0.
    return torch.where(probs > 0, probs / clocks, -1.0).argmax(dim=-1)


def check_logits(
    logits: Float[Tensor, "batch vocab"],
    *,
    model_logits: Float[Tensor, "batch vocab"] | None = None,
    maxima: Float[Tensor, " batch"] | None = None,
) -> None:
    """Raise `ValueError` naming the first row that no sampler can draw from.

    `model_logits`: the model's logits that transforms turned into `logits` (or `logits`
    itself), checked in the same host sync. A NaN/+inf row there is reported as the model's
    error: a filter would have hidden its NaN behind -inf, and the transforms are not to blame.
    `maxima`: each row's max of `logits` where the caller has it already (greedy decoding).
    """
    # A row's max is finite exactly when the row has a finite logit and no NaN/+inf (max
    # propagates NaN): one cheap reduction per tensor and one host sync in the common case.
    finite = torch.isfinite(logits.amax(dim=-1) if maxima is None else maxima).all()
    if model_logits is not None and model_logits is not logits:
        finite = finite & torch.isfinite(model_logits.amax(dim=-1)).all()
    if bool(finite):
        return
    if model_logits is not None:
        row, problem = _first_bad_row(model_logits)
        if problem == "nan":
            raise ValueError(
                f"the model's logits for row {row} contain NaN or +inf (before any transform); "
                "cannot sample from them: are the params finite, and does the model overflow "
                "its dtype?"
            )
        if problem == "dead":
            raise ValueError(f"the model's logits for row {row} are all -inf; cannot sample")
    row, problem = _first_bad_row(logits)
    if problem == "nan":
        raise ValueError(f"logits row {row} contains NaN or +inf; cannot sample from it")
    raise ValueError(
        f"every logit of row {row} is -inf (the transforms filtered out every token); "
        "cannot sample from it"
    )


def _first_bad_row(logits: Tensor) -> tuple[int, str | None]:
    """The first row with a NaN/+inf (`"nan"`), else the first all -inf one (`"dead"`)."""
    invalid = (logits.isnan() | (logits == float("inf"))).any(dim=-1)
    if bool(invalid.any()):
        return int(invalid.nonzero()[0, 0]), "nan"
    dead = (logits == float("-inf")).all(dim=-1)
    if bool(dead.any()):
        return int(dead.nonzero()[0, 0]), "dead"
    return -1, None
