"""Where and how a process computes: its device, autocast dtype and place in a process group.

`resolve_device("auto" | "cpu" | "cuda" | "cuda:1" | ...)` and `resolve_dtype` turn what a
user wrote into a device and dtype, or a `ValueError` that says why not (a CUDA device on a
torch without CUDA, a device index that does not exist), before anything is allocated there.
`distributed()` joins the process group torchrun set up (nccl on CUDA, gloo on CPU).
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs: device, autocast dtype, DDP rank."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


CPU_FP32 = Runtime(device=torch.device("cpu"), dtype=torch.float32)
"""One process on the CPU in fp32: what experiments and tests run."""


def resolve_device(spec: str, *, local_rank: int = 0) -> torch.device:
    """The device `spec` names: `auto` is CUDA (this process's local rank) when present, else CPU.

    Raises `ValueError` naming the problem for a malformed name, a CUDA or MPS device this
    machine or this torch build lacks, or a CUDA index beyond the visible devices.
    """
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a build without CUDA" if torch.version.cuda is None else "no CUDA device"
            raise ValueError(
                f"device {spec!r}: CUDA is not available (torch {torch.__version__}, {build}); "
                "use --device cpu"
            )
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r}: there are {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {spec!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {spec!r}: gpt_fn runs on cpu, cuda or mps")
    return device


def resolve_dtype(spec: str, device: torch.device) -> str:
    """The autocast dtype's name: `auto` is bfloat16 on CUDA (where supported), else float32."""
    if spec != "auto":
        if spec not in DTYPES:
            raise ValueError(f"unknown dtype {spec!r}; choose one of auto, {', '.join(DTYPES)}")
        return spec
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def make_runtime(device: torch.device, dtype: str, rank: int = 0, world_size: int = 1) -> Runtime:
    """A `Runtime`, with CUDA set up for it (this process's device, TF32 matmuls)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, dtype=DTYPES[dtype], rank=rank, world_size=world_size)


@contextlib.contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """(rank, world_size): a process group under torchrun (WORLD_SIZE > 1), else (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
