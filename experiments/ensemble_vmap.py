"""Train N small GPTs at once with `torch.func.vmap`, and check it equals N separate runs.

Question: because a gpt_fn model is a dict of tensors and its training step is a pure function
`(params, opt_state, x, y) -> (params, opt_state, loss)`, `torch.func.vmap` over params stacked
along a new leading axis should train an ensemble in one call. Does it give the same losses as
training each member on its own, and is it faster?

Method: members differ in their init seed (`gpt_fn.init_params(config, seed=seed + i)`) and
their batch stream (`gpt_fn.data.get_batch(..., seed=seed + i)`) on the offline Shakespeare
corpus. One step function, built from `torch.func.grad_and_value(gpt_fn.loss)` and the pure
AdamW `update` (`gpt_fn.optim.adamw`, warmup + cosine schedule), runs two ways in lockstep:
vmapped over the stacked dicts (the optimizer's step counter is one shared scalar,
`in_dims=None`), and called once per member. Both attention kernels (`sdpa`, `manual`) run
both ways, because SDPA's CPU flash kernel has no vmap batching rule (torch warns and loops
over members); the four contenders take turns going first each step, so a shared machine's
load hits them alike, and timings are medians over the steps after the first. At the end
every member, trained vmapped or alone, is evaluated on the same val batches by
`gpt_fn.train.evaluate` (each member's slice of the stacked dict wrapped as a `gpt_fn.GPT`).

No gradient clipping: `gpt_fn.optim.clip_by_global_norm` uses `torch._foreach_norm`, which has
no vmap batching rule. Everything runs in fp32 (no bf16 hardware on the CPU this was written
for). References: the torch.func "Model ensembling" tutorial (stacked params + `vmap`); optax
for the stateless optimizer.

    python experiments/ensemble_vmap.py [--quick] [--models N] [--steps S] [--seed N]
                                        [--threads N] [--out DIR] [--data-dir DIR]

Writes `ensemble_vmap.png` (losses, vmap - sequential difference, time per step) and
`results.json` to `--out` (default `experiments/out/ensemble_vmap/`).
"""

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn import data, optim
from gpt_fn.nn import AttentionKernel as Kernel
from gpt_fn.shapes import Params, shape_checks
from gpt_fn.train import evaluate

NAME = "ensemble_vmap"
KERNELS: tuple[Kernel, ...] = ("sdpa", "manual")
# fp32 spaces numbers between 4 and 16 (these losses) 9.5e-7 apart. Batched matmuls may sum in
# another order than single ones, and training can amplify such differences step by step; 1e-4
# is ~100 of those steps, room to grow over a run, yet far below the spread between members
# (~1e-1 nats), so a pass means vmap changed nothing a researcher could see.
LOSS_TOLERANCE = 1e-4


