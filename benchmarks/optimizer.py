"""Time one AdamW update: gpt_fn's in-place `update_` against `torch.optim.AdamW(foreach=True)`.

Both update the parameters of the same 6-layer, 384-wide GPT (30M parameters, nanoGPT's
"baby GPT" widths with GPT-2's padded vocabulary) with the same gradients and nanoGPT's
hyperparameters and decay groups. Timings alternate between the two in one process, so drift
in a shared machine's load hits both alike; the figure is the median over repeats after warmup.

    python benchmarks/optimizer.py [--quick] [--device cpu|cuda] [--out DIR]

`run(quick, ...)` returns the numbers as a dict (`config=` sets the model whose parameters are
updated) and `markdown(result)` renders them, for a runner that collects every benchmark.
"""

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import optim
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384)
HYPERPARAMETERS = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LR = 6e-4


def run(
    quick: bool = False,
    *,
    device: str | None = None,
    threads: int | None = None,
    config: gpt_fn.GPTConfig = CONFIG,
) -> dict:
    """Median milliseconds of one update of `config`'s parameters for each optimizer, and
    ours / torch's.

    `threads` sets torch's intra-op CPU threads for the run (on a shared machine, fewer
    threads than cores keeps the two contenders from being preempted mid-update).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with cpu_threads(threads):
        return _run(quick, torch.device(device), config)


def _run(quick: bool, device: torch.device, config: gpt_fn.GPTConfig) -> dict:
    warmup, repeats = (2, 7) if quick else (5, 41)
    params = gpt_fn.init_params(config, seed=0, device=device)
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
    with shape_checks(False):
        # Taking turns, so neither always runs on a warmer cache.
        timings = take_turns(contenders, warmup + repeats, device=device)
    times = {name: samples[warmup:] for name, samples in timings.seconds.items()}

    ours, theirs = (statistics.median(times[name]) * 1e3 for name in contenders)
    return {
        "benchmark": "optimizer",
        "device": str(device),
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
    parser = command_line("optimizer", __doc__, quick="few repeats: a smoke run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args(argv)
    result = run(args.quick, device=args.device, threads=args.threads)
    finish("optimizer", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
