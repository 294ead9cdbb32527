"""A sweep of learning-rate schedule shapes on the Shakespeare corpus, same budget, same peak.

Question: with the number of steps and the peak learning rate fixed, how much does the *shape*
of the schedule matter for the val loss at the end: constant, warmup then constant, warmup then
cosine decay, warmup then linear decay, warmup-stable-decay (a constant plateau and a short
linear cool-down at the end), cosine without warmup?

Method: every schedule is a pure function `step -> lr` built from `gpt_fn.optim`'s pieces
(`constant`, `linear_warmup`, `cosine_decay`, `warmup_cosine`, composed with `join`), plus one
piece written here, `linear_decay`: a schedule is just a function, so a user-written piece
joins like a built-in one. For a seed, every schedule starts from the same init
(`gpt_fn.init_params(seed)`) and sees the same batches (`gpt_fn.data.get_batch(seed, step)`),
so the schedule is the only difference; `--seeds N` repeats the sweep from N seeds to show how
much of a difference is noise. Each step is `gpt_fn.train.train_step` (gradient clipping at 1.0, in-place AdamW
with weight decay 0.1) with `gpt_fn.optim.adamw(schedule)`. Val loss is measured on the same
fixed batches by `gpt_fn.train.evaluate` at regular steps. fp32 on CPU.

References: Loshchilov & Hutter 2017 (SGDR, cosine); Goyal et al. 2017 (linear warmup);
Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations" and Hu et al. 2024 (MiniCPM) for warmup-stable-decay; optax `join_schedules`.

    python experiments/lr_schedules.py [--quick] [--steps S] [--peak-lr LR] [--seed N] [--seeds N]
                                       [--threads N] [--out DIR] [--data-dir DIR]

Writes `lr_schedules.png` (val loss vs step; the schedules themselves) and `results.json` to
`--out` (default `experiments/out/lr_schedules/`).
"""

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn import data, optim
from gpt_fn.runtime import CPU_FP32
from gpt_fn.shapes import shape_checks
from gpt_fn.train import evaluate, train_step

NAME = "lr_schedules"