def stack(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict whose tensors hold the members' tensors along a new leading axis."""
    return {name: torch.stack([d[name] for d in dicts]) for name in dicts[0]}


def member(stacked: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Member `i`'s dict: the `i`-th slice of every stacked tensor (views, no copies)."""
    return {name: value[i] for name, value in stacked.items()}


def make_step(
    config: gpt_fn.GPTConfig, optimizer: optim.Optimizer, kernel: Kernel
) -> Callable[..., tuple[Params, optim.OptState, torch.Tensor]]:
    """A pure training step `(params, opt_state, x, y) -> (params, opt_state, loss)`."""

    def step(
        params: Params, opt_state: optim.OptState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[Params, optim.OptState, torch.Tensor]:
        # grad differentiates argument 0 and wraps the tokens too; gpt_fn.loss's token range
        # check still sees through that wrapper that they are vmapped, and steps aside.
        grads, loss = torch.func.grad_and_value(gpt_fn.loss)(params, x, y, config, attention=kernel)
        new_params, new_state = optimizer.update(grads, opt_state, params)
        return new_params, new_state, loss

    return step


def one_at_a_time(
    step: Callable[..., tuple[Params, optim.OptState, torch.Tensor]],
) -> Callable[..., tuple[list[Params], list[optim.OptState], torch.Tensor]]:
    """`step` applied to each member in turn: the baseline, with the vmapped step's signature."""

    def loop(
        members: list[Params], states: list[optim.OptState], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[Params], list[optim.OptState], torch.Tensor]:
        outputs = [
            step(p, s, x[i], y[i]) for i, (p, s) in enumerate(zip(members, states, strict=True))
        ]
        return (
            [o[0] for o in outputs],
            [o[1] for o in outputs],
            torch.stack([o[2] for o in outputs]),
        )

    return loop


def run(
    *,
    models: int,
    steps: int,
    config: gpt_fn.GPTConfig,
    batch_size: int,
    lr: float,
    seed: int,
    data_dir: Path,
    eval_batches: int,
    kernels: tuple[Kernel, ...] = KERNELS,
) -> dict[str, Any]:
    """Train the ensemble vmapped and member by member, per kernel; losses, diffs, timings."""
    train_tokens, val_tokens = conventions.shakespeare(data_dir, block_size=config.block_size)

    def val_loss(params: Params) -> float:
        # The same fixed val batches for every member, however it was trained.
        return evaluate(
            gpt_fn.GPT.from_params(params, config),
            val_tokens,
            batch_size=batch_size,
            block_size=config.block_size,
            batches=eval_batches,
            seed=seed,
        )

    initial = [gpt_fn.init_params(config, seed=seed + i) for i in range(models)]
    optimizer = optim.adamw(
        optim.warmup_cosine(lr, lr / 10, warmup_steps=max(1, steps // 10), decay_steps=steps)
    )
    # The step counter is one scalar for the whole ensemble: mapped tensors get axis 0, it None.
    state_dims = {name: None if name == "step" else 0 for name in optimizer.init(initial[0])}

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [
            data.get_batch(
                train_tokens,
                batch_size=batch_size,
                block_size=config.block_size,
                seed=seed + i,
                step=step,
            )
            for i in range(models)
        ]
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    # Four contenders, (kernel, "vmap" | "alone"), each carrying its own params and state.
    steps_of: dict[tuple[Kernel, str], Callable[..., Any]] = {}
    carried: dict[tuple[Kernel, str], tuple[Any, Any]] = {}
    stacked = stack(initial)
    for kernel in kernels:
        step_fn = make_step(config, optimizer, kernel)
        steps_of[kernel, "vmap"] = torch.func.vmap(
            step_fn, in_dims=(0, state_dims, 0, 0), out_dims=(0, state_dims, 0)
        )
        carried[kernel, "vmap"] = (
            stacked,
            torch.func.vmap(optimizer.init, out_dims=state_dims)(stacked),
        )
        steps_of[kernel, "alone"] = one_at_a_time(step_fn)
        carried[kernel, "alone"] = (initial, [optimizer.init(p) for p in initial])
    losses: dict[tuple[Kernel, str], list[list[float]]] = {name: [] for name in steps_of}
    seconds: dict[tuple[Kernel, str], list[float]] = {name: [] for name in steps_of}
    order = list(steps_of)
    for step in range(steps):
        x, y = batches(step)
        # Rotate who goes first, so a shared machine's changing load hits every contender alike.
        for name in order[step % len(order) :] + order[: step % len(order)]:
            params, state = carried[name]
            start = time.perf_counter()
            params, state, step_losses = steps_of[name](params, state, x, y)
            values = step_losses.tolist()
            seconds[name].append(time.perf_counter() - start)
            carried[name] = (params, state)
            losses[name].append(values)

    # The first step pays for first-call set-up in every path: leave it out of the medians.
    timed = slice(1, None) if steps > 1 else slice(None)
    results: dict[str, Any] = {}
    for kernel in kernels:
        (stacked_params, _), (members, _) = carried[kernel, "vmap"], carried[kernel, "alone"]
        loss_diff = np.abs(
            np.array(losses[kernel, "vmap"]) - np.array(losses[kernel, "alone"])
        ).max(axis=1)
        vmap_ms, alone_ms = (
            1e3 * statistics.median(seconds[kernel, path][timed]) for path in ("vmap", "alone")
        )
        results[kernel] = {
            "vmap_losses": losses[kernel, "vmap"],
            "sequential_losses": losses[kernel, "alone"],
            "max_abs_loss_diff": float(loss_diff.max()),
            "first_step_loss_diff": float(loss_diff[0]),
            "loss_diff_per_step": loss_diff.tolist(),
            "max_abs_param_diff": max(
                (stacked_params[name][i] - members[i][name]).abs().max().item()
                for i in range(models)
                for name in stacked_params
            ),
            "vmap_val_loss": [val_loss(member(stacked_params, i)) for i in range(models)],
            "sequential_val_loss": [val_loss(p) for p in members],
            "vmap_ms_per_step": vmap_ms,
            "sequential_ms_per_step": alone_ms,
            "speedup": alone_ms / vmap_ms,
        }
    return results


def plot(result: dict[str, Any], path: Path) -> None:
    kernels = list(result["kernels"])
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    fig = Figure(figsize=(16, 4.5))
    axes = fig.subplots(1, 3)
    first = result["kernels"][kernels[0]]
    vmap_losses, sequential_losses = (
        np.array(first["vmap_losses"]),
        np.array(first["sequential_losses"]),
    )
    steps = np.arange(1, len(vmap_losses) + 1)
    for i in range(vmap_losses.shape[1]):
        line = axes[0].plot(steps, vmap_losses[:, i], lw=1.5, label=f"member {i} (vmap)")
        axes[0].plot(
            steps,
            sequential_losses[:, i],
            "x",
            ms=4,
            color=line[0].get_color(),
            label=f"member {i} (alone)",
        )
    axes[0].set(
        xlabel="step", ylabel="train loss (nats/token)", title=f"ensemble, attention={kernels[0]}"
    )
    axes[0].legend(fontsize=7, ncol=2)
    for kernel, marker in zip(kernels, ("o", "x"), strict=False):
        entry = result["kernels"][kernel]
        diff = np.array(entry["loss_diff_per_step"])
        # In units of fp32's spacing at the loss's value (an ulp): the scale rounding works on.
        ulp = np.spacing(np.array(entry["sequential_losses"], dtype=np.float32).max(axis=1))
        axes[1].plot(steps, diff / ulp, marker + "-", lw=0.8, ms=5, label=kernel)
    tolerance_ulps = result["loss_tolerance"] / np.spacing(np.float32(8.0))
    axes[1].set(
        xlabel="step",
        ylabel="max |vmap - alone| over members (fp32 ulps)",
        title=f"loss difference (tolerance 1e-4 = {tolerance_ulps:.0f} ulps at loss 8)",
    )
    labels, values = [], []
    for kernel in kernels:
        entry = result["kernels"][kernel]
        labels += [f"{kernel}\nvmap", f"{kernel}\n{result['models']} x alone"]
        values += [entry["vmap_ms_per_step"], entry["sequential_ms_per_step"]]
    bars = axes[2].bar(labels, values, color=["C0", "C1"] * len(kernels))
    axes[2].bar_label(bars, fmt="%.0f")
    axes[2].set(
        ylabel="ms per step (median)",
        title=f"{result['models']} members, one step each",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(NAME, __doc__, quick="a tiny model for 3 steps: a smoke run")
    parser.add_argument("--models", type=int, default=None, help="ensemble size (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 30)")
    args = conventions.start(parser, argv)
    if args.quick:
        config = gpt_fn.GPTConfig.from_preset("cpu-tiny", **conventions.QUICK_SHAPE)
        models, steps, batch_size, eval_batches = 2, 3, 2, 1
    else:
        config = gpt_fn.GPTConfig.from_preset("cpu-tiny")
        models, steps, batch_size, eval_batches = 4, 30, 8, 4
    models = args.models if args.models is not None else models
    steps = args.steps if args.steps is not None else steps
    if models < 1 or steps < 1:
        parser.error(f"--models and --steps must be >= 1, got {models} and {steps}")
    with shape_checks(False):  # timed code runs unchecked (gpt_fn.shapes)
        kernels = run(
            models=models,
            steps=steps,
            config=config,
            batch_size=batch_size,
            lr=2e-3,
            seed=args.seed,
            data_dir=args.data_dir,
            eval_batches=eval_batches,
        )
    for kernel, entry in kernels.items():
        print(
            f"{kernel:6s}: max |loss diff| {entry['max_abs_loss_diff']:.2e} "
            f"(first step {entry['first_step_loss_diff']:.2e}), params {entry['max_abs_param_diff']:.2e}; "
            f"vmap {entry['vmap_ms_per_step']:.0f} ms/step, {models} x alone "
            f"{entry['sequential_ms_per_step']:.0f} ms/step, speed-up {entry['speedup']:.2f}x"
        )
    result = {
        "models": models,
        "steps": steps,
        "batch_size": batch_size,
        "config": config.to_dict(),
        "loss_tolerance": LOSS_TOLERANCE,
        "within_tolerance": all(k["max_abs_loss_diff"] <= LOSS_TOLERANCE for k in kernels.values()),
        "kernels": kernels,
    }
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
