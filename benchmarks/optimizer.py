"""Time one AdamW update: gpt_fn's in-place `update_` against `torch.optim.AdamW(foreach=True)`.

Both update the parameters of the same 6-layer, 384-wide GPT (30M parameters, nanoGPT's
"baby GPT" widths with GPT-2's padded vocabulary) with the same gradients and nanoGPT's
hyperparameters and decay groups. Timings alternate between the two in one process, so drift
in a shared machine's load hits both alike; the figure is the median over repeats after warmup.

    python benchmarks/optimizer.py [--quick] [--device cpu|cuda] [--out DIR]

`run(quick)` returns the numbers as a dict and `markdown(result)` renders them, for a runner
that collects every benchmark.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gpt_fn
from gpt_fn import optim
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384)
HYPERPARAMETERS = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LR = 6e-4


def run(quick: bool = False, *, device: str | None = None, threads: int | None = None) -> dict:
    """Median milliseconds of one update for each optimizer, and ours / torch's.

    `threads` sets torch's intra-op CPU threads (on a shared machine, fewer threads than
    cores keeps the two contenders from being preempted mid-update).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    warmup, repeats = (2, 7) if quick else (5, 41)
    params = gpt_fn.init_params(CONFIG, seed=0, device=device)
    generator = torch.Generator().manual_seed(1)
    grads = {
        name: (1e-3 * torch.randn(p.shape, generator=generator)).to(device)
        for name, p in params.items()
    }

    opt = optim.adamw(LR, **HYPERPARAMETERS)
    ours_params = {name: p.clone() for name, p in params.items()}
    ours_state = opt.init(ours_params)

    leaves = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    for name, leaf in leaves.items():
        leaf.grad = grads[name].clone()
    mask = optim.default_decay_mask(params)
    groups = [
        {
            "params": [leaves[n] for n in leaves if mask[n]],
            "weight_decay": HYPERPARAMETERS["weight_decay"],
        },
        {"params": [leaves[n] for n in leaves if not mask[n]], "weight_decay": 0.0},
    ]
    reference = torch.optim.AdamW(
        groups, lr=LR, betas=HYPERPARAMETERS["betas"], eps=HYPERPARAMETERS["eps"], foreach=True
    )

    contenders: dict[str, Callable[[], object]] = {
        "gpt_fn adamw update_": lambda: opt.update_(grads, ours_state, ours_params),
        "torch.optim.AdamW(foreach=True)": reference.step,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with shape_checks(False):
        for repeat in range(warmup + repeats):
            # Alternate who goes first so neither always runs on a warmer cache.
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                elapsed = _time_once(contenders[name], device)
                if repeat >= warmup:
                    times[name].append(elapsed)

    ours, theirs = (statistics.median(times[name]) * 1e3 for name in contenders)
    return {
        "benchmark": "optimizer",
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in params.values()),
        "n_tensors": len(params),
        "warmup": warmup,
        "repeats": repeats,
        "median_ms": {"gpt_fn adamw update_": ours, "torch.optim.AdamW(foreach=True)": theirs},
        "min_ms": {name: min(t) * 1e3 for name, t in times.items()},
        "ratio": ours / theirs,
    }


def _time_once(update: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    update()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    """A small table of the medians, and the ratio."""
    lines = [
        f"One AdamW update, {result['n_params'] / 1e6:.1f}M params in {result['n_tensors']} tensors, "
        f"{result['device']}, torch {result['torch']}, {result['threads']} threads, "
        f"median of {result['repeats']} after {result['warmup']} warmup",
        "",
        "| optimizer | median ms | min ms |",
        "| --- | ---: | ---: |",
    ]
    for name, median in result["median_ms"].items():
        lines.append(f"| {name} | {median:.2f} | {result['min_ms'][name]:.2f} |")
    lines += ["", f"ratio gpt_fn / torch: **{result['ratio']:.3f}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write optimizer.json and .md here")
    args = parser.parse_args(argv)
    result = run(args.quick, device=args.device, threads=args.threads)
    table = markdown(result)
    print(table, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "optimizer.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "optimizer.md").write_text(table)


if __name__ == "__main__":
    main()
