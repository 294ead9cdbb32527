"""Attribution patching: one backward pass against one patched forward pass per head.

Question. Activation patching asks, head by head, how much of a behaviour a head carries:
run the clean input with that head's output taken from a corrupted run and measure how much
of the clean metric is lost (one forward pass per head). Attribution patching (Nanda 2023;
Syed et al. 2023) estimates all of them at once by a first-order Taylor expansion: the
gradient of the metric with respect to each head's output on the clean run, times the
corrupted-minus-clean difference of that output (one forward and one backward pass).
`gpt_fn.patching` computes both (`activation_patch`, which runs only the blocks from the
patched one on, several patched runs per forward; `attribution_patch`, whose gradients are
`run_with_grads`'). How well do the two maps agree, and how much faster is the estimate?

Setup. The induction task and model of `induction_heads.py` (a segment of random length,
then its copy; a 2-layer, 4-head model trained on it). Clean: held-out sequences; corrupted:
the same with the segment's first occurrence replaced by fresh random ids, so its copy can
no longer be predicted. Metric: the mean logit of each copy token, centred over the
vocabulary (a logit, not a log-probability, which saturates near 0 on the clean run and has
no gradient there). Both maps are fractions of the clean-corrupted gap. Also reported: their
Pearson correlation over heads, the median time of each method, and, for the head that
matters most, the metric along the straight line from its clean to its corrupted output
(where that line is not straight, a first-order estimate cannot be right).

    python experiments/attribution_patching.py            # trains the model: CPU minutes
    python experiments/attribution_patching.py --quick    # a smoke run

Writes `attribution_patching.png` (both maps, one against the other, the line) and
`results.json` into `--out`.
"""

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from experiments.induction_heads import (
    CONFIG,
    STEPS,
    Repeats,
    copy_masks,
    repeated_sequences,
    train_model,
)
from gpt_fn import hooks, patching
from gpt_fn.shapes import shape_checks

NAME = "attribution_patching"


def corrupt(repeats: Repeats, generator: torch.Generator) -> Repeats:
    """The same sequences with the segment's first occurrence replaced by fresh random ids."""
    tokens = repeats.tokens
    fresh = torch.randint(0, CONFIG.vocab_size, tokens.shape, generator=generator)
    in_segment = torch.arange(tokens.shape[1]) < repeats.period[:, None]
    return Repeats(torch.where(in_segment, fresh, tokens), repeats.period)


def metric_of(repeats: Repeats):
    """The mean centred logit of the copy's tokens (the clean run's targets)."""
    _, copy = copy_masks(repeats)
    targets = repeats.tokens[:, 1:]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        centred = logits - logits.mean(dim=-1, keepdim=True)
        return centred.gather(-1, targets[..., None])[..., 0][copy].mean()

    return metric


def along_the_line(params, clean, metric, clean_z, corrupt_z, layer: int, head: int) -> list[float]:
    """The metric with head `(layer, head)`'s z at `clean + t (corrupted - clean)`, t in LINE."""
    site = f"h.{layer}.attn.z"
    values = []
    for t in LINE:
        mixed = clean_z[site] + t * (corrupt_z[site] - clean_z[site])
        patched = hooks.patch(site, mixed, heads=[head])
        values.append(
            float(metric(gpt_fn.forward(params, clean.tokens[:, :-1], CONFIG, hooks=patched)))
        )
    return values


