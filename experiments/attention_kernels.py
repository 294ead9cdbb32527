"""Train the same GPT with each attention kernel: same curve? which is faster?

Question: gpt_fn has two attention kernels behind one keyword, `attention="sdpa"`
(`torch.nn.functional.scaled_dot_product_attention`) and `attention="manual"` (einops scores,
explicit causal mask, softmax). They compute the same function up to fp32 rounding. Over a
whole training run, does that rounding stay small (the curves overlay), and what does each
kernel cost?

Method: two runs of the real training loop, `gpt_fn.train.train`, identical in everything
(seed, init, batches, schedule, clipping) but `TrainSettings(attention=...)`, on the offline
Shakespeare corpus in fp32. Their per-step train losses and val losses are compared, and their
median tokens/s taken from the loop's own metrics. The runs go one after the other, so a
shared machine's changing load can tilt that comparison; a second measurement therefore times
the attention layer alone (`gpt_fn.nn.attention`, forward + backward at the run's shapes), the
kernels alternating, medians over repeats.

    python experiments/attention_kernels.py [--quick] [--steps S] [--seed N] [--threads N]
                                            [--out DIR] [--data-dir DIR]

Writes `attention_kernels.png` (losses overlaid, their difference, speed), `results.json`, and
each run's own folder (`sdpa/`, `manual/`: metrics.jsonl, loss.png, checkpoint) to `--out`
(default `experiments/out/attention_kernels/`).
"""

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn.nn import AttentionKernel, self_attention
from gpt_fn.rundir import read_metrics
from gpt_fn.settings import TrainSettings
from gpt_fn.shapes import shape_checks
from gpt_fn.train import train

NAME = "attention_kernels"
KERNELS: tuple[AttentionKernel, ...] = ("sdpa", "manual")


def train_with(kernel: AttentionKernel, settings: TrainSettings, out: Path) -> dict[str, Any]:
    """One training run with `kernel`; its per-step metrics and summary."""
    run_settings = dataclasses.replace(settings, attention=kernel, out_dir=str(out / kernel))
    summary = train(run_settings, log=lambda *args, **kwargs: None)
    records = read_metrics(out / kernel / "metrics.jsonl")
    return {
        "loss": [r["loss"] for r in records],
        "val_steps": [r["step"] + 1 for r in records if "val_loss" in r],
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
        "tokens_per_s_median": summary["tokens_per_s_median"],
    }


def time_attention_layer(
    config: gpt_fn.GPTConfig, batch_size: int, repeats: int, seed: int
) -> dict[AttentionKernel, float]:
    """Median ms of one attention layer's forward + backward per kernel, kernels alternating."""
    generator = torch.Generator().manual_seed(seed)
    d = config.n_embd
    layer = {
        "c_attn.weight": 0.02 * torch.randn(3 * d, d, generator=generator),
        "c_attn.bias": torch.zeros(3 * d),
        "c_proj.weight": 0.02 * torch.randn(d, d, generator=generator),
        "c_proj.bias": torch.zeros(d),
    }
    layer = {name: value.requires_grad_() for name, value in layer.items()}
    x = torch.randn(batch_size, config.block_size, d, generator=generator, requires_grad=True)
    seconds: dict[AttentionKernel, list[float]] = {kernel: [] for kernel in KERNELS}
    for repeat in range(repeats + 1):  # repeat 0 is warmup
        for kernel in KERNELS if repeat % 2 == 0 else KERNELS[::-1]:
            start = time.perf_counter()
            out, _ = self_attention(layer, x, n_head=config.n_head, attention=kernel)
            out.square().mean().backward()
            if repeat:
                seconds[kernel].append(time.perf_counter() - start)
    return {kernel: 1e3 * statistics.median(times) for kernel, times in seconds.items()}


