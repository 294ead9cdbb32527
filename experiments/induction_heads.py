"""Induction heads: train a 2-layer GPT on repeated random sequences, find the heads, ablate them.

Question. A random segment of `L` tokens followed by its copy: the copy can be predicted
perfectly from its second token on, but only by a model that looks back to where the current token
occurred before and copies what came next: an induction head (Olsson et al. 2022, "In-context
Learning and Induction Heads"), which needs two layers (a previous-token head feeding a
head in the next layer). Does a small gpt_fn model learn one, can `run_with_cache` find it,
and does ablating it with a hook take the copy's loss back up to the segment's?

Setup. 64-token sequences of ids drawn uniformly from 64: a segment of random length `L`
(8 to 32, varying per sequence, so no fixed positional offset gives the answer), its copy,
then random filler; a 2-layer, 4-head, 64-wide GPT (vocabulary 64, block 64) trained with
AdamW on fresh sequences every step. Induction score of a head: its mean attention from each
query position `t` of the copy to position `t - L + 1` (the token after the query token's
first occurrence), on held-out sequences (`gpt_fn.inspect.attention_mass` of the cached
`h.{i}.attn.pattern` against that key mask; the previous-token score likewise, against
`previous_token_keys`). Then the loss on the
segment and on its copy, clean and with the top-scoring heads zero-ablated
(`hooks.ablate_heads`), and, as a control, with as many of the lowest-scoring heads ablated.

    python experiments/induction_heads.py            # 6k steps, ~4 CPU minutes
    python experiments/induction_heads.py --quick    # a smoke run

Writes `induction_heads.png` (the training loss, the top head's pattern, the ablation
losses), `induction_scores.png` (the score per head) and `results.json` into `--out`.
"""

import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn import eval as evaluation
from gpt_fn import hooks, optim, plots
from gpt_fn import inspect as inspection
from gpt_fn.runtime import CPU_FP32
from gpt_fn.shapes import shape_checks
from gpt_fn.train import train_step

NAME = "induction_heads"
VOCAB = 64
CONFIG = gpt_fn.GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=64)
STEPS = 6000
"""Training steps of the full run: the heads form in a phase change around steps 2-3k here."""


class Repeats(NamedTuple):
    """A batch of sequences that each repeat a random segment once, and where."""

    tokens: torch.Tensor  # (batch, length)
    period: torch.Tensor  # (batch,): the segment's length; its copy starts there