def linear_decay(init_lr: float, final_lr: float, decay_steps: int) -> optim.Schedule:
    """`init_lr` at step 0 falling linearly to `final_lr` at `decay_steps`, `final_lr` after."""
    for name, value in (("init_lr", init_lr), ("final_lr", final_lr)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if final_lr > init_lr:
        raise ValueError(f"final_lr ({final_lr}) must be <= init_lr ({init_lr}) for a decay")
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
        raise ValueError(f"decay_steps must be an int > 0, got {decay_steps!r}")

    def schedule(step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return init_lr + min(step, decay_steps) / decay_steps * (final_lr - init_lr)

    return schedule


def schedules(peak_lr: float, steps: int) -> dict[str, optim.Schedule]:
    """The sweep: each shape over `steps` updates, peaking at `peak_lr`, decaying to a tenth."""
    warmup = max(1, steps // 10)
    cooldown = max(1, steps // 5)  # warmup-stable-decay cools down over the last fifth
    final_lr = peak_lr / 10
    warm_up = optim.linear_warmup(0.0, peak_lr, warmup)
    return {
        "constant": optim.constant(peak_lr),
        "warmup + constant": optim.join([warm_up, optim.constant(peak_lr)], [warmup]),
        "warmup + cosine": optim.warmup_cosine(peak_lr, final_lr, warmup, steps),
        "warmup + linear decay": optim.join(
            [warm_up, linear_decay(peak_lr, final_lr, steps - warmup)], [warmup]
        ),
        "warmup-stable-decay": optim.join(
            [warm_up, optim.constant(peak_lr), linear_decay(peak_lr, final_lr, cooldown)],
            [warmup, steps - cooldown],
        ),
        "cosine, no warmup": optim.cosine_decay(peak_lr, final_lr, steps),
    }


def train_with(
    schedule: optim.Schedule,
    *,
    config: gpt_fn.GPTConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    steps: int,
    batch_size: int,
    eval_every: int,
    eval_batches: int,
    seed: int,
    eval_seed: int,
) -> dict[str, Any]:
    """One run under `schedule`: train loss per step, val loss at step 0 and every `eval_every`.

    `seed` picks the init and the training batches; `eval_seed` the val rows, which stay the
    same across seeds so that the seeds' spread is training's alone.
    """
    model = gpt_fn.GPT(config, seed=seed)
    params = model.params()
    optimizer = optim.adamw(schedule, weight_decay=0.1)
    state = optimizer.init(params)

    def val_loss() -> float:
        return evaluate(
            model,
            val_tokens,
            batch_size=batch_size,
            block_size=config.block_size,
            batches=eval_batches,
            seed=eval_seed,
        )

    train_loss, val_steps, val = [], [0], [val_loss()]
    for step in range(steps):
        batch = data.get_batch(
            train_tokens, batch_size=batch_size, block_size=config.block_size, seed=seed, step=step
        )
        loss, _ = train_step(
            model, params, optimizer, state, [batch], runtime=CPU_FP32, grad_clip=1.0
        )
        train_loss.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val_steps.append(step + 1)
            val.append(val_loss())
    return {"train_loss": train_loss, "val_steps": val_steps, "val_loss": val}


def sweep(
    seeds: list[int], peak_lr: float, steps: int, **run_settings: Any
) -> dict[str, dict[str, Any]]:
    """Every schedule trained from every seed; val losses per seed and their mean."""
    runs = {}
    for name, schedule in schedules(peak_lr, steps).items():
        by_seed = [train_with(schedule, steps=steps, seed=seed, **run_settings) for seed in seeds]
        val_by_seed = np.array([run["val_loss"] for run in by_seed])
        runs[name] = {
            "lr": [schedule(step) for step in range(steps)],
            "val_steps": by_seed[0]["val_steps"],
            "val_loss": val_by_seed.mean(axis=0).tolist(),
            "val_loss_by_seed": val_by_seed.tolist(),
            "train_loss_by_seed": [run["train_loss"] for run in by_seed],
            "final_val_loss": float(val_by_seed[:, -1].mean()),
            "final_val_loss_by_seed": val_by_seed[:, -1].tolist(),
        }
        spread = val_by_seed[:, -1].max() - val_by_seed[:, -1].min()
        print(
            f"{name:22s} final val loss {runs[name]['final_val_loss']:.4f}"
            + (f" (mean of {len(seeds)} seeds, spread {spread:.4f})" if len(seeds) > 1 else "")
        )
    return runs


def plot(result: dict[str, Any], path: Path) -> None:
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    fig = Figure(figsize=(13, 4.8))
    losses, rates = fig.subplots(1, 2)
    runs = result["runs"]
    for name, run in runs.items():
        line = losses.plot(
            run["val_steps"],
            run["val_loss"],
            "o-",
            ms=3,
            label=f"{name}: {run['final_val_loss']:.3f}",
        )
        if len(run["val_loss_by_seed"]) > 1:  # the seeds' range around their mean
            by_seed = np.array(run["val_loss_by_seed"])
            losses.fill_between(
                run["val_steps"],
                by_seed.min(axis=0),
                by_seed.max(axis=0),
                color=line[0].get_color(),
                alpha=0.15,
            )
        rates.plot(range(len(run["lr"])), run["lr"], color=line[0].get_color(), label=name)
    # Zoom past the first evals (near ln(vocab) for every run): the differences are at the end.
    tail = [
        v
        for run in runs.values()
        for by_seed in run["val_loss_by_seed"]
        for v in by_seed[len(by_seed) // 3 :]
    ]
    if tail:
        spread = max(tail) - min(tail)
        losses.set_ylim(min(tail) - 0.1 * spread - 1e-3, max(tail) + 0.1 * spread + 1e-3)
    losses.set(
        xlabel="step",
        ylabel="val loss (nats/token)",
        title=f"val loss, {result['steps']} steps, peak lr {result['peak_lr']:g}, "
        + (f"mean of {len(result['seeds'])} seeds" if len(result["seeds"]) > 1 else "one seed"),
    )
    losses.legend(title="schedule: final val loss", fontsize=8, title_fontsize=8)
    losses.grid(alpha=0.3)
    rates.set(xlabel="step", ylabel="learning rate", title="the schedules (gpt_fn.optim)")
    rates.legend(fontsize=8)
    rates.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME,
        __doc__,
        quick="a tiny model for 4 steps: a smoke run",
        seed="first seed (init, batches, val rows)",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 150)")
    parser.add_argument("--peak-lr", type=float, default=3e-3)
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per schedule, from --seed on (default 1)"
    )
    args = conventions.start(parser, argv)
    if args.quick:
        config = gpt_fn.GPTConfig.from_preset("cpu-tiny", **conventions.QUICK_SHAPE)
        steps, batch_size, eval_batches = 4, 2, 1
    else:
        config = gpt_fn.GPTConfig.from_preset("cpu-tiny")
        steps, batch_size, eval_batches = 150, 8, 8
    steps = args.steps if args.steps is not None else steps
    if steps < 1 or args.seeds < 1:
        parser.error(f"--steps and --seeds must be >= 1, got {steps} and {args.seeds}")
    eval_every = max(1, steps // 10)
    train_tokens, val_tokens = conventions.shakespeare(args.data_dir, block_size=config.block_size)
    seeds = [args.seed + i for i in range(args.seeds)]
    with shape_checks(False):  # a sweep's worth of steps: skip the per-call shape checks
        runs = sweep(
            seeds,
            args.peak_lr,
            steps,
            config=config,
            train_tokens=train_tokens,
            val_tokens=val_tokens,
            batch_size=batch_size,
            eval_every=eval_every,
            eval_batches=eval_batches,
            eval_seed=args.seed,
        )
    result = {
        "steps": steps,
        "peak_lr": args.peak_lr,
        "batch_size": batch_size,
        "eval_batches": eval_batches,
        "seeds": seeds,
        "config": config.to_dict(),
        "ranking": sorted(runs, key=lambda name: runs[name]["final_val_loss"]),
        "runs": runs,
    }
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
