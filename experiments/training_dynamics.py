"""Training dynamics: a run's checkpoint series, every readout vmapped over its steps.

Question. Over the main job's training, when does the model start to copy from its context
(an induction head, Olsson et al. 2022, "In-context Learning and Induction Heads"), and how
does that line up with its val loss and with the depth at which its prediction forms (the
logit lens)? Pythia answered this with log-spaced checkpoints; `--keep-checkpoints` keeps
such a series, and `gpt_fn.checkpoint.load_series` stacks it so one `torch.func.vmap` call
analyses every checkpoint.

Setup. `gpt-fn train`'s main job (`cpu-small` on the Shakespeare corpus, 300 steps) run with
`--keep-checkpoints log` into `--out/run` (or an existing run: `--run DIR`). One
function of one checkpoint's params computes, and `vmap` maps it over the step axis:

- val loss: the mean loss on the training loop's evaluation batches
  (`gpt_fn.data.eval_batch(seed, index)`, the run's batch size and seed);
- induction score: on sequences of `L = block_size / 2` random GPT-2 token ids followed by
  their copy, each head's mean attention from a query `t` in the copy to key `t - L + 1` (the
  token after the earlier occurrence of the query's token), from `h.{i}.attn.pattern`:
  `gpt_fn.inspect.attention_mass` against `gpt_fn.inspect.induction_keys`, the metric
  `induction_heads.py` uses; a checkpoint's score is its best head's;
- logit-lens depth: the top token of the logit lens (`gpt_fn.logit_lens`, `ln="recompute"`)
  at each depth (0: the embeddings; i: after block i), against the answer: the next token of
  held-out text (`LENS_ROWS` rows of the first evaluation batch), and the copied token in
  the copy. Its top-1 accuracy per depth, and the depth at which the answer first comes out
  on top, averaged over the positions the model (the last depth) gets right.

    python experiments/training_dynamics.py                 # trains the main job, ~6 idle CPU min
    python experiments/training_dynamics.py --run out       # a run of yours, kept with --keep-checkpoints
    python experiments/training_dynamics.py --quick         # a smoke run

Writes `training_dynamics.png` (the readouts against the step) and `results.json` into
`--out`.
"""

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
from gpt_fn import data
from gpt_fn import inspect as inspection
from gpt_fn.checkpoint import load_series, read_checkpoint_info, series_path
from gpt_fn.rundir import read_metrics
from gpt_fn.settings import TrainSettings
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import GPT2_VOCAB_SIZE
from gpt_fn.train import train

NAME = "training_dynamics"
KEEP = "log"
"""Steps 1, 2, 4, ..., 256 and the last: 10 checkpoints of the main job, 180 MB each."""
COPIES = 8
"""Sequences (a random segment and its copy) the induction score and the logit lens read."""
LENS_ROWS = 4
"""Rows of the first evaluation batch the logit lens reads (its logits are the memory)."""
STEPS_AT_ONCE = 2
"""Checkpoints per vmapped chunk: the logit lens holds (depth, batch, seq, vocab) logits."""


def train_main_job(args: Any) -> Path:
    """The main job with a kept series, trained into `--out/run`; returns the run folder."""
    run = args.out / "run"
    shape = conventions.QUICK_SHAPE if args.quick else {}
    quick = {"max_steps": 4, "batch_size": 4, "eval_batches": 1, "sample_tokens": 4}
    settings = TrainSettings(
        data_dir=str(args.data_dir),
        out_dir=str(run),
        keep_checkpoints=KEEP,
        seed=args.seed,
        device="cpu",
        overwrite=True,
        **({**shape, "preset": "cpu-tiny", **quick} if args.quick else {}),
    )
    train(settings)
    return run


