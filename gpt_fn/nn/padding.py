"""Padded batches: rows of different lengths in one tensor, a mask saying which tokens are real.

An attention mask (`batch seq`, 1/True = a real token) is all the model needs to treat each
row as if it were alone: every token's position counts the real tokens before it in its row
(`positions`), and no query ever attends to a padded key (`attention_mask_4d`). Padding may be
on either side (generation pads on the left, so new tokens line up in one column).

A query at a padded position has no real key to attend to; it attends to itself only, so its
(meaningless) output stays finite and never reaches a real token.
"""

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from gpt_fn.checks import check_attention_mask, check_token_tensor
from gpt_fn.nn.attention import Mask


def pad(
    rows: Sequence[Sequence[int]],
    *,
    side: Literal["left", "right"],
    device: torch.device | str | None = None,
) -> tuple[Int[Tensor, "batch seq"], Bool[Tensor, "batch seq"]]:
    """Token lists as one int64 tensor, padded with 0 on `side`, and its mask (True = real).

    Each row is a flat list (or tuple) of integer ids; a float, a bool or a list nested deeper
    is refused (`ValueError` naming the row), never rounded or flattened.
    """
    if isinstance(rows, (Tensor, str, bytes)) or not rows:
        raise ValueError("expected a non-empty list of token lists")
    tensors = [_row(i, row) for i, row in enumerate(rows)]
    lengths = [len(row) for row in tensors]
    width = max(lengths)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(tensors):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, span] = row
        mask[i, span] = True
    return tokens.to(device), mask.to(device)


def as_batch(
    tokens: Tensor | Sequence[Sequence[int]],
    attention_mask: Tensor | None,
    *,
    side: Literal["left", "right"],
    device: torch.device | str | None = None,
    name: str = "tokens",
) -> tuple[Tensor, Bool[Tensor, "batch seq"] | None]:
    """A batch as one tensor and its mask as bool (None: every token real): a tensor as given,
    with its `attention_mask` checked; token lists padded on `side` (on `device`).

    `name` is what errors call the tokens (`"prompt"` in generation). The tokens' ids are the
    caller's to check (against its config).
    """
    if isinstance(tokens, Tensor):
        if attention_mask is None:
            return tokens, None
        check_token_tensor(name, tokens)
        return tokens, check_attention_mask(attention_mask, tokens)
    if attention_mask is not None:
        raise ValueError(f"attention_mask goes with a {name} tensor; token lists make their own")
    if not isinstance(tokens, Sequence) or isinstance(tokens, str):
        raise TypeError(
            f"{name} must be a (batch, seq) tensor or a list of token lists, got "
            f"{type(tokens).__name__}"
        )
    padded, mask = pad(tokens, side=side, device=device)
    return padded, (None if bool(mask.all()) else mask)


def _row(i: int, row: object) -> Tensor:
    """Row `i` of a batch of token lists as a 1-D int64 tensor, or `ValueError` naming it."""
    if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
        raise ValueError(
            f"row {i} must be a list of integer token ids, got {type(row).__name__}: "
            "token lists are [[id, ...], ...]"
        )
    if len(row) == 0:
        raise ValueError(f"row {i} has no tokens; every row needs at least one")
    try:
        tensor = torch.as_tensor(row)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise ValueError(f"row {i} is not a list of integer token ids: {error}") from None
    if tensor.ndim != 1:
        raise ValueError(
            f"row {i} must be a flat list of token ids, got {tensor.ndim} levels of nesting: "
            "token lists are [[id, ...], ...]"
        )
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ValueError(
            f"row {i} holds {tensor.dtype} values, not integer token ids; a number such as 1.5 "
            "or True is not a token"
        )
    return tensor.long()


def positions(mask: Bool[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Each token's position in its row: the number of real tokens before it (0 at padding)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def attention_mask_4d(mask: Bool[Tensor, "batch seq"]) -> Mask:
    """Causal attention over the real tokens of each row (padded queries see themselves)."""
    seq = mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    allowed = causal & mask[:, None, :]
    itself = torch.eye(seq, dtype=torch.bool, device=mask.device) & ~mask[:, :, None]
    return (allowed | itself)[:, None]


def cache_attention_mask(
    starts: Int[Tensor, " batch"], lengths: Int[Tensor, " batch"], seq: int, capacity: int
) -> Mask:
    """Attention of a chunk of `seq` new tokens written at slots `lengths .. lengths + seq - 1`
    of a cache of `capacity` slots whose row `b` holds real tokens from slot `starts[b]` on."""
    slots = torch.arange(capacity, device=lengths.device)
    query_slots = lengths[:, None] + torch.arange(seq, device=lengths.device)  # (batch, seq)
    allowed = (slots[None, None, :] >= starts[:, None, None]) & (
        slots[None, None, :] <= query_slots[:, :, None]
    )
    padded_query = query_slots < starts[:, None]  # a prompt's left padding, at prefill
    itself = (slots[None, None, :] == query_slots[:, :, None]) & padded_query[:, :, None]
    return (allowed | itself)[:, None]
