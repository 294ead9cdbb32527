"""How every benchmark times its contenders: in turns, device synchronised, on set CPU threads.

- `take_turns`: each round calls every contender once, and who goes first rotates from round
  to round, so the drifting load of other processes on a shared machine hits all of them
  alike; the callers take medians over the rounds after warm-up.
- `sync`: CUDA runs kernels asynchronously; a clock read after `sync` has timed them.
- `cpu_threads`: torch's intra-op CPU threads for one benchmark run, restored afterwards, so
  the order in which benchmarks run does not change their figures.
- `DTYPES`, `check_dtypes`: the dtypes a benchmark may run in, by the names of `--dtypes`.
- `peak_memory_growth_mb`: how far memory rises while a call runs (CUDA's allocator peak, or
  the CPU process's peak resident set).
- `saved_for_backward_bytes`: what autograd keeps for backward (activation memory).
- `native_bf16`: whether bf16 matmuls run natively. Where they do not (a CPU without
  AVX512-BF16/AMX), ATen's fallback runs at a few GFLOP/s, ~50x slower than fp32, and the
  benchmarks shrink or skip their bf16 cases.
"""

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_dtypes(names: Sequence[str]) -> None:
    """Raise `ValueError` naming any of `names` that is not a key of `DTYPES`."""
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (every CUDA GPU we target does)."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def sync(device: torch.device) -> None:
    """Wait until `device` has run every queued kernel (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` inside the block and restored after it.

    `None` leaves the count as it is (each benchmark's own default decides).
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Timings(NamedTuple):
    """Per contender, one entry per round, in call order (warm-up rounds included)."""

    seconds: dict[str, list[float]]  # wall clock
    cpu_seconds: dict[str, list[float]]  # this process's CPU time, all threads


def take_turns(
    contenders: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    device: torch.device,
    record: Callable[[str, Any], None] | None = None,
) -> Timings:
    """Call every contender once per round for `rounds` rounds and time each call.

    Round `r` starts with contender `r % len(contenders)` (rotation: none always runs right
    after the same neighbour). The device is synchronised before the clock starts and before
    it stops. `record(name, output)` sees each call's output after its clock has stopped.
    """
    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            # The CPU clock is read outside the wall clock's interval, which it would lengthen.
            cpu_start = time.process_time()
            start = time.perf_counter()
            output = contenders[name]()
            sync(device)
            end = time.perf_counter()
            cpu_seconds[name].append(time.process_time() - cpu_start)
            seconds[name].append(end - start)
            if record is not None:
                record(name, output)
            del output  # the next contender runs without this one's output alive
    return Timings(seconds, cpu_seconds)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise KeyError(field)


def peak_memory_growth_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """How far memory rises above where it stood while `fn()` runs, in MB (NaN if unknown).

    CUDA: the allocator's peak over what was allocated before. CPU: the peak resident set
    (VmHWM, reset through /proc/self/clear_refs) over the resident set before (Linux only).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return float("nan")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def saved_for_backward_bytes(fn: Callable[[], Any], own: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` runs its forward (each
    storage once, the tensors `own` (the params) left out)."""
    storages: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in own}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())