def plot(result: dict[str, Any], path: Path) -> None:
    runs = result["runs"]
    colors = {"sdpa": "C0", "manual": "C1"}
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    fig = Figure(figsize=(12, 8))
    (curves, difference), (training, layer) = fig.subplots(2, 2)
    for kernel, style in zip(KERNELS, ("-", "--"), strict=True):
        loss = runs[kernel]["loss"]
        curves.plot(
            range(1, len(loss) + 1),
            loss,
            style,
            color=colors[kernel],
            lw=1.2,
            label=f"{kernel} train",
        )
        curves.plot(
            runs[kernel]["val_steps"],
            runs[kernel]["val_loss"],
            "o" + style,
            color=colors[kernel],
            ms=5,
            label=f"{kernel} val",
        )
    curves.set(xlabel="step", ylabel="loss (nats/token)", title="the same run, two kernels")
    curves.legend()
    diff = np.abs(np.array(runs["sdpa"]["loss"]) - np.array(runs["manual"]["loss"]))
    # Exact zeros have no place on a log axis; plot them at 1e-9, below fp32's resolution here.
    difference.semilogy(range(1, len(diff) + 1), np.maximum(diff, 1e-9), color="k")
    difference.set(
        xlabel="step",
        ylabel="|loss sdpa - loss manual| (0 drawn at 1e-9)",
        title="train loss difference (fp32)",
    )
    bars = training.bar(
        KERNELS,
        [runs[kernel]["tokens_per_s_median"] for kernel in KERNELS],
        color=[colors[k] for k in KERNELS],
    )
    training.bar_label(bars, fmt="%.0f")
    training.set(ylabel="tokens/s (median step)", title="whole training step")
    bars = layer.bar(
        KERNELS,
        [result["attention_layer_ms"][kernel] for kernel in KERNELS],
        color=[colors[k] for k in KERNELS],
    )
    layer.bar_label(bars, fmt="%.2f")
    layer.set(ylabel="ms (median, kernels alternating)", title="attention layer forward + backward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(NAME, __doc__, quick="a tiny model for 4 steps: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 100)")
    args = conventions.start(parser, argv)
    common = dict(
        data="shakespeare",
        data_dir=str(args.data_dir),
        preset="cpu-tiny",
        autocast_dtype="float32",
        device="cpu",
        compile=False,
        sample_tokens=0,
        seed=args.seed,
    )
    if args.quick:
        sizes = dict(**conventions.QUICK_SHAPE, batch_size=2, eval_batches=1)
        steps, repeats = 4, 3
    else:
        sizes = dict(n_layer=2, n_embd=64, block_size=128, batch_size=8, eval_batches=4)
        steps, repeats = 100, 30
    steps = args.steps if args.steps is not None else steps
    settings = TrainSettings(
        **common,
        **sizes,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        eval_interval=max(1, steps // 4),
        overwrite=True,  # a rerun regenerates the experiment's runs
    )
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {kernel: train_with(kernel, settings, args.out) for kernel in KERNELS}
    with shape_checks(False):  # timed code runs unchecked (gpt_fn.shapes)
        layer_ms = time_attention_layer(
            settings.model_config(), settings.batch_size, repeats, args.seed
        )
    loss_diff = np.abs(np.array(runs["sdpa"]["loss"]) - np.array(runs["manual"]["loss"]))
    val_diff = np.abs(np.array(runs["sdpa"]["val_loss"]) - np.array(runs["manual"]["val_loss"]))
    result = {
        "settings": dataclasses.asdict(settings),
        "config": settings.model_config().to_dict(),
        "runs": runs,
        "max_abs_train_loss_diff": float(loss_diff.max()),
        "first_step_loss_diff": float(loss_diff[0]),
        "max_abs_val_loss_diff": float(val_diff.max()),
        "attention_layer_ms": layer_ms,
        "manual_over_sdpa_tokens_per_s": runs["manual"]["tokens_per_s_median"]
        / runs["sdpa"]["tokens_per_s_median"],
    }
    print(
        f"max |train loss sdpa - manual| over {steps} steps: {result['max_abs_train_loss_diff']:.2e} "
        f"(first step {result['first_step_loss_diff']:.2e}); val: {result['max_abs_val_loss_diff']:.2e}"
    )
    for kernel in KERNELS:
        print(
            f"{kernel:6s}: {runs[kernel]['tokens_per_s_median']:.0f} training tokens/s, "
            f"attention layer fwd+bwd {layer_ms[kernel]:.2f} ms"
        )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
