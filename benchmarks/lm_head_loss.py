"""Benchmark: the fused LM head + cross-entropy against `F.linear` + `F.cross_entropy`.

Times forward + backward of the mean next-token loss of GPT-2's LM head (d_model 384,
vocab 50304, 2048 tokens: a 6-layer/384-wide model at block 256, batch 8) for
`gpt_fn.nn.cross_entropy.linear_cross_entropy` at several chunk sizes and for the reference
`F.cross_entropy(F.linear(h, W).float(), t)`, in fp32 and under bf16 autocast. The
implementations take turns within each repeat, so load from other processes hits them
alike; the table gives medians. Each run also checks the fused loss and gradients against
the reference, and measures how much memory one fp32 forward + backward adds at its peak
(growth of the peak resident set on CPU, `max_memory_allocated` on CUDA).

    python benchmarks/lm_head_loss.py [--quick] [--device cpu|cuda] [--threads N] [--out DIR]

On a CPU without native bf16 matmuls (no AVX512-BF16/AMX) ATen's bf16 matmul is so slow that
the reference under autocast takes minutes at 2048 tokens, so the bf16 comparison there uses
fewer tokens (the `tokens` column says how many).

`run(quick, ...)` returns the numbers as a dict (its keyword arguments set d_model, the
vocabulary and the tokens) and `markdown(result)` renders them.
"""

import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import command_line, finish
from benchmarks.timing import (
    cpu_threads,
    native_bf16,
    peak_memory_growth_mb,
    take_turns,
)
from gpt_fn.nn.cross_entropy import DEFAULT_CHUNK_SIZE, linear_cross_entropy
from gpt_fn.shapes import shape_checks

D_MODEL, VOCAB, TOKENS = 384, 50304, 2048
QUICK_TOKENS = 512


def _problem(
    tokens: int, d_model: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, d_model, generator=generator).to(device).requires_grad_()
    # GPT-2's init scale: logits of a few units, as at the start of training.
    weight = (torch.randn(vocab, d_model, generator=generator) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    return hidden, weight, targets


def _reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), t)


def _fused(chunk_size: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, w, t, chunk_size=chunk_size)

    return loss


def _step(loss_fn, hidden, weight, targets, autocast_dtype):
    """One forward + backward; returns the loss and the two gradients."""
    hidden.grad = weight.grad = None
    with torch.autocast(
        hidden.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
    ):
        loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _peak_growth_mb(loss_fn, problem: tuple[int, int, int], device: torch.device) -> float:
    """Peak memory one fp32 forward + backward adds on top of its inputs, in MB."""
    hidden, weight, targets = _problem(*problem, device)
    return peak_memory_growth_mb(lambda: _step(loss_fn, hidden, weight, targets, None), device)


def _time_case(name, loss_fns, problem, autocast_dtype, repeats, device) -> list[dict]:
    """`problem`: (tokens, d_model, vocab)."""
    hidden, weight, targets = _problem(*problem, device)
    reference = _step(_reference, hidden, weight, targets, autocast_dtype)  # also warms up
    errors = {}
    for label, loss_fn in loss_fns.items():  # warm-up and correctness
        result = _step(loss_fn, hidden, weight, targets, autocast_dtype)
        errors[label] = [
            float((a.float() - b.float()).abs().max())
            for a, b in zip(result, reference, strict=True)
        ]
    calls = {
        label: functools.partial(_step, loss_fn, hidden, weight, targets, autocast_dtype)
        for label, loss_fn in loss_fns.items()
    }
    times, cpu_times = take_turns(calls, repeats, device=device)  # turns spread outside load
    reference_ms = 1e3 * statistics.median(times["reference"])
    rows = []
    for label, samples in times.items():
        ms = 1e3 * statistics.median(samples)
        rows.append(
            {
                "case": name,
                "tokens": problem[0],
                "implementation": label,
                "median_ms": ms,
                "min_ms": 1e3 * min(samples),
                "max_ms": 1e3 * max(samples),
                "median_cpu_ms": 1e3 * statistics.median(cpu_times[label]),
                "speedup_vs_reference": reference_ms / ms,
                "max_abs_err_loss_grad_hidden_grad_weight": errors[label],
            }
        )
    return rows


def run(
    quick: bool = False,
    *,
    device: str = "cpu",
    threads: int | None = 2,
    d_model: int = D_MODEL,
    vocab: int = VOCAB,
    tokens: int | None = None,
) -> dict:
    """Time every implementation in fp32 and under bf16 autocast; the results as a dict.

    `tokens` defaults to `TOKENS` (quick: `QUICK_TOKENS`); the bf16 case uses at most 128
    (quick: 32) where bf16 is not native. `threads` sets torch's intra-op CPU threads for the
    run (2 by default); `None` keeps torch's setting.
    """
    dev = torch.device(device)
    chunk_sizes = [DEFAULT_CHUNK_SIZE] if quick else [128, 256, 512, 1024, 2048]
    fused = {f"fused, chunk {c}": _fused(c) for c in chunk_sizes}
    repeats = 3 if quick else 7
    fp32_tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    bf16_tokens = fp32_tokens if native_bf16(dev) else min(fp32_tokens, 32 if quick else 128)
    rows = []
    with cpu_threads(threads), shape_checks(False):
        threads_used = torch.get_num_threads()
        fp32_problem = (fp32_tokens, d_model, vocab)
        rows += _time_case(
            "fp32", {"reference": _reference, **fused}, fp32_problem, None, repeats, dev
        )
        for row, loss_fn in zip(rows, [_reference, *fused.values()], strict=True):
            row["peak_growth_mb"] = _peak_growth_mb(loss_fn, fp32_problem, dev)
        bf16_fns = {
            "reference": _reference,
            f"fused, chunk {DEFAULT_CHUNK_SIZE}": _fused(DEFAULT_CHUNK_SIZE),
        }
        rows += _time_case(
            "bf16 autocast",
            bf16_fns,
            (bf16_tokens, d_model, vocab),
            torch.bfloat16,
            1 if quick else 3,
            dev,
        )
    return {
        "benchmark": "lm_head_loss",
        "device": device,
        "threads": threads_used,
        "torch": torch.__version__,
        "d_model": d_model,
        "vocab": vocab,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        f"LM head + cross-entropy, forward + backward: d_model {results['d_model']}, "
        f"vocab {results['vocab']}, {results['device']}, {results['threads']} threads, "
        f"torch {results['torch']}. Wall-clock median of repeats (min-max); CPU ms is the "
        "median process CPU time (all threads), less sensitive to other processes' load.",
        "",
        "| case | tokens | implementation | ms | CPU ms | speed-up vs reference "
        "| peak memory added (MB) | max abs err (loss, dh, dW) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in results["rows"]:
        memory = f"{row['peak_growth_mb']:.0f}" if "peak_growth_mb" in row else "-"
        errors = ", ".join(f"{e:.1e}" for e in row["max_abs_err_loss_grad_hidden_grad_weight"])
        lines.append(
            f"| {row['case']} | {row['tokens']} | {row['implementation']} | "
            f"{row['median_ms']:.0f} ({row['min_ms']:.0f}-{row['max_ms']:.0f}) | "
            f"{row['median_cpu_ms']:.0f} | "
            f"{row['speedup_vs_reference']:.2f}x | {memory} | {errors} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = command_line(
        "lm_head_loss", __doc__, quick="fewer tokens, repeats, chunk sizes", threads=2
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args.quick, device=args.device, threads=args.threads)
    finish("lm_head_loss", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
