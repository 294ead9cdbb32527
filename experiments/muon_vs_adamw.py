"""Muon against AdamW on the main job's model and data, each at its best learning rate.

Question. Muon (momentum orthogonalised by Newton-Schulz iterations for the blocks' weight
matrices, AdamW for embeddings, gains and biases; Jordan et al. 2024, the optimizer of the
modded-nanogpt speed records) is reported to reach a given loss in fewer steps than AdamW.
Does it on the CPU main job, once each optimizer has its own tuned learning rate, and does it
still win against wall time (Newton-Schulz costs matmuls AdamW does not do)?

Setup. The main job's model and data (`cpu-small`: 4 layers x 256, block 128, GPT-2's padded
vocabulary, the offline Shakespeare corpus, batch 16 x 128 tokens, warmup then cosine to a
tenth of the peak), trained by `gpt_fn.train.train` itself for `--steps` steps with
`--optimizer adamw` at each of `--adamw-lrs` and with `--optimizer muon` at each of
`--muon-lrs` (AdamW's part of a Muon run at the job's default lr), one seed. Val loss on the
same 10 batches every tenth of the run; wall time is the sum of the logged step times.

    python experiments/muon_vs_adamw.py          # 6 runs of 150 steps: ~20 CPU minutes
    python experiments/muon_vs_adamw.py --quick  # a smoke run

Writes `muon_vs_adamw.png` (val loss against steps and against seconds, the best run of
each optimizer highlighted) and `results.json` into `--out`; each run's own files go to
`--out/<optimizer>-<lr>/`.
"""

import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import conventions
from gpt_fn.rundir import read_metrics
from gpt_fn.settings import TrainSettings
from gpt_fn.train import train

NAME = "muon_vs_adamw"
ADAMW_LRS = (1e-3, 2e-3, 4e-3)
MUON_LRS = (0.01, 0.02, 0.04)


def one_run(
    optimizer: str, lr: float, *, steps: int, quick: bool, seed: int, data_dir: Path, out: Path
) -> dict[str, Any]:
    shape = conventions.QUICK_SHAPE if quick else {}
    settings = TrainSettings(
        data_dir=str(data_dir),
        out_dir=str(out / f"{optimizer}-{lr:g}"),
        **({"preset": "cpu-tiny", **shape} if quick else {}),
        batch_size=2 if quick else 16,
        max_steps=steps,
        eval_interval=max(1, steps // 10),
        eval_batches=1 if quick else 10,
        sample_tokens=4 if quick else 0,
        optimizer=optimizer,
        **({"lr": lr, "min_lr": lr / 10} if optimizer == "adamw" else {"muon_lr": lr}),
        seed=seed,
        overwrite=True,  # a rerun regenerates the experiment's runs
    )
    train(settings, log=lambda *_: None)
    records = read_metrics(Path(settings.out_dir) / "metrics.jsonl")
    tokens_per_step = settings.batch_size * settings.model_config().block_size
    elapsed, seconds = 0.0, []
    for record in records:
        elapsed += tokens_per_step / record["tokens_per_s"]
        seconds.append(elapsed)
    evals = [
        (r["step"] + 1, s, r["val_loss"])
        for r, s in zip(records, seconds, strict=True)
        if "val_loss" in r
    ]
    return {
        "optimizer": optimizer,
        "lr": lr,
        "val_steps": [e[0] for e in evals],
        "val_seconds": [e[1] for e in evals],
        "val_loss": [e[2] for e in evals],
        "final_val_loss": evals[-1][2],
        "seconds": elapsed,
        "train_loss": [r["loss"] for r in records],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"adamw": "tab:blue", "muon": "tab:orange"}
    for run in result["runs"]:
        best = run is result["best"][run["optimizer"]] or run == result["best"][run["optimizer"]]
        style = dict(c=colours[run["optimizer"]], lw=2.2 if best else 0.9, alpha=1 if best else 0.5)
        label = f"{run['optimizer']} lr {run['lr']:g}"
        axes[0].plot(run["val_steps"], run["val_loss"], "o-", ms=3, label=label, **style)
        axes[1].plot(run["val_seconds"], run["val_loss"], "o-", ms=3, **style)
    axes[0].set(xlabel="step", ylabel="val loss (nats/token)", title="against steps")
    axes[1].set(xlabel="seconds of training (logged step times)", title="against wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick="a tiny model, 3 steps per run: a smoke run"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 150)")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=list(ADAMW_LRS))
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=list(MUON_LRS))
    args = conventions.start(parser, argv)
    steps = args.steps or (3 if args.quick else 150)
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    conventions.shakespeare(args.data_dir, block_size=16 if args.quick else 128)  # prepared once
    runs = [
        one_run(
            opt,
            lr,
            steps=steps,
            quick=args.quick,
            seed=args.seed,
            data_dir=args.data_dir,
            out=args.out,
        )
        for opt, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs))
        for lr in lrs
    ]
    best = {
        opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["final_val_loss"])
        for opt in ("adamw", "muon")
    }
    for opt, run in best.items():
        print(
            f"best {opt}: lr {run['lr']:g}, val loss {run['final_val_loss']:.4f} in {run['seconds']:.0f} s"
        )
    result = {"steps": steps, "runs": runs, "best": best}
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