def repeated_sequences(
    batch: int, generator: torch.Generator, *, length: int = 64, vocab: int = VOCAB
) -> Repeats:
    """Segments of random length `L` in `[length/8, length/2]` of uniform random ids, each
    followed by its copy, then random ids to fill `length`. The period varies from row to
    row, so no fixed positional offset predicts the copy: only looking up where the current
    token occurred before does (a fixed period lets a layer-0 head copy by position alone)."""
    tokens = torch.randint(0, vocab, (batch, length), generator=generator)
    period = torch.randint(length // 8, length // 2 + 1, (batch,), generator=generator)
    positions = torch.arange(length)
    in_copy = (positions >= period[:, None]) & (positions < 2 * period[:, None])
    source = (positions - period[:, None]).clamp(min=0)
    tokens = torch.where(in_copy, tokens.gather(1, source), tokens)
    return Repeats(tokens, period)


def train_model(
    config: gpt_fn.GPTConfig, *, steps: int, batch: int, seed: int, lr: float = 1e-3
) -> tuple[gpt_fn.Params, list[float]]:
    """A model trained on fresh repeated sequences every step; its params and the loss curve."""
    module = gpt_fn.GPT(config, seed=seed)
    params = module.params()
    optimizer = optim.adamw(
        optim.warmup_cosine(lr, lr / 10, min(100, steps // 10), steps), weight_decay=0.01
    )
    state = optimizer.init(params)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        tokens = repeated_sequences(
            batch, generator, length=config.block_size, vocab=config.vocab_size
        ).tokens
        loss, _ = train_step(
            module, params, optimizer, state, [(tokens[:, :-1], tokens[:, 1:])],
            runtime=CPU_FP32, grad_clip=1.0,
        )  # fmt: skip
        losses.append(loss.item())
    return {k: v.detach() for k, v in params.items()}, losses


def copy_masks(repeats: Repeats) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the prediction positions `t` (token t + 1): the first occurrence's and the copy's.

    In the copy, the prediction of token `t + 1` is possible from `t = L` on."""
    batch, length = repeats.tokens.shape
    t = torch.arange(length - 1)
    period = repeats.period[:, None]
    first = (t + 1 < period) & (t >= 0)
    copy = (t >= period) & (t + 1 < 2 * period)
    return first, copy


def segment_losses(
    params: gpt_fn.Params,
    repeats: Repeats,
    config: gpt_fn.GPTConfig,
    hooks_: gpt_fn.Hooks | None = None,
) -> tuple[float, float]:
    """Mean next-token loss on the segment's first occurrence and on its copy."""
    losses = -evaluation.token_scores(params, repeats.tokens, config, hooks=hooks_).logprobs
    first, copy = copy_masks(repeats)
    return losses[first].mean().item(), losses[copy].mean().item()


def induction_keys(repeats: Repeats) -> torch.Tensor:
    """`(batch, seq, seq)`: each query `t` of the copy marks key `t - L + 1`, the token after
    the first occurrence of the query's token (the segment's own ids may repeat by chance;
    this mask knows where the copy came from)."""
    _, copy = copy_masks(repeats)
    length = copy.shape[1]
    source = torch.arange(length)[None, :] - repeats.period[:, None] + 1
    keys = source[..., None] == torch.arange(length)  # (batch, query, key)
    return keys & copy[..., None]


def run(quick: bool, seed: int) -> dict[str, Any]:
    steps, batch, heads_to_ablate = (30, 8, 2) if quick else (STEPS, 32, 2)
    started = time.perf_counter()
    with shape_checks(False):
        params, losses = train_model(CONFIG, steps=steps, batch=batch, seed=seed)
        train_seconds = time.perf_counter() - started
        held_out = repeated_sequences(256, torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            inputs = held_out.tokens[:, :-1]
            _, cache = gpt_fn.run_with_cache(
                params, inputs, CONFIG, names=lambda site: site.endswith("attn.pattern")
            )
            scores = inspection.attention_mass(cache, induction_keys(held_out), CONFIG)
            previous = inspection.attention_mass(
                cache, inspection.previous_token_keys(inputs), CONFIG
            )
            order = scores.flatten().argsort(descending=True).tolist()
            as_pairs = [divmod(i, CONFIG.n_head) for i in order]
            top = as_pairs[:heads_to_ablate]
            # Control: the other heads of the induction heads' own layer(s).
            layers = {layer for layer, _ in top}
            bottom = [pair for pair in as_pairs if pair[0] in layers and pair not in top]
            # The strongest previous-token head below the top layer.
            before = [divmod(int(previous[:-1].flatten().argmax()), CONFIG.n_head)]
            clean = segment_losses(params, held_out, CONFIG)
            ablated = segment_losses(params, held_out, CONFIG, _ablate(top))
            control = segment_losses(params, held_out, CONFIG, _ablate(bottom))
            composed = segment_losses(params, held_out, CONFIG, _ablate(before))
            layer, head = top[0]
            pattern = cache[f"h.{layer}.attn.pattern"][0, head]
    return {
        "config": CONFIG.to_dict(),
        "length": CONFIG.block_size,
        "example_period": int(held_out.period[0]),
        "steps": steps,
        "batch": batch,
        "train_seconds": train_seconds,
        "train_loss": losses,
        "induction_scores": scores.tolist(),
        "induction_heads": [list(pair) for pair in top],
        "control_heads": [list(pair) for pair in bottom],
        "previous_token_scores": previous.tolist(),
        "previous_token_head": list(before[0]),
        "loss": {
            "segment, clean": clean[0],
            "copy, clean": clean[1],
            "copy, induction heads ablated": ablated[1],
            "copy, control heads ablated": control[1],
            "copy, previous-token head ablated": composed[1],
            "segment, induction heads ablated": ablated[0],
        },
        "top_head_pattern": pattern.tolist(),
    }


def _ablate(heads: list[tuple[int, int]]) -> gpt_fn.Hooks:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return hooks.merge(*(hooks.ablate_heads(layer, h) for layer, h in by_layer.items()))


def plot(result: dict[str, Any], path: Path) -> None:
    plots.head_heatmap(
        torch.tensor(result["induction_scores"]),
        title="induction score",
        label="attention to the token after the first occurrence",
        path=path.parent / "induction_scores.png",
    )
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].plot(result["train_loss"], lw=0.8)
    axes[0].set(xlabel="step", ylabel="train loss (both halves)", title="training", yscale="log")
    layer, head = result["induction_heads"][0]
    axes[1].imshow(torch.tensor(result["top_head_pattern"]), cmap="magma")
    axes[1].set(
        xlabel="key position", ylabel="query position", title=f"pattern of h.{layer} head {head}"
    )
    names = list(result["loss"])
    axes[2].barh(range(len(names)), [result["loss"][n] for n in names])
    axes[2].set_yticks(range(len(names)), names, fontsize="small")
    axes[2].axvline(torch.log(torch.tensor(float(VOCAB))).item(), ls="--", c="gray", lw=1)
    axes[2].set(xlabel="loss (nats); dashed: ln 64, a uniform guess", title="ablation")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick="30 steps: a smoke run", seed="seed of the init and the sequences",
        data_dir=False,
    )  # fmt: skip
    args = conventions.start(parser, argv)
    result = run(args.quick, args.seed)
    loss = result["loss"]
    print(
        f"induction heads {result['induction_heads']} (scores "
        f"{[round(result['induction_scores'][i][h], 3) for i, h in result['induction_heads']]}); "
        f"loss on the copy {loss['copy, clean']:.3f} clean, "
        f"{loss['copy, induction heads ablated']:.3f} ablated, "
        f"{loss['copy, control heads ablated']:.3f} control, "
        f"{loss['copy, previous-token head ablated']:.3f} previous-token head "
        f"{result['previous_token_head']} ablated; on the segment "
        f"{loss['segment, clean']:.3f}"
    )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
