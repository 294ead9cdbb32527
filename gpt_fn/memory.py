"""Memory estimates made before allocating, so a request that cannot fit is one clear error.

Each kind of request has a function that gives a lower bound of the bytes it needs
(`training_bytes` for a training run); `check_fits` compares one with what the device has
available (`available_bytes`: `MemAvailable` of /proc/meminfo on CPU, the free memory
`torch.cuda.mem_get_info` reports on CUDA) and raises `InsufficientMemoryError` saying how
much it would need. A lower bound never refuses a request that fits; one that passes may
still run out, so `allocation_errors` turns an allocation failure (torch's CPU allocator,
CUDA out of memory, numpy) into the same named error.

The training estimate counts, per process: the fp32 params, their gradients and the
optimizer's buffers (AdamW two per param; Muon one per param at least), and per micro-batch
the token ids and the activations the backward keeps (at least 16 values of `n_embd` per
token per block: the LayerNorm outputs, q, k, v, the attention output and the MLP's 4x
hidden layer before and after GELU) in the autocast dtype. With activation checkpointing a
block keeps only its input (one value of `n_embd` per token) and the backward recomputes one
block at a time, so it needs `n_layer + 16` values per token instead of `16 * n_layer`.
"""

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt_fn.config import GPTConfig
from gpt_fn.model import param_shapes

ACTIVATIONS_PER_BLOCK = 16
"""Values of `n_embd` per token a block keeps for backward, at least (see the docstring)."""
OPTIMIZER_BUFFERS = {"adamw": 2, "muon": 1}
"""Optimizer buffers per param, at least (Muon's AdamW part keeps two for the rest)."""


class InsufficientMemoryError(MemoryError):
    """A request needs more memory than the device has: estimated up front, or an allocation failed."""


def training_bytes(
    config: GPTConfig,
    *,
    batch_size: int,
    optimizer: str,
    dtype: torch.dtype = torch.float32,
    world_size: int = 1,
    sharded: bool = False,
    activation_checkpointing: bool = False,
) -> int:
    """A lower bound of the bytes one process needs to train `config` on `batch_size` rows.

    `batch_size` counts the rows of a micro-step over all `world_size` ranks; `sharded`
    (FSDP) splits the params, gradients and optimizer state over the ranks;
    `activation_checkpointing` (`GPT(checkpoint_blocks=True)`) keeps only each block's input.
    """
    params = sum(math.prod(shape) for shape in param_shapes(config).values())
    state = params * 4 * (2 + OPTIMIZER_BUFFERS[optimizer])  # params, grads, buffers in fp32
    if sharded:
        state //= world_size
    tokens = max(batch_size // world_size, 1) * config.block_size
    blocks = (
        config.n_layer + ACTIVATIONS_PER_BLOCK
        if activation_checkpointing
        else ACTIVATIONS_PER_BLOCK * config.n_layer
    )
    per_token = blocks * config.n_embd * dtype.itemsize
    return state + tokens * (per_token + 2 * 8)  # and the int64 inputs and targets


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`, or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: int, device: torch.device, *, what: str, advice: str) -> None:
    """Raise `InsufficientMemoryError` if `needed` bytes exceed what `device` has available."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InsufficientMemoryError(
            f"{what} needs at least {_size(needed)} of memory, more than the {_size(free)} "
            f"available on {device}: {advice}"
        )


@contextlib.contextmanager
def allocation_errors(what: str, advice: str) -> Iterator[None]:
    """Within the block, an allocation failure becomes `InsufficientMemoryError` naming `what`."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise InsufficientMemoryError(
            f"{what} ran out of memory ({_first_line(error)}): {advice}"
        ) from None
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):  # torch's CPU allocator says this
            raise
        raise InsufficientMemoryError(
            f"{what} ran out of memory ({_first_line(error)}): {advice}"
        ) from None
    except MemoryError as error:
        if isinstance(error, InsufficientMemoryError):
            raise
        raise InsufficientMemoryError(
            f"{what} ran out of memory ({_first_line(error) or 'MemoryError'}): {advice}"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _size(count: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,} bytes"
