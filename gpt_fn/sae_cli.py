"""`gpt-fn sae train` and `gpt-fn sae eval`: SAEs on a model's activations from the command line.

    gpt-fn sae train --checkpoint out --site h.2.resid_post --d-sae 4096 --kind topk --k 32
    gpt-fn sae train --checkpoint out --site h.2.resid_post --d-sae 1024 4096 --k 16 32 --kind topk
    gpt-fn sae eval --checkpoint out --sae out-sae/sae_0

`train` trains one SAE per value of `--d-sae`/`--k`/`--sparsity-coefficient` (each given once,
or as many times as there are SAEs) from one pass of the model, and writes each in SAELens's
format to `OUT/sae_{i}/` with one line per step in `OUT/metrics.jsonl`. `eval` reports
SAELens's metrics (L0, dead features, explained variance, MSE, CE loss recovered) on
validation rows. Bad input ends in one line on stderr (`gpt_fn.cli.main`).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gpt_fn import data
from gpt_fn.config import GPTConfig
from gpt_fn.loading import load_model
from gpt_fn.rundir import RunDir
from gpt_fn.runtime import resolve_device
from gpt_fn.sae import (
    KINDS,
    SAEConfig,
    SAETrainSettings,
    StepLog,
    evaluate_sae,
    load_sae,
    save_sae,
    site_width,
    train_sae,
)
from gpt_fn.settings import TrainSettings, field_help
from gpt_fn.shapes import Params

DEFAULTS = SAETrainSettings()


def add_parser(commands: Any) -> None:
    """The `sae` command and its `train` and `eval` subcommands."""
    sae = commands.add_parser("sae", help="train and evaluate sparse autoencoders on activations")
    subcommands = sae.add_subparsers(dest="sae_command", required=True)

    train = subcommands.add_parser("train", help="train SAEs at one site from one model pass")
    _add_model_flags(train)
    train.add_argument("--site", required=True, help="activation site, e.g. h.2.resid_post")
    train.add_argument("--kind", choices=KINDS, default="standard", help="SAE architecture")
    train.add_argument("--d-sae", type=int, nargs="+", required=True, help="features per SAE")
    train.add_argument("--k", type=int, nargs="+", help="topk: features firing per token")
    train.add_argument(
        "--sparsity-coefficient",
        type=float,
        nargs="+",
        default=[0.0],
        help="standard: L1 coefficient; jumprelu: L0 coefficient",
    )
    for name, text in (
        ("steps", "SAE training steps"),
        ("batch_size", "activations per SAE step"),
        ("model_batch_size", "sequences per model pass"),
        ("block_size", "tokens per sequence"),
        ("seed", "seed of the SAEs' initialisation and of the data's order"),
    ):
        default = getattr(DEFAULTS, name)
        flag = "--" + name.replace("_", "-")
        train.add_argument(flag, type=int, default=default, help=f"{text} (default: {default})")
    train.add_argument(
        "--lr",
        type=float,
        default=DEFAULTS.lr,
        help=f"AdamW's learning rate (default: {DEFAULTS.lr})",
    )
    train.add_argument("--out", type=Path, default=Path("out-sae"), help="folder to write")
    train.add_argument(
        "--save-interval",
        type=int,
        default=0,
        help="also save the SAEs every N steps (0: at the end)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace SAEs already in --out")
    train.set_defaults(run=_train)

    evaluate = subcommands.add_parser("eval", help="SAELens's metrics of an SAE on val rows")
    _add_model_flags(evaluate)
    evaluate.add_argument("--sae", type=Path, required=True, help="an SAE folder (SAELens format)")
    evaluate.add_argument("--site", help="activation site (default: the one the SAE names)")
    evaluate.add_argument("--batches", type=int, default=4, help="val batches to score")
    evaluate.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    evaluate.add_argument("--block-size", type=int, help="tokens per row (default: the model's)")
    evaluate.set_defaults(run=_eval)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a gpt_fn checkpoint (file or out dir)")
    source.add_argument("--hf", help="GPT-2 weights: a HF directory")
    parser.add_argument(
        "--data", default=str(TrainSettings().data_path()), help="a prepared token folder"
    )
    parser.add_argument("--device", default="auto", help=field_help("device"))


def _model(args: argparse.Namespace, device: torch.device) -> tuple[Params, GPTConfig]:
    model = load_model(checkpoint=args.checkpoint, hf=args.hf, device=device)
    return model.params, model.config


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sizes = args.d_sae
    count = max(len(sizes), len(args.k or [None]), len(args.sparsity_coefficient))
    for flag, values in (
        ("--d-sae", sizes),
        ("--k", args.k),
        ("--sparsity-coefficient", args.sparsity_coefficient),
    ):
        if values is not None and len(values) not in (1, count):
            parser.error(f"{flag} takes 1 or {count} values (one per SAE), got {len(values)}")
    if args.save_interval < 0:
        parser.error(f"--save-interval must be >= 0, got {args.save_interval}")
    if args.kind == "topk" and args.k is None:
        parser.error("--kind topk needs --k")
    if args.kind != "topk" and args.k is not None:
        parser.error(f"--k is for --kind topk; a {args.kind} SAE takes --sparsity-coefficient")

    def nth(values: list | None, i: int) -> Any:
        return None if values is None else values[i if len(values) > 1 else 0]

    configs_of = [
        dict(
            d_sae=nth(sizes, i),
            kind=args.kind,
            k=nth(args.k, i),
            sparsity_coefficient=nth(args.sparsity_coefficient, i),
        )
        for i in range(count)
    ]
    settings = SAETrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        model_batch_size=args.model_batch_size,
        block_size=args.block_size,
        lr=args.lr,
        seed=args.seed,
    )
    tokens = data.load_split(args.data, "train", block_size=settings.block_size)
    params, config = _model(args, resolve_device(args.device))
    out = RunDir(args.out)
    with out.lock():
        out.start_fresh(overwrite=args.overwrite)
        for old in out.path.glob("sae_*"):
            shutil.rmtree(old)
        width = site_width(params, config, args.site)
        configs = [SAEConfig(d_in=width, **c) for c in configs_of]

        def save(saes: list) -> None:
            for i, (sae, sae_config) in enumerate(zip(saes, configs, strict=True)):
                save_sae(out.path / f"sae_{i}", sae, sae_config, site=args.site)

        with tqdm(total=settings.steps, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

            def log(step: StepLog) -> None:
                out.append_metrics(
                    {
                        "step": step.step,
                        "saes": [
                            {"loss": float(loss.loss), "mse": float(loss.mse), "l0": l0}
                            for loss, l0 in zip(step.losses, step.l0, strict=True)
                        ],
                    }
                )
                if args.save_interval and (step.step + 1) % args.save_interval == 0:
                    save(step.saes)
                bar.set_postfix(mse=f"{float(step.losses[0].mse):.4g}", l0=f"{step.l0[0]:.1f}")
                bar.update()

            save(train_sae(params, config, args.site, tokens, configs, settings=settings, log=log))
    print(f"wrote {count} SAE(s) at {args.site} to {out.path}/sae_*/ ({settings.steps} steps)")
    return 0


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    sae, sae_config, saved_site = load_sae(args.sae, device=device)
    site = args.site or saved_site
    if site is None:
        parser.error(f"{args.sae} names no site: give --site")
    params, config = _model(args, device)
    block_size = config.block_size if args.block_size is None else args.block_size
    tokens = data.load_split(args.data, "val", block_size=block_size)
    rows = []
    for index in range(args.batches):
        x, y = data.eval_batch(
            tokens,
            batch_size=args.batch_size,
            block_size=block_size,
            seed=0,
            index=index,
            device=device,
        )
        rows.append(torch.cat([x, y[:, -1:]], 1))
    metrics = evaluate_sae(params, config, site, sae, sae_config, torch.cat(rows))
    print(json.dumps({"sae": str(args.sae), "site": site, **metrics._asdict()}, indent=2))
    return 0
