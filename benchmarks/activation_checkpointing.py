"""Activation checkpointing: a training step's peak memory and time with and without it.

A step is `gpt_fn.GPT(config, checkpoint_blocks=...)(x, y).backward()` (forward with targets
through the fused LM head + cross-entropy, then backward; no optimizer, whose cost is the same
either way), fp32, dropout off, on the train-step benchmark's model (6 layers, 384 wide,
6 heads, GPT-2's padded vocabulary 50304) at its block of 256 tokens and batch 8, and on the
same model with a 1024-token block at batch 2 (the same tokens per step; attention's share
grows with the block). Both contenders start from the same weights and batch; their losses and
gradients must agree (reported).

Memory is the peak a step adds above what was allocated before it, measured on a process's
first step in a process of its own (a fresh child per contender and case, so no allocator
cache from an earlier step hides or adds memory): on CUDA the allocator's peak, on a CPU the
peak resident set (VmHWM) over the resident set before the step. It counts the gradients
(the same for both), allocator and library workspaces and the activations; the activations
autograd keeps for backward, what checkpointing cuts, are also reported on their own
(`benchmarks.timing.saved_for_backward_bytes`). Time is
the median of repeats in this process, the contenders taking turns.

    python benchmarks/activation_checkpointing.py [--quick] [--device cpu|cuda] [--threads N]
                                                  [--out DIR]
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import command_line, finish
from benchmarks.timing import (
    cpu_threads,
    peak_memory_growth_mb,
    saved_for_backward_bytes,
    take_turns,
)
from gpt_fn import GPT, GPTConfig
from gpt_fn.shapes import shape_checks

CONFIG = GPTConfig(vocab_size=50304, block_size=1024, n_layer=6, n_head=6, n_embd=384)
CASES = ((256, 8), (1024, 2))
"""(block, batch) pairs: the train-step benchmark's shape, and a longer block."""
QUICK_CONFIG = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64)
QUICK_CASES = ((32, 4), (128, 1))


def _step(module: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    loss = module(x, y)
    loss.backward()
    return loss.detach()


def _case(config: GPTConfig, block: int, batch: int, repeats: int, device: torch.device) -> dict:
    plain = GPT(config, seed=0, device=device)
    recomputed = GPT.from_params(
        {k: v.detach().clone() for k, v in plain.params().items()},
        config,
        checkpoint_blocks=True,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, block + 1), generator=generator).to(device)
    x, y = x[:, :-1], x[:, 1:]
    modules = {"plain": plain, "checkpointed": recomputed}
    losses = {name: _step(module, x, y) for name, module in modules.items()}  # also warms up
    grads = {name: [p.grad for p in m.parameters()] for name, m in modules.items()}
    grad_err = max(
        (a - b).abs().max().item()
        for a, b in zip(grads["plain"], grads["checkpointed"], strict=True)
    )
    memory = {
        name: _first_step_growth_in_child(config, block, batch, name == "checkpointed", device)
        for name in modules
    }
    kept = {
        name: saved_for_backward_bytes(lambda m=module: m(x, y), list(module.parameters())) / 2**20
        for name, module in modules.items()
    }
    timings = take_turns(
        {name: (lambda m=module: _step(m, x, y)) for name, module in modules.items()},
        repeats,
        device=device,
    )
    ms = {name: 1000 * statistics.median(times) for name, times in timings.seconds.items()}
    return {
        "block": block,
        "batch": batch,
        "peak_growth_mb": memory,
        "saved_for_backward_mb": kept,
        "median_ms": ms,
        # A toy step may add nothing measurable to the resident set: no ratio then.
        "memory_ratio": memory["checkpointed"] / memory["plain"] if memory["plain"] > 0 else None,
        "time_ratio": ms["checkpointed"] / ms["plain"],
        "loss_difference": (losses["plain"] - losses["checkpointed"]).abs().item(),
        "max_grad_difference": grad_err,
    }


_CHILD = """
import json, sys
import torch
from benchmarks.activation_checkpointing import first_step_growth_mb
from gpt_fn import GPTConfig
from gpt_fn.shapes import shape_checks
config, block, batch, checkpoint, device = json.loads(sys.argv[1])
torch.set_num_threads(1)
with shape_checks(False):
    print(first_step_growth_mb(GPTConfig(**config), block, batch, checkpoint, torch.device(device)))
"""


def first_step_growth_mb(
    config: GPTConfig, block: int, batch: int, checkpoint: bool, device: torch.device
) -> float:
    """Peak memory the first training step of a new `GPT` adds, in MB (run it in a fresh process)."""
    module = GPT(config, seed=0, device=device, checkpoint_blocks=checkpoint)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, block + 1), generator=generator).to(device)
    return peak_memory_growth_mb(lambda: _step(module, x[:, :-1], x[:, 1:]), device)


def _first_step_growth_in_child(
    config: GPTConfig, block: int, batch: int, checkpoint: bool, device: torch.device
) -> float:
    arguments = json.dumps([config.to_dict(), block, batch, checkpoint, str(device)])
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, arguments],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    return float(done.stdout.strip().splitlines()[-1])


def run(
    quick: bool = False,
    *,
    device: str = "cpu",
    threads: int | None = 1,
    config: GPTConfig | None = None,
    cases: tuple[tuple[int, int], ...] | None = None,
) -> dict:
    """Both contenders on each (block, batch) case; the figures as a dict."""
    config = config or (QUICK_CONFIG if quick else CONFIG)
    cases = cases or (QUICK_CASES if quick else CASES)
    dev = torch.device(device)
    with cpu_threads(threads), shape_checks(False):
        threads_used = torch.get_num_threads()
        rows = [_case(config, block, batch, 3 if quick else 5, dev) for block, batch in cases]
    return {
        "benchmark": "activation_checkpointing",
        "device": device,
        "threads": threads_used,
        "torch": torch.__version__,
        "config": config.to_dict(),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Activation checkpointing, one fp32 training step (forward + backward): "
        f"{c['n_layer']} layers, {c['n_embd']} wide, vocab {c['vocab_size']}, "
        f"{result['device']}, {result['threads']} threads, torch {result['torch']}. Peak memory "
        "is what a step adds above what was allocated before it; time is the median of repeats.",
        "",
        "| block x batch | kept for backward MB plain | checkpointed | peak MB plain "
        "| peak MB checkpointed | memory ratio | ms plain | ms checkpointed | time ratio "
        "| max grad difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        memory, ms, kept = row["peak_growth_mb"], row["median_ms"], row["saved_for_backward_mb"]
        lines.append(
            f"| {row['block']} x {row['batch']} | {kept['plain']:.0f} | "
            f"{kept['checkpointed']:.0f} | {memory['plain']:.0f} | "
            f"{memory['checkpointed']:.0f} | {_ratio(row['memory_ratio'])} | {ms['plain']:.0f} | "
            f"{ms['checkpointed']:.0f} | {row['time_ratio']:.2f} | "
            f"{row['max_grad_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = command_line(
        "activation_checkpointing", __doc__, quick="a 2-layer, 64-wide model", threads=1
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args.quick, device=args.device, threads=args.threads)
    finish("activation_checkpointing", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
