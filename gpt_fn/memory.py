"""Memory a request needs, and memory a device has: refuse what cannot fit up front.

A request too large for the machine (`gpt-fn sample --num-beams 60000` wants tens of GB of
logits and cache; `gpt-fn train --batch-size 100000000`) would otherwise grow until the OOM
killer ends the process, or end in an allocator's traceback. Each kind of request has an
estimate made from its sizes alone, before anything is allocated, and a check against
`available_bytes(device)` that names both:

- sampling: `generate_bytes`, `beam_search_bytes` (the peak its tensors reach);
- training: `training_bytes` (a lower bound);
- `check_fits`: `InsufficientMemoryError` naming the request, what it needs and what the
  device has, before anything is allocated.

An estimate may pass and the allocation still fail (allocators round up and keep freed
blocks): `allocation_errors` turns an allocation failure (torch's CPU allocator, CUDA out of
memory, numpy) into `InsufficientMemoryError`, which the CLI reports as one line.

Sampling counts the tensors that grow with the request, as `gpt_fn.sampling` makes them:
- the KV cache: keys and values, `2 * n_layer * rows * capacity * n_embd` in the params'
  dtype, where `capacity = min(block_size, prompt + max_new_tokens - 1)`; the prefill's cache
  (one row per prompt) and the fanned-out one (a row per sample or beam) are both alive at
  the fan-out, and beam search copies the cache to reorder its beams each step (two alive);
- each step's logits, `rows * vocab` in fp32, several of them alive at once
  (`GENERATE_LOGITS`, `BEAM_LOGITS`: the model's, log-probs, a transform's input and output,
  the sort or top-k it makes, beam search's scores over every beam's vocabulary);
- the activations of one forward: the prefill's `batch * prompt * n_embd *
  ACTIVATION_WIDTHS` (the MLP's 4x width, q/k/v, residual and norms) and its attention
  scores `batch * n_head * prompt * prompt` in fp32 (a kernel that does not materialise them
  needs less), or a step's over the whole window when decoding without a cache;
- the LM head laid out for decoding (`gpt_fn.sampling.decoding_head`): a copy of `wte` and
  MKL's packing of it, `HEAD_COPIES` times its size;
- the token ids (int64): the context so far and the new tokens, twice (the next step's
  context is a new tensor).

The params themselves are already in memory (they are not counted) and `available_bytes`
reads what is left besides them. An estimate is of what these tensors need, not a
measurement of the process: allocators round up and keep freed blocks, so a request close to
the limit may still fail, which the CLI reports as one line too.

Training counts, per process: the fp32 params, their gradients and the optimizer's buffers
(AdamW two per param; Muon one per param at least), and per micro-batch the token ids and the
activations the backward keeps (at least 16 values of `n_embd` per token per block: the
LayerNorm outputs, q, k, v, the attention output and the MLP's 4x hidden layer before and
after GELU) in the autocast dtype. With activation checkpointing a block keeps only its input
(one value of `n_embd` per token) and the backward recomputes one block at a time, so it needs
`n_layer + 16` values per token instead of `16 * n_layer`.
"""

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt_fn.checks import check_int
from gpt_fn.config import GPTConfig
from gpt_fn.model import param_shapes

