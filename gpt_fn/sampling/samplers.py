"""Samplers: final logits `(batch, vocab)` in, one token id per row out.

- `greedy`: the argmax, the lowest id among ties (`torch.argmax`'s documented rule).
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


def greedy(logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
    """The most likely token of each row; the lowest id among equal maxima."""
    check_logits(logits)
    return logits.argmax(dim=-1)


def categorical(
    logits: Float[Tensor, "batch vocab"],
    generator: torch.Generator | Sequence[torch.Generator],
) -> Int[Tensor, " batch"]:
    """One draw per row from `softmax(logits)` (in fp32).

    `generator`: one generator for the whole batch, or one per row, in which case row `i`
    consumes only `generator[i]`.
    """
    check_logits(logits)
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


def check_logits(logits: Float[Tensor, "batch vocab"]) -> None:
    """Raise `ValueError` naming the first row that no sampler can draw from."""
    # A row's max is finite exactly when the row has a finite logit and no NaN/+inf (max
    # propagates NaN): one cheap reduction and one host sync per step in the common case.
    row_max = logits.amax(dim=-1)
    if bool(torch.isfinite(row_max).all()):
        return
    invalid = (logits.isnan() | (logits == float("inf"))).any(dim=-1)
    if bool(invalid.any()):
        row = int(invalid.nonzero()[0, 0])
        raise ValueError(f"logits row {row} contains NaN or +inf; cannot sample from it")
    row = int((row_max == float("-inf")).nonzero()[0, 0])
    raise ValueError(
        f"every logit of row {row} is -inf (the transforms filtered out every token); "
        "cannot sample from it"
    )
