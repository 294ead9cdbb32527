"""SAE features of the main job's model: the sparsity/fidelity frontier and what features read.

Question. How much of the residual stream of the main job's model (`cpu-small` trained on
Shakespeare) can a sparse autoencoder explain at a given sparsity, how does that trade-off
move with the dictionary's size, and what do single features respond to?

Setup. TopK SAEs (Gao et al. 2024) at the residual stream after the middle block, for each
dictionary size in `SIZES` (multiples of `d_model`) and each `k` in `KS`: all of them trained
together by `gpt_fn.sae.train_sae` from one model pass per batch, on activations from random
training windows. Each is evaluated on held-out windows (`evaluate_sae`: L0, explained
variance, MSE, dead features, CE loss recovered by splicing it in). Then for a few features of
the largest SAE at the middle `k` (those that fire most often on the held-out windows,
skipping the always-on ones), the held-out contexts where it fires most strongly.

    python experiments/sae_features.py --checkpoint out   # the main job's model (gpt-fn train)
    python experiments/sae_features.py                    # trains the main job's model first
    python experiments/sae_features.py --quick            # a smoke run

Writes `sae_features.png` (explained variance and CE loss recovered against L0, one line per
size) and `results.json` (every SAE's metrics, the features' top contexts) to `--out`.
"""

import sys
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import conventions
from gpt_fn import data
from gpt_fn import sae as saes
from gpt_fn.checkpoint import load_checkpoint
from gpt_fn.model import transformer
from gpt_fn.settings import TrainSettings
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import gpt2
from gpt_fn.train import train

NAME = "sae_features"
SIZES = (4, 8, 16)
"""Dictionary sizes, in multiples of d_model."""
KS = (8, 16, 32)
FEATURES = 4
"""Features whose top contexts are reported."""
CONTEXT = 12
"""Tokens of context before the token a feature fires on."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick="a tiny model, SAEs and steps: a smoke run",
        seed="seed of the SAEs, their data order and the model trained without --checkpoint",
    )  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, help="the model (default: train the main job)")
    parser.add_argument("--steps", type=int, help="SAE training steps (default 2000)")
    parser.add_argument("--model-steps", type=int, help="main-job steps without --checkpoint (300)")
    args = conventions.start(parser, argv)
    steps = args.steps or (4 if args.quick else 2000)
    params, config, about = model(args)
    site = f"h.{config.n_layer // 2}.resid_post" if config.n_layer > 1 else "h.0.resid_post"
    block = min(config.block_size, 64)
    train_tokens, val_tokens = conventions.shakespeare(args.data_dir, block_size=block)
    sizes, ks = ((2, 4), (2, 4)) if args.quick else (SIZES, KS)
    configs = [
        saes.SAEConfig(d_in=config.n_embd, d_sae=size * config.n_embd, kind="topk", k=k)
        for size in sizes
        for k in ks
    ]
    settings = saes.SAETrainSettings(
        steps=steps,
        batch_size=64 if args.quick else 1024,
        model_batch_size=2 if args.quick else 16,
        block_size=block,
        buffer_batches=2 if args.quick else 8,
        lr=1e-3 if args.quick else 4e-4,
        dead_after=500,
        seed=args.seed,
    )
    rows = [
        torch.cat([x, y[:, -1:]], 1)
        for x, y in (
            data.eval_batch(val_tokens, batch_size=8, block_size=block, seed=0, index=i)
            for i in range(1 if args.quick else 8)
        )
    ]
    held_out = torch.cat(rows)
    with shape_checks(False):
        trained = saes.train_sae(params, config, site, train_tokens, configs, settings=settings)
        metrics = [
            saes.evaluate_sae(params, config, site, sae, c, held_out)._asdict()
            for sae, c in zip(trained, configs, strict=True)
        ]
        chosen = len(ks) * (len(sizes) - 1) + len(ks) // 2  # the largest size, the middle k
        contexts = top_contexts(params, config, site, trained[chosen], configs[chosen], held_out)
    result = {
        "model": about,
        "site": site,
        "settings": settings._asdict(),
        "saes": [{"d_sae": c.d_sae, "k": c.k, **m} for c, m in zip(configs, metrics, strict=True)],
        "features_of": {"d_sae": configs[chosen].d_sae, "k": configs[chosen].k},
        "features": contexts,
    }
    for entry in contexts:
        print(f"feature {entry['feature']} (fires on {entry['density']:.1%} of tokens):")
        for example in entry["top"]:
            print(f"  {example['activation']:7.3f}  {example['text']!r}")
    return conventions.finish(NAME, args, result, plot)


def model(args: Any) -> tuple[dict, Any, dict[str, Any]]:
    """The checkpoint's model, or the main job's (quick: a tiny one) trained into `--out`."""
    if args.checkpoint is not None:
        saved = load_checkpoint(args.checkpoint)
        return (
            saved.params,
            saved.model_config,
            {"checkpoint": str(args.checkpoint), "step": saved.step},
        )
    shape = dict(preset="cpu-tiny", **conventions.QUICK_SHAPE) if args.quick else {}
    steps = args.model_steps or (3 if args.quick else 300)
    settings = TrainSettings(
        data="shakespeare", data_dir=str(args.data_dir), out_dir=str(args.out / "model"),
        max_steps=steps, eval_interval=steps, sample_tokens=0, seed=args.seed, overwrite=True,
        device="cpu", autocast_dtype="float32", compile=False,
        **shape, **(dict(batch_size=2, eval_batches=1) if args.quick else {}),
    )  # fmt: skip
    print(f"training the model for {steps} steps into {args.out / 'model'}")
    train(settings, log=lambda *a, **k: None)
    saved = load_checkpoint(args.out / "model")
    return saved.params, saved.model_config, {"trained_steps": saved.step}


def top_contexts(
    params: dict,
    config: Any,
    site: str,
    sae: saes.SAE,
    sae_config: saes.SAEConfig,
    tokens: torch.Tensor,
) -> list[dict[str, Any]]:
    """For the features that fire most often (below half the tokens), their strongest
    held-out contexts: the text up to and including the token where each fires."""
    inputs = tokens[:, :-1]
    with torch.no_grad():
        activation, _ = transformer(params, inputs, config, stop_at=site)
        features = saes.encode(sae, activation, sae_config)  # (rows, seq, d_sae)
    density = (features > 0).float().mean((0, 1))
    candidates = torch.where(density < 0.5, density, torch.zeros_like(density))
    encoding = gpt2()
    result = []
    for feature in candidates.topk(FEATURES).indices.tolist():
        values = features[..., feature]
        top = values.flatten().topk(min(5, values.numel()))
        examples = []
        for value, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, position = divmod(flat, values.shape[1])
            window = inputs[row, max(0, position - CONTEXT) : position + 1].tolist()
            examples.append({"activation": value, "text": encoding.decode(window)})
        result.append({"feature": feature, "density": float(density[feature]), "top": examples})
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for size in sorted({entry["d_sae"] for entry in result["saes"]}):
        entries = sorted((e for e in result["saes"] if e["d_sae"] == size), key=lambda e: e["l0"])
        l0 = [e["l0"] for e in entries]
        axes[0].plot(l0, [e["explained_variance"] for e in entries], "o-", label=f"d_sae {size}")
        axes[1].plot(l0, [e["ce_loss_recovered"] for e in entries], "o-", label=f"d_sae {size}")
    for ax, label in zip(axes, ("explained variance", "CE loss recovered"), strict=True):
        ax.set_xlabel("L0 (features per token)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"TopK SAEs at {result['site']}: fidelity against sparsity (held-out rows)")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
