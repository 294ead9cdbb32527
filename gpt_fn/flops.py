"""Model FLOPs per token, peak FLOP/s per device, and model FLOPs utilisation (MFU).

One formula everywhere (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT `estimate_mfu`):
a training token costs `6 N + 12 L H Q T` FLOPs for forward + backward, with N the parameters
that do matmul work (all but the position embeddings; the tied `wte` counts once, as the LM
head), L layers, H heads, Q head size, T the sequence length. MFU is achieved model FLOP/s over
the device's peak: datasheet dense peaks for GPUs, a measured matmul peak for CPUs.
"""

import functools
import time

import torch

from gpt_fn.config import GPTConfig
from gpt_fn.model import param_shapes

# Dense (no sparsity) datasheet peaks, FLOP/s, for the SXM parts.
GPU_PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
}


def matmul_params(config: GPTConfig) -> int:
    """N in the formula: every parameter except the position embeddings."""
    return sum(
        _numel(shape) for name, shape in param_shapes(config).items() if name != "wpe.weight"
    )


def train_flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Forward + backward FLOPs of one token in a sequence of `seq_len`."""
    attention = 12 * config.n_layer * config.n_head * config.d_head * seq_len
    return 6 * matmul_params(config) + attention


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float:
    """Peak FLOP/s of `device` for matmuls in `dtype`: datasheet for known GPUs, else measured."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, peaks in GPU_PEAK_FLOPS.items():
            if part in name and dtype in peaks:
                return peaks[dtype]
    measured = measured_matmul_flops(str(device), dtype)
    if dtype != torch.float32:
        # Without native bf16/fp16 kernels a CPU emulates them at ~1 GFLOP/s while many of the
        # model's ops still run at fp32 speed: the device's best matmul rate is the honest peak.
        return max(measured, measured_matmul_flops(str(device), torch.float32))
    return measured


@functools.cache
def measured_matmul_flops(device: str, dtype: torch.dtype, size: int = 1024) -> float:
    """Best of up to ten square `size` matmuls within about a second: this device's practical peak.

    Best-of-many tolerates a briefly busy machine; the time budget keeps dtypes without fast
    kernels (bf16 on CPUs without AVX512-BF16/AMX: ~1 GFLOP/s) from stalling start-up.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, spent = float("inf"), 0.0
    for _ in range(10):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > 1.0:
            break
    return 2 * size**3 / best


def mfu(tokens_per_second: float, config: GPTConfig, seq_len: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s as a fraction of `peak`."""
    return tokens_per_second * train_flops_per_token(config, seq_len) / peak


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
