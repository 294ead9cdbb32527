"""The KV cache of decoding: preallocated keys and values per block, and each row's slots.

It sits below the model (`gpt_fn.model.transformer` writes into it) and below the decoding
engine (`gpt_fn.sampling.engine`, which re-exports it with the steps that use it), so both
import it without a cycle.
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gpt_fn.checks import check_int, is_traced
from gpt_fn.config import GPTConfig


class KVCache(NamedTuple):
    """Preallocated keys and values of every block, and which slots of each row hold what.

    Row `b` holds its left padding in slots `0 .. starts[b] - 1` (masked out) and its real
    tokens from slot `starts[b]` up to `lengths[b] - 1`; the next token goes to slot
    `lengths[b]`. A step writes its keys/values into the buffers (`transformer`, no copy of
    the past) and attends over the slots up to the longest row's (a slice of the buffers), so
    its cost follows the tokens written, not the capacity; traced code (a compiled step)
    attends over the whole capacity, so a compiled decoder passes a cache of views of the
    attended slots. `grown` makes room for more slots.
    """

    keys: tuple[Float[Tensor, "batch n_head capacity d_head"], ...]
    values: tuple[Float[Tensor, "batch n_head capacity d_head"], ...]
    starts: Int[Tensor, " batch"]
    lengths: Int[Tensor, " batch"]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def attended_slots(self, seq: int) -> int:
        """How many of the first slots a chunk of `seq` new tokens attends over: up to the
        longest row's last once the chunk is written (one host read), or, when the lengths
        cannot be read (traced), the whole capacity."""
        if is_traced(self.lengths):
            return self.capacity
        return min(self.capacity, int(self.lengths.max()) + seq)

    def select(self, rows: Int[Tensor, " rows"]) -> "KVCache":
        """The cache of `rows` (in that order, repeats allowed): fan-out, beam reordering."""
        return KVCache(
            tuple(k.index_select(0, rows) for k in self.keys),
            tuple(v.index_select(0, rows) for v in self.values),
            self.starts.index_select(0, rows),
            self.lengths.index_select(0, rows),
        )

    def grown(self, capacity: int) -> "KVCache":
        """The same cache with room for `capacity` slots per row (the new slots empty)."""
        check_int("capacity", capacity, at_least=self.capacity)

        def grow(buffer: Tensor) -> Tensor:
            batch, n_head, filled, d_head = buffer.shape
            larger = buffer.new_zeros(batch, n_head, capacity, d_head)
            larger[:, :, :filled] = buffer
            return larger

        return KVCache(
            tuple(grow(k) for k in self.keys),
            tuple(grow(v) for v in self.values),
            self.starts,
            self.lengths,
        )

    def clone(self) -> "KVCache":
        return KVCache(
            tuple(k.clone() for k in self.keys),
            tuple(v.clone() for v in self.values),
            self.starts.clone(),
            self.lengths.clone(),
        )


def empty_cache(
    config: GPTConfig,
    *,
    batch: int,
    capacity: int,
    starts: Int[Tensor, " batch"] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KVCache:
    """A cache with room for `capacity` slots per row and nothing written yet.

    `starts`: each row's first real slot (its left padding), default 0.
    """
    check_int("capacity", capacity, at_least=1)
    shape = (batch, config.n_head, capacity, config.d_head)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    return KVCache(
        tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)),
        tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)),
        zeros if starts is None else starts.to(device=device, dtype=torch.long),
        zeros.clone(),
    )
