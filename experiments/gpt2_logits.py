"""gpt_fn's GPT-2 against Hugging Face transformers: how close are the logits, per kernel?

Question: loaded with the same GPT-2 weights, does `gpt_fn.forward` give transformers'
`GPT2LMHeadModel` logits, with either attention kernel (`attention="sdpa"` or `"manual"`),
and how large is the difference against the size of the logits themselves?

Method: the weights come from `--weights` (a local HF GPT-2 directory, or a Hub name such as
`gpt2` where the Hub is reachable), read by `gpt_fn.hf.load` for us and by
`GPT2LMHeadModel.from_pretrained` for transformers. Without `--weights` (this machine has no
network), transformers builds a randomly initialised GPT-2 (`GPT2Config()`, 124M parameters,
seeded) and `gpt_fn.hf.from_hf_state_dict` converts its state dict; random weights give logits
of order 1 rather than GPT-2's order 100, so the relative difference is the comparable figure.
The text is the start of the first play of the offline Shakespeare corpus, tokenized with
`gpt_fn.tokenizer.gpt2()` into a batch of rows. transformers runs in eval mode (no dropout)
with both of its attention implementations (`eager`, `sdpa`); everything is fp32.

    python experiments/gpt2_logits.py [--quick] [--weights DIR_OR_NAME] [--seed N] [--threads N]
                                      [--out DIR]

(No `--data-dir`: the text comes straight from the corpus package, not the prepared tokens.)

Writes `gpt2_logits.png` (histograms of |logit difference| per pairing) and `results.json` to
`--out` (default `experiments/out/gpt2_logits/`).
"""

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from matplotlib.figure import Figure
from transformers import GPT2Config, GPT2LMHeadModel

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn import data, hf
from gpt_fn.nn import KERNELS
from gpt_fn.tokenizer import gpt2

NAME = "gpt2_logits"
HF_ATTENTION = ("eager", "sdpa")


def hf_model(weights: str | None, *, quick: bool, seed: int) -> GPT2LMHeadModel:
    """transformers' GPT-2 from `weights`, or randomly initialised from `seed`, in eval mode."""
    if weights is not None:
        return GPT2LMHeadModel.from_pretrained(weights).eval()
    # A 2-layer, 64-wide GPT-2 for the smoke run; GPT-2 small's shape otherwise.
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64) if quick else GPT2Config()
    # transformers' initialisation draws from torch's global generator: seed it.
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def text_batch(rows: int, seq: int) -> torch.Tensor:
    """`rows` consecutive runs of `seq` tokens from the start of the first Shakespeare play."""
    tokens = gpt2().encode_ordinary(data.shakespeare_documents()[0])[: rows * seq]
    if len(tokens) < rows * seq:
        raise ValueError(f"the first play has {len(tokens)} tokens, fewer than {rows * seq}")
    return torch.tensor(tokens).view(rows, seq)


# log10 |difference| histogram bins: from far below fp32 rounding of order-1 logits to 1e-2.
HISTOGRAM_EDGES = [-10.0 + 0.25 * i for i in range(33)]


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    """Max/mean |difference|, relative to the largest logit, argmax agreement, a histogram."""
    diff = (ours - theirs).abs()
    exponents = diff[diff > 0].log10().clamp(HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    counts = torch.histogram(exponents.double(), torch.tensor(HISTOGRAM_EDGES, dtype=torch.double))
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_abs_diff_relative": (diff.max() / theirs.abs().max()).item(),
        "argmax_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "exact_fraction": (diff == 0).float().mean().item(),
        "log10_abs_diff_histogram": counts.hist.long().tolist(),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Histograms of log10 |logit difference| per comparison, with fp32's spacing marked."""
    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    centres = [(a + b) / 2 for a, b in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:], strict=False)]
    pairings = {
        f"gpt_fn {kernel} vs HF {hf_attention}": result["comparisons"][hf_attention][kernel]
        for hf_attention in HF_ATTENTION
        for kernel in KERNELS
    }
    pairings["gpt_fn sdpa vs gpt_fn manual"] = result["kernels"]
    for name, entry in pairings.items():
        total = sum(entry["log10_abs_diff_histogram"]) or 1
        fractions = [c / total for c in entry["log10_abs_diff_histogram"]]
        ax.plot(
            centres,
            fractions,
            "o--" if name.endswith("gpt_fn manual") else ".-",
            label=f"{name}: max {entry['max_abs_diff']:.1e}, {entry['exact_fraction']:.0%} exact",
        )
    spacing = result["fp32_spacing_at_max_logit"]
    ax.axvline(math.log10(spacing), color="k", ls="--", lw=1)
    ax.text(
        math.log10(spacing),
        0.5,
        "fp32 spacing at max |logit| ",
        transform=ax.get_xaxis_transform(),  # x in data, y in axes fraction
        rotation=90,
        ha="right",
        va="center",
        fontsize=8,
    )
    ax.set(
        xlabel="log10 |logit difference| (nonzero ones)",
        ylabel="fraction of the nonzero differences",
        title=f"{result['weights']}, {result['tokens_shape'][0]}x{result['tokens_shape'][1]} "
        f"tokens, max |logit| {result['max_abs_logit']:.3g}",
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME,
        __doc__,
        quick="a 2-layer model, short text",
        seed="seed of the random weights",
        data_dir=False,
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="a HF GPT-2 directory or Hub name (default: random GPT-2-shaped weights)",
    )
    args = conventions.start(parser, argv)
    model = hf_model(args.weights, quick=args.quick, seed=args.seed)
    if args.weights is not None:
        params, config = hf.load(args.weights)
    else:
        config = hf.config_from_hf(model.config)
        params = hf.from_hf_state_dict(model.state_dict(), config)
    rows, seq = (2, 32) if args.quick else (4, 256)
    tokens = text_batch(rows, min(seq, config.block_size))
    with torch.no_grad():
        ours = {
            kernel: gpt_fn.forward(params, tokens, config, attention=kernel) for kernel in KERNELS
        }
        theirs = {}
        for hf_attention in HF_ATTENTION:
            model.set_attn_implementation(hf_attention)
            theirs[hf_attention] = model(tokens).logits
    comparisons = {
        hf_attention: {kernel: compare(ours[kernel], theirs[hf_attention]) for kernel in KERNELS}
        for hf_attention in HF_ATTENTION
    }
    result = {
        "weights": args.weights or f"random GPT-2 weights (seed {args.seed})",
        "config": config.to_dict(),
        "tokens_shape": list(tokens.shape),
        "transformers": transformers.__version__,
        "max_abs_logit": theirs["eager"].abs().max().item(),
        "logit_std": theirs["eager"].std().item(),
        "fp32_spacing_at_max_logit": float(np.spacing(theirs["eager"].abs().max().numpy())),
        "comparisons": comparisons,
        "kernels": compare(ours["sdpa"], ours["manual"]),
    }
    print(
        f"{result['weights']}, tokens {tuple(tokens.shape)}, max |logit| {result['max_abs_logit']:.3g}"
    )
    pairings = [
        (f"gpt_fn {kernel:6s} vs HF {hf_attention:6s}", comparisons[hf_attention][kernel])
        for hf_attention in HF_ATTENTION
        for kernel in KERNELS
    ] + [("gpt_fn sdpa   vs gpt_fn manual", result["kernels"])]
    for name, entry in pairings:
        print(
            f"{name}: max |diff| {entry['max_abs_diff']:.2e} "
            f"({entry['max_abs_diff_relative']:.1e} of max |logit|), "
            f"argmax agreement {entry['argmax_agreement']:.4f}"
        )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