GENERATE_LOGITS = 9
"""`rows * vocab` fp32 sizes alive at once in a `generate` step: the logits, a transform's
input and output, and top-p's sort (values and int64 indices), cumulative sum and scatter.
Measured: the peak RSS of `generate` with top-p over 512 rows grew by ~8.7 of them."""
BEAM_LOGITS = 7
"""`rows * vocab` fp32 sizes alive at once in a beam search step: the logits, log-probs,
every beam's summed scores and their top-k. Measured: ~6.9 of them (512 beams)."""
ACTIVATION_WIDTHS = 10
"""`n_embd`-wide activations alive at once in one block's forward (the MLP's 4x among them)."""
HEAD_COPIES = 4
"""Sizes of `wte` the decoding head holds: its `(d_model, vocab)` copy and MKL's packing."""
_FP32 = 4
_INT64 = 8


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
    state = params * _FP32 * (2 + OPTIMIZER_BUFFERS[optimizer])  # params, grads, buffers in fp32
    if sharded:
        state //= world_size
    tokens = max(batch_size // world_size, 1) * config.block_size
    blocks = (
        config.n_layer + ACTIVATIONS_PER_BLOCK
        if activation_checkpointing
        else ACTIVATIONS_PER_BLOCK * config.n_layer
    )
    per_token = blocks * config.n_embd * dtype.itemsize
    return state + tokens * (per_token + 2 * _INT64)  # and the int64 inputs and targets


def generate_bytes(
    config: GPTConfig,
    *,
    batch: int,
    prompt: int,
    max_new_tokens: int,
    num_samples: int = 1,
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
) -> int:
    """Peak bytes of the tensors `sampling.generate` makes for `batch` prompts of at most
    `prompt` tokens, `num_samples` continuations of `max_new_tokens` each (module docstring)."""
    rows = _rows(batch, prompt, max_new_tokens, num_samples)
    width = min(prompt, config.block_size)
    capacity = max(min(config.block_size, width + max_new_tokens - 1), width)
    item = dtype.itemsize
    if use_cache:
        state = _cache_bytes(config, batch + rows, capacity, item)
        step = _forward_bytes(config, rows, 1, item) + _attention_bytes(config, rows, 1, capacity)
    else:
        state = 0
        step = _forward_bytes(config, rows, config.block_size, item)
        step += _attention_bytes(config, rows, config.block_size, config.block_size)
    return (
        state
        + max(_prefill_bytes(config, batch, width, item), step)
        + GENERATE_LOGITS * rows * config.vocab_size * _FP32
        + HEAD_COPIES * config.vocab_size * config.n_embd * item
        + 3 * rows * (prompt + max_new_tokens) * _INT64
    )


def beam_search_bytes(
    config: GPTConfig,
    *,
    batch: int,
    prompt: int,
    max_new_tokens: int,
    num_beams: int,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Peak bytes of the tensors `sampling.beam_search` makes for `batch` prompts of at most
    `prompt` tokens and `num_beams` beams of up to `max_new_tokens` (module docstring)."""
    rows = _rows(batch, prompt, max_new_tokens, num_beams)
    width = min(prompt, config.block_size)
    capacity = max(min(config.block_size, width + max_new_tokens - 1), width)
    item = dtype.itemsize
    step = _forward_bytes(config, rows, 1, item) + _attention_bytes(config, rows, 1, capacity)
    # Running, grown (2 * beams candidates) and finished hypotheses, and their merge.
    hypotheses = 8 * rows * max_new_tokens * _INT64
    return (
        _cache_bytes(config, batch + 2 * rows, capacity, item)
        + max(_prefill_bytes(config, batch, width, item), step)
        + BEAM_LOGITS * rows * config.vocab_size * _FP32
        + HEAD_COPIES * config.vocab_size * config.n_embd * item
        + 3 * rows * (prompt + max_new_tokens) * _INT64
        + hypotheses
    )


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes a new allocation on `device` may take now; `None` where that cannot be read.

    CUDA: the free memory `torch.cuda.mem_get_info` reports. CPU: the least of
    `MemAvailable` in `/proc/meminfo`, the room a cgroup (v2 `memory.max`, v1
    `memory.limit_in_bytes`) leaves this process's group, and the room `ulimit -v`
    (`RLIMIT_AS`) leaves this process's address space; each where there is one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    rooms = [_meminfo_available(), _cgroup_room(), _address_space_room()]
    known = [room for room in rooms if room is not None]
    return min(known) if known else None


SAMPLING_ADVICE = "ask for fewer rows, beams or tokens"
"""What `check_fits` tells a sampling request that does not fit."""


def check_fits(needed: int, device: torch.device | str, *, what: str, advice: str) -> None:
    """Raise `InsufficientMemoryError` if `needed` bytes exceed what `device` has available
    (nothing is checked where that is unknown)."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InsufficientMemoryError(
            f"{what} needs at least {_gb(needed)} of memory, more than the {_gb(free)} "
            f"available on {device}: {advice}"
        )


@contextlib.contextmanager
def allocation_errors(what: str, advice: str) -> Iterator[None]:
    """Within the block, an allocation failure becomes `InsufficientMemoryError` naming `what`."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise _out_of_memory(what, error, advice) from None
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):  # torch's CPU allocator says this
            raise
        raise _out_of_memory(what, error, advice) from None
    except MemoryError as error:
        if isinstance(error, InsufficientMemoryError):
            raise
        raise _out_of_memory(what, error, advice) from None


def _out_of_memory(what: str, error: BaseException, advice: str) -> InsufficientMemoryError:
    cause = _first_line(error) or type(error).__name__
    return InsufficientMemoryError(f"{what} ran out of memory ({cause}): {advice}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _rows(batch: int, prompt: int, max_new_tokens: int, per_prompt: int) -> int:
    check_int("batch", batch, at_least=1)
    check_int("prompt", prompt, at_least=1)
    check_int("max_new_tokens", max_new_tokens, at_least=0)
    return batch * check_int("rows per prompt", per_prompt, at_least=1)


def _cache_bytes(config: GPTConfig, rows: int, capacity: int, item: int) -> int:
    return 2 * config.n_layer * rows * capacity * config.n_embd * item


def _forward_bytes(config: GPTConfig, rows: int, seq: int, item: int) -> int:
    return rows * seq * config.n_embd * ACTIVATION_WIDTHS * item


def _attention_bytes(config: GPTConfig, rows: int, queries: int, keys: int) -> int:
    return rows * config.n_head * queries * keys * _FP32


def _prefill_bytes(config: GPTConfig, batch: int, width: int, item: int) -> int:
    return _forward_bytes(config, batch, width, item) + _attention_bytes(
        config, batch, width, width
    )


def _meminfo_available() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file's kB are KiB
    return None


def _address_space_room() -> int | None:
    """What `RLIMIT_AS` leaves of this process's address space (`VmSize` is what it holds)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(limit - int(line.split()[1]) * 1024, 0)
    except (ImportError, OSError, ValueError):
        return None
    return None


def _cgroup_room() -> int | None:
    """What this process's cgroup may still allocate, where it has a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # v2
        ("memory.limit_in_bytes", "memory.usage_in_bytes"),  # v1
    ):
        folder = _cgroup_folder(limit_file)
        if folder is None:
            continue
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None  # no limit (v1 writes a huge number for none)
        return max(int(limit) - usage, 0)
    return None


def _cgroup_folder(limit_file: str) -> Path | None:
    """The folder of this process's cgroup that holds `limit_file` (v2, or v1's memory
    controller), from `/proc/self/cgroup`."""
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        if controllers == "" or "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup") / ("" if controllers == "" else "memory")
            folder = root / path.lstrip("/")
            for candidate in (folder, root):  # a container sees its own group as the root
                if (candidate / limit_file).is_file():
                    return candidate
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