def copies(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`(batch, 2 length)`: random GPT-2 token ids, then the same ids again."""
    segment = torch.randint(0, GPT2_VOCAB_SIZE, (batch, length), generator=generator)
    return torch.cat([segment, segment], dim=1)


def readouts(
    params: gpt_fn.Params,
    config: gpt_fn.GPTConfig,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
    repeated: torch.Tensor,
    induction_keys: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One checkpoint's val loss, induction scores `(n_layer, n_head)`, and logit-lens top
    tokens at each depth: `(depth, LENS_ROWS, seq)` on the text, `(depth, batch, L - 1)` at the
    copy's positions that have a next token."""
    val_loss = torch.stack(
        [gpt_fn.loss(params, x, y, config, attention="manual") for x, y in val_batches]
    ).mean()
    length = repeated.shape[1] // 2
    patterns = [f"h.{i}.attn.pattern" for i in range(config.n_layer)]
    _, cache = gpt_fn.run_with_cache(
        params,
        repeated,
        config,
        names=lambda site: site in patterns or site.endswith(("resid_pre", "resid_post")),
        attention="manual",
    )
    induction = inspection.attention_mass(cache, induction_keys, config)
    lens, _ = gpt_fn.logit_lens(
        params, cache, config, ln="recompute", pos=slice(length, 2 * length - 1)
    )
    _, text_cache = gpt_fn.run_with_cache(
        params,
        val_batches[0][0][:LENS_ROWS],
        config,
        names=lambda site: site.endswith(("resid_pre", "resid_post")),
        attention="manual",
    )
    text_lens, _ = gpt_fn.logit_lens(params, text_cache, config, ln="recompute")
    return val_loss, induction, text_lens.argmax(-1), lens.argmax(-1)


def lens_readouts(top: torch.Tensor, answers: torch.Tensor) -> tuple[list, list]:
    """From logit-lens top tokens `(step, depth, *positions)` and the answers `(*positions)`:
    the top-1 accuracy per step and depth, and per step the mean first depth at which the
    answer is on top over the positions the last depth gets right (None if there are none)."""
    correct = (top == answers).flatten(2)  # (step, depth, position)
    right = correct[:, -1]
    first = correct.int().argmax(dim=1).float()  # the first depth with the answer on top
    depth = [first[i][right[i]].mean().item() if right[i].any() else None for i in range(len(top))]
    return correct.float().mean(2).tolist(), depth


def analyse(run: Path, seed: int) -> dict[str, Any]:
    series = load_series(run)
    config = series.model_config
    settings = read_checkpoint_info(series_path(run, series.steps[-1])).train_settings
    val_tokens = data.load_split(
        TrainSettings.from_dict(settings).data_path(), "val", block_size=config.block_size
    )
    val_batches = [
        data.eval_batch(
            val_tokens,
            batch_size=settings["batch_size"],
            block_size=config.block_size,
            seed=settings["seed"],
            index=index,
        )
        for index in range(settings["eval_batches"])
    ]
    length = config.block_size // 2
    repeated = copies(COPIES, length, torch.Generator().manual_seed(seed))
    keys = inspection.induction_keys(repeated)  # query t in the copy -> key t - L + 1
    started = time.perf_counter()
    with torch.no_grad(), shape_checks(False):
        val_loss, induction, text_top, copy_top = torch.func.vmap(
            lambda params: readouts(params, config, val_batches, repeated, keys),
            chunk_size=STEPS_AT_ONCE,
        )(series.params)
    seconds = time.perf_counter() - started
    text_accuracy, text_depth = lens_readouts(text_top, val_batches[0][1][:LENS_ROWS])
    copy_accuracy, copy_depth = lens_readouts(copy_top, repeated[:, length + 1 :])
    best = induction.flatten(1).max(dim=1)
    metrics = read_metrics(run / "metrics.jsonl")
    return {
        "run": str(run),
        "config": config.to_dict(),
        "steps": series.steps,
        "val_loss": val_loss.tolist(),
        "induction_score": best.values.tolist(),
        "induction_head": [divmod(int(i), config.n_head) for i in best.indices],
        "induction_scores": induction.tolist(),
        "text_lens_accuracy": text_accuracy,
        "text_answer_depth": text_depth,
        "copy_lens_accuracy": copy_accuracy,
        "copy_answer_depth": copy_depth,
        "train_loss": [[r["step"] + 1, r["loss"]] for r in metrics if r.get("loss") is not None],
        "analysis_seconds": seconds,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    steps = result["steps"]
    fig = Figure(figsize=(20, 4.4))
    axes = fig.subplots(1, 4, sharex=True)
    train_steps, train_loss = zip(*result["train_loss"], strict=True)
    axes[0].plot(train_steps, train_loss, lw=0.6, alpha=0.6, label="train (every step)")
    axes[0].plot(steps, result["val_loss"], "o-", label="val (each kept checkpoint)")
    axes[0].set(ylabel="loss (nats/token)", title="loss")
    axes[1].plot(steps, result["induction_score"], "o-", label="induction score, best head")
    copied = [row[-1] for row in result["copy_lens_accuracy"]]
    axes[1].plot(steps, copied, "s--", label="copy predicted (top-1)")
    axes[1].set(ylim=(0, 1), title="induction: attention to t - L + 1; copying")
    text = torch.tensor(result["text_lens_accuracy"]).T  # (depth, step)
    for depth, accuracy in enumerate(text.tolist()):
        axes[2].plot(steps, accuracy, "o-", ms=3, label=f"depth {depth}")
    axes[2].set(ylabel="top-1 accuracy of the next token", title="logit lens on held-out text")
    for key, label in (("text_answer_depth", "held-out text"), ("copy_answer_depth", "the copy")):
        shown = [(s, d) for s, d in zip(steps, result[key], strict=True) if d is not None]
        if shown:
            axes[3].plot(*zip(*shown, strict=True), "o-", label=label)
    axes[3].set(
        ylabel="depth (0: embeddings, i: after block i)",
        title="first depth a right answer is on top",
        ylim=(-0.1, len(text) - 0.9),
    )
    for ax in axes:
        ax.set(xscale="log", xlabel="step (kept checkpoints, log scale)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick="a 1-layer model for 4 steps: a smoke run",
        seed="seed of the training run and of the copied sequences",
    )  # fmt: skip
    parser.add_argument(
        "--run", type=Path, help="analyse this run folder's kept checkpoints instead of training"
    )
    args = conventions.start(parser, argv)
    run = args.run if args.run is not None else train_main_job(args)
    result = analyse(run, args.seed)
    print(
        f"steps {result['steps']}: val loss "
        f"{[round(v, 3) for v in result['val_loss']]}, induction score "
        f"{[round(v, 2) for v in result['induction_score']]}, answer depth on text "
        f"{[None if d is None else round(d, 2) for d in result['text_answer_depth']]}"
    )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
