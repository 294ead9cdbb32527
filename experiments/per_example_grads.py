"""Per-example gradients: one `vmap(grad(loss))` against a Python loop of `grad`, on Shakespeare.

Question. Per-example gradient norms (DP-SGD's clipping, gradient-noise scale, finding the
examples that dominate an update) need one gradient per example, not the batch mean's.
Because gpt_fn's loss is a pure function of a param dict, `optim.per_example_grads` gets
them all with one `torch.func.vmap` of `torch.func.grad`. Are they exactly the loop's, and
how much faster is one vmapped call than a loop of single-example gradients?

Setup. `cpu-tiny` (2 layers, 64 wide, block 64, GPT-2's padded vocabulary) at its init, a
batch of 16 windows of 64 tokens from the offline Shakespeare corpus. Contenders, taking
turns: `optim.per_example_grads(loss_fn, params, x, y)` and a loop of
`torch.func.grad(loss_fn)(params, x[i], y[i])`, with each attention kernel (SDPA's CPU flash
kernel has no vmap batching rule, so vmap runs it as a loop internally; the manual kernel is
plain batched matmuls). Reported: the largest difference of any gradient entry and of the
norms between the two, and the median time of each.

    python experiments/per_example_grads.py            # ~1 CPU minute
    python experiments/per_example_grads.py --quick    # a smoke run

Writes `per_example_grads.png` (each example's gradient norm, the timings) and
`results.json` into `--out`.
"""

import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn import data, optim
from gpt_fn.shapes import shape_checks

NAME = "per_example_grads"
KERNELS = ("sdpa", "manual")


def compare(
    params: gpt_fn.Params,
    x: torch.Tensor,
    y: torch.Tensor,
    config: gpt_fn.GPTConfig,
    attention: str,
    repeats: int,
) -> dict[str, Any]:
    """Both ways' gradients and norms, their largest differences, and median seconds."""

    def example_loss(p: gpt_fn.Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return gpt_fn.loss(p, xi[None], yi[None], config, attention=attention)

    def vmapped() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return optim.per_example_grads(example_loss, params, x, y)

    def looped() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        grads = [torch.func.grad(example_loss)(params, x[i], y[i]) for i in range(len(x))]
        stacked = {name: torch.stack([g[name] for g in grads]) for name in params}
        return stacked, torch.stack([optim.global_norm(g) for g in grads])

    seconds: dict[str, list[float]] = {"vmap(grad)": [], "loop of grad": []}
    results = {}
    for repeat in range(repeats + 1):  # the first round warms up
        order = list(seconds) if repeat % 2 == 0 else list(seconds)[::-1]
        for name in order:
            start = time.perf_counter()
            results[name] = (vmapped if name == "vmap(grad)" else looped)()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    (vg, vn), (lg, ln) = results["vmap(grad)"], results["loop of grad"]
    median = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        "max_abs_grad_diff": max(float((vg[k] - lg[k]).abs().max()) for k in params),
        "max_abs_norm_diff": float((vn - ln).abs().max()),
        "norms": vn.tolist(),
        "seconds": median,
        "speedup": median["loop of grad"] / median["vmap(grad)"],
    }


def run(quick: bool, seed: int, data_dir: Path) -> dict[str, Any]:
    if quick:
        config = gpt_fn.GPTConfig.from_preset("cpu-tiny", **conventions.QUICK_SHAPE)
        batch, repeats = 4, 1
    else:
        config = gpt_fn.GPTConfig.from_preset("cpu-tiny")
        batch, repeats = 16, 5
    train_tokens, _ = conventions.shakespeare(data_dir, block_size=config.block_size)
    x, y = data.get_batch(
        train_tokens, batch_size=batch, block_size=config.block_size, seed=seed, step=0
    )
    params = gpt_fn.init_params(config, seed=seed)
    with shape_checks(False), warnings.catch_warnings():
        # SDPA's CPU flash kernel has no vmap batching rule: torch loops and says so.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        kernels = {k: compare(params, x, y, config, k, repeats) for k in KERNELS}
    return {
        "config": config.to_dict(),
        "batch": batch,
        "seq": config.block_size,
        "repeats": repeats,
        "kernels": kernels,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    norms = result["kernels"]["manual"]["norms"]
    axes[0].bar(range(len(norms)), norms)
    axes[0].set(xlabel="example", ylabel="gradient L2 norm", title="per-example gradient norms")
    names = ["vmap(grad)", "loop of grad"]
    for offset, kernel in enumerate(KERNELS):
        seconds = [result["kernels"][kernel]["seconds"][n] for n in names]
        axes[1].bar([i * 3 + offset for i in range(2)], seconds, label=kernel)
    axes[1].set_xticks([0.5, 3.5], names)
    axes[1].set(
        ylabel="seconds for the batch", title=f"{result['batch']} examples x {result['seq']} tokens"
    )
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(NAME, __doc__, quick="a tiny model, 4 examples: a smoke run")
    args = conventions.start(parser, argv)
    result = run(args.quick, args.seed, args.data_dir)
    for kernel, entry in result["kernels"].items():
        print(
            f"{kernel}: max |grad diff| {entry['max_abs_grad_diff']:.1e}, max |norm diff| "
            f"{entry['max_abs_norm_diff']:.1e}; vmap {entry['seconds']['vmap(grad)']:.2f} s, loop "
            f"{entry['seconds']['loop of grad']:.2f} s: {entry['speedup']:.2f}x"
        )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