LINE = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def run(quick: bool, seed: int) -> dict[str, Any]:
    steps, batch, examples, repeats = (30, 8, 16, 1) if quick else (STEPS, 32, 128, 5)
    with shape_checks(False):
        params, _ = train_model(CONFIG, steps=steps, batch=batch, seed=seed)
        clean = repeated_sequences(examples, torch.Generator().manual_seed(seed + 1))
        corrupted = corrupt(clean, torch.Generator().manual_seed(seed + 2))
        metric = metric_of(clean)
        sites = [f"h.{i}.attn.z" for i in range(CONFIG.n_layer)]
        # Noising: the clean run is the one patched, each head's z taken from the corrupted
        # run (gpt_fn.patching's `clean` is the source of the patch, `corrupted` the run).
        source, run_on = corrupted.tokens[:, :-1], clean.tokens[:, :-1]
        with torch.no_grad():
            _, clean_z = gpt_fn.run_with_cache(params, run_on, CONFIG, names=sites)
            _, corrupt_z = gpt_fn.run_with_cache(params, source, CONFIG, names=sites)
            clean_metric = float(metric(gpt_fn.forward(params, run_on, CONFIG)))
            corrupt_metric = float(metric(gpt_fn.forward(params, source, CONFIG)))
        methods = {
            "activation patching": patching.activation_patch,
            "attribution patching": patching.attribution_patch,
        }
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        maps: dict[str, torch.Tensor] = {}
        for _ in range(repeats):  # each method from the tokens on, caches included
            for name, method in methods.items():
                start = time.perf_counter()
                maps[name] = method(
                    params, source, run_on, CONFIG, metric, site="attn.z", by="head"
                )
                seconds[name].append(time.perf_counter() - start)
        gap = corrupt_metric - clean_metric
        activation_map = (maps["activation patching"] - clean_metric) / gap
        attribution_map = (maps["attribution patching"] - clean_metric) / gap
        layer, head = divmod(int(activation_map.flatten().argmax()), CONFIG.n_head)
        with torch.no_grad():
            line = along_the_line(params, clean, metric, clean_z, corrupt_z, layer, head)
    correlation = torch.corrcoef(
        torch.stack([activation_map.flatten(), attribution_map.flatten()])
    )[0, 1]
    median = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        "config": CONFIG.to_dict(),
        "steps": steps,
        "examples": examples,
        "clean_metric": clean_metric,
        "corrupted_metric": corrupt_metric,
        "activation_patching": activation_map.tolist(),
        "attribution_patching": attribution_map.tolist(),
        "pearson": float(correlation),
        "seconds": median,
        "speedup": median["activation patching"] / median["attribution patching"],
        "line_head": [layer, head],
        "line_t": list(LINE),
        "line_fraction": [(v - clean_metric) / gap for v in line],
        "line_first_order": [t * float(attribution_map[layer, head]) for t in LINE],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(17, 4))
    axes = fig.subplots(1, 4)
    maps = {
        name: torch.tensor(result[name]) for name in ("activation_patching", "attribution_patching")
    }
    for ax, (name, values) in zip(axes, maps.items(), strict=False):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(
            xlabel="head",
            ylabel="layer",
            title=name.replace("_", " "),
            xticks=range(values.shape[1]),
            yticks=range(values.shape[0]),
        )
        fig.colorbar(image, ax=ax)
    x, y = maps["activation_patching"].flatten(), maps["attribution_patching"].flatten()
    axes[2].scatter(x, y)
    axes[2].plot([-1, 1], [-1, 1], ls="--", c="gray", lw=1)
    axes[2].set(
        xlabel="activation patching (fraction of the gap)", ylabel="attribution patching",
        title=f"per head: Pearson {result['pearson']:.2f}, {result['speedup']:.1f}x faster",
    )  # fmt: skip
    layer, head = result["line_head"]
    axes[3].plot(result["line_t"], result["line_fraction"], "o-", label="patched (the truth)")
    axes[3].plot(result["line_t"], result["line_first_order"], "--", label="first order")
    axes[3].set(
        xlabel="t: z = clean + t (corrupted - clean)",
        ylabel="fraction of the gap",
        title=f"h.{layer} head {head}",
    )
    axes[3].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick="30 training steps, 16 sequences: a smoke run",
        seed="seed of the model and the sequences", data_dir=False,
    )  # fmt: skip
    args = conventions.start(parser, argv)
    result = run(args.quick, args.seed)
    print(
        f"Pearson {result['pearson']:.3f} between the maps; activation patching "
        f"{result['seconds']['activation patching']:.3f} s, attribution patching "
        f"{result['seconds']['attribution patching']:.3f} s ({result['speedup']:.1f}x)"
    )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
