"""Batches: a training micro-batch and an evaluation batch as pure functions of their indices.

`get_batch(tokens, ...)` is a pure function of `(seed, step, micro_step, rank, world_size)`
over a split's tokens (one memmap or a `TokenStream`): see its docstring for the rule that
makes DDP and single-process runs draw the same rows. A row may span two shards; the rows are
those of the concatenated tokens. `eval_batch` draws from a separate stream indexed by batch
number, so evaluation sees the same batches at every step.

References: nanoGPT `train.py` (`get_batch`); numpy `SeedSequence` for mixing (seed, step)
into independent streams.
"""

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from gpt_fn.data.shards import TOKEN_DTYPE, Tokens, TokenStream

# Separate random streams, so evaluation batch i is never training step i's batch.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def get_batch(
    tokens: Tokens,
    *,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    grad_accum_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Inputs and next-token targets (int64, `(batch_size, block_size)`) for one micro-batch.

    A pure function of its arguments. The rule: a step draws all of its
    `G = batch_size * grad_accum_steps * world_size` row offsets at once,

        offsets = SeedSequence([seed, 0, step]).generate_state(G, uint64) % (len(tokens) - block_size)

    and micro-batch `k = micro_step * world_size + rank` takes rows `k*batch_size` to
    `(k+1)*batch_size`. Row `i` is `x = tokens[o_i : o_i + block_size]`, `y = x` shifted by one.
    So a resumed run redraws the same rows, and a DDP run with `world_size` N and per-rank
    `batch_size` B/N sees, at every micro-step, exactly the rows of a single-process run with
    batch B (and, micro-batch for micro-batch, those of a single process with N times the
    `grad_accum_steps`). Offsets are drawn with replacement; SeedSequence's hash makes them
    independent across steps and seeds, and 64-bit draws make the modulo's bias negligible.
    `tokens` may be a `TokenStream`: the rows are those of its shards concatenated (a row may
    cross from one shard into the next), so a split in shards draws the rows of the one file.
    """
    _check_micro_batch(
        tokens, batch_size=batch_size, block_size=block_size, rank=rank, world_size=world_size
    )
    if not 0 <= micro_step < grad_accum_steps:
        raise ValueError(
            f"micro_step must be in [0, grad_accum_steps={grad_accum_steps}), got {micro_step!r}"
        )
    return _micro_batch(
        tokens,
        entropy=(seed, _TRAIN_STREAM, step),
        n_rows=batch_size * grad_accum_steps * world_size,
        first_row=(micro_step * world_size + rank) * batch_size,
        batch_size=batch_size,
        block_size=block_size,
        device=device,
    )


def eval_batch(
    tokens: Tokens,
    *,
    batch_size: int,
    block_size: int,
    seed: int,
    index: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Evaluation batch number `index`: the same rows at every training step.

    The rule of `get_batch` with one micro-step, on its own stream:
    `SeedSequence([seed, 1, index])`, rank `r` taking rows `r*batch_size` to `(r+1)*batch_size`.
    Evaluating batches `0..n-1` therefore measures every checkpoint on the same tokens.
    """
    _check_micro_batch(
        tokens, batch_size=batch_size, block_size=block_size, rank=rank, world_size=world_size
    )
    return _micro_batch(
        tokens,
        entropy=(seed, _EVAL_STREAM, index),
        n_rows=batch_size * world_size,
        first_row=rank * batch_size,
        batch_size=batch_size,
        block_size=block_size,
        device=device,
    )


def _check_micro_batch(
    tokens: Tokens, *, batch_size: int, block_size: int, rank: int, world_size: int
) -> None:
    is_array = isinstance(tokens, np.ndarray)
    if not isinstance(tokens, TokenStream) and (
        not is_array or tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1
    ):
        kind = f"{tokens.ndim}-d {tokens.dtype} array" if is_array else type(tokens).__name__
        raise TypeError(
            f"tokens must be a 1-d {np.dtype(TOKEN_DTYPE).name} array or a TokenStream "
            f"(load_split gives one), got a {kind}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if len(tokens) < block_size + 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than block_size + 1 = {block_size + 1}")


def _micro_batch(
    tokens: Tokens,
    *,
    entropy: tuple[int, int, int],
    n_rows: int,
    first_row: int,
    batch_size: int,
    block_size: int,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor]:
    if min(entropy) < 0:
        raise ValueError(f"seed and step/index must be >= 0, got {entropy[0]} and {entropy[2]}")
    # generate_state is SeedSequence's documented hash, not a generator's stream, so the rows
    # stay the same across numpy versions.
    draws = np.random.SeedSequence(list(entropy)).generate_state(n_rows, np.uint64)
    offsets = draws[first_row : first_row + batch_size] % np.uint64(len(tokens) - block_size)
    rows = tokens[offsets.astype(np.int64)[:, None] + np.arange(block_size + 1)]
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))
    y = torch.from_numpy(rows[:, 1:].astype(np.int64))
    if device is None or torch.device(device).type == "cpu":
        return x, y
    # Pinned host memory lets the copy overlap with compute (nanoGPT's get_batch).
    return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
        device, non_blocking=True
    )
