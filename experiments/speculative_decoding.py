"""Speculative decoding with a small draft: how many proposals does the target accept, and is it faster?

Question: `gpt_fn.sampling.speculative_generate` lets a small draft model propose `k` tokens
per row and checks them with one forward of the target over its KV cache; its tokens are the
target's own (greedy: exactly; sampling: the same distribution). How often does a draft
trained on the same corpus agree with the target, and what does that buy in tokens/s over
plain cached decoding (`gpt_fn.sampling.generate`), at batch 1 and batch 8, greedy and
sampling? How does it depend on `k`?

Method: two models trained by `gpt_fn.train.train` on the offline Shakespeare corpus (GPT-2 BPE,
vocab 50304): the target is `cpu-small` (4 layers x 256, block 128: the README's main job, 300
steps), the draft 1 layer x 64 (300 steps). Prompts are 16-token windows of the val split at
seeded offsets; each generates 96 tokens (no eos). Batch 1 decodes the 8 prompts one after
another, batch 8 all at once, so both settings make the same tokens. Sampling uses temperature 0.8 and
top-k 200, applied alike to draft and target. Contenders alternate within each repeat (first
one, then the other), after a warm-up; figures are medians. Greedy speculative tokens are
compared with plain greedy tokens row by row. fp32 on CPU, one thread, checks off.

Leviathan et al. (2023) count a round as one target step plus `k` draft steps of `c` target
steps each, so the speed-up is `tokens per row per round / (k c + 1)` (a batch's rounds last
until its slowest row is done); both are measured here
(`c` from plain decoding of each model alone), so that prediction sits next to the measured
speed-up.

    python experiments/speculative_decoding.py [--quick] [--steps S] [--draft-steps S] [--k K]
        [--new-tokens N] [--repeats R] [--reuse-models] [--seed N] [--threads N] [--out DIR]
        [--data-dir DIR]

Writes `speculative_decoding.png` (tokens/s per setting; acceptance and speed-up against k),
`results.json`, and the two training runs (`target/`, `draft/`) to `--out` (default
`experiments/out/speculative_decoding/`); `--reuse-models` measures the models already there.
"""

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import conventions
from gpt_fn import sampling
from gpt_fn.checkpoint import checkpoint_path, load_checkpoint
from gpt_fn.rundir import read_metrics
from gpt_fn.settings import TrainSettings
from gpt_fn.shapes import shape_checks
from gpt_fn.train import train

NAME = "speculative_decoding"
PROMPT_TOKENS = 16
BATCHES = (1, 8)
MODES = ("greedy", "sample")
SWEEP_K = (1, 2, 3, 4, 6, 8)


def train_models(args: Any, steps: int, draft_steps: int) -> dict[str, dict[str, Any]]:
    """Train (or with --reuse-models, find) the target and the draft; their val losses."""
    common = dict(
        data="shakespeare", data_dir=str(args.data_dir), autocast_dtype="float32", device="cpu",
        compile=False, sample_tokens=0, seed=args.seed, overwrite=True,
        optimizer="adamw",  # what the measured models were trained with (README)
    )  # fmt: skip
    if args.quick:
        shapes = {
            "target": dict(preset="cpu-tiny", **conventions.QUICK_SHAPE),
            "draft": dict(preset="cpu-tiny", n_layer=1, n_head=1, n_embd=16, block_size=16),
        }
        sizes = dict(batch_size=2, eval_batches=1)
    else:
        shapes = {
            "target": dict(preset="cpu-small"),
            "draft": dict(preset="cpu-small", n_layer=1, n_head=2, n_embd=64),
        }
        sizes = dict(batch_size=16, eval_batches=10)
    models = {}
    for name, length in (("target", steps), ("draft", draft_steps)):
        out = args.out / name
        if not (args.reuse_models and checkpoint_path(out).exists()):
            settings = TrainSettings(
                **common, **shapes[name], **sizes, out_dir=str(out), max_steps=length,
                eval_interval=length,
            )  # fmt: skip
            print(f"training the {name} for {length} steps into {out}")
            train(settings, log=lambda *a, **k: None)
        saved = load_checkpoint(out)
        records = read_metrics(out / "metrics.jsonl")
        models[name] = {
            "params": saved.params,
            "config": saved.model_config,
            "steps": saved.step,
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
        }
    return models


def prompts(val: np.ndarray, batch: int, seed: int) -> list[list[int]]:
    """`batch` windows of PROMPT_TOKENS val tokens at seeded offsets."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - PROMPT_TOKENS, size=batch)
    return [val[s : s + PROMPT_TOKENS].astype(np.int64).tolist() for s in starts]


def race(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Any]:
    """Median seconds of each contender (alternating order, one warm-up) and its last output."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, Any] = {}
    names = list(contenders)
    for repeat in range(repeats + 1):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            outputs[name] = contenders[name]()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    return {"seconds": {n: statistics.median(s) for n, s in seconds.items()}, "outputs": outputs}


def predicted_speedup(tokens_per_round: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s accounting: a round costs one target step and `k` draft steps (each
    `cost_ratio` of a target step) and makes `tokens_per_round` tokens per row; plain decoding
    makes one token per target step."""
    return tokens_per_round / (k * cost_ratio + 1)


def in_batches(rows: list[list[int]], batch: int, decode: Callable[[list[list[int]]], Any]) -> Any:
    """`decode` over the rows `batch` at a time: batch 1 is each prompt alone, in turn.

    Returns the rows' tokens and, for speculative decoding, the calls' stats summed."""
    tokens, stats = [], []
    for first in range(0, len(rows), batch):
        out = decode(rows[first : first + batch])
        if isinstance(out, sampling.SpeculativeOutput):
            tokens += out.tokens
            stats.append(out.stats)
        else:
            tokens += out
    if not stats:
        return tokens
    return tokens, sampling.SpeculativeStats(*(sum(values) for values in zip(*stats, strict=True)))


def decoders(models: dict[str, Any], options: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """Plain decoding of the target (and of the draft), and speculative decoding with k."""
    target, draft = models["target"], models["draft"]

    def plain(rows, model=target):
        return sampling.generate(model["params"], rows, model["config"], **options)

    def speculative(rows, k):
        return sampling.speculative_generate(
            target["params"], rows, target["config"], draft_params=draft["params"],
            draft_config=draft["config"], num_draft_tokens=k, **options,
        )  # fmt: skip

    return {
        "plain": plain,
        "draft alone": lambda rows: plain(rows, draft),
        "speculative": speculative,
    }


def measure(models: dict[str, Any], rows: list[list[int]], *, k: int, new: int, repeats: int,
            seed: int) -> dict[str, Any]:  # fmt: skip
    """Plain and speculative decoding of every prompt, in batches of 1 and 8, greedy and sampling."""
    transforms = {"greedy": None, "sample": sampling.make_transform(temperature=0.8, top_k=200)}
    settings: list[dict[str, Any]] = []
    cost_ratio: dict[int, float] = {}
    for batch in BATCHES:
        for mode in MODES:
            options = dict(max_new_tokens=new, transform=transforms[mode])
            options |= dict(greedy=True) if mode == "greedy" else dict(seed=seed)
            run = decoders(models, options)
            contenders = {
                "plain": lambda b=batch, f=run["plain"]: in_batches(rows, b, f),
                "speculative": lambda b=batch, f=run["speculative"]: in_batches(
                    rows, b, lambda r: f(r, k)
                ),
            }
            if mode == "greedy":  # the draft alone: what a draft step costs next to a target's
                contenders["draft alone"] = lambda b=batch, f=run["draft alone"]: in_batches(
                    rows, b, f
                )
            result = race(contenders, repeats)
            tokens, stats = result["outputs"]["speculative"]
            entry = {
                "batch": batch,
                "mode": mode,
                "k": k,
                "tokens_per_s": {n: stats.new_tokens / s for n, s in result["seconds"].items()},
                "acceptance_rate": stats.acceptance_rate,
                "target_forwards": stats.rounds,
                "tokens_per_row_per_target_forward": stats.new_tokens / stats.row_rounds,
                # A batch runs until its slowest row is done: tokens per row per batch round.
                "tokens_per_row_per_round": stats.new_tokens / (stats.rounds * batch),
            }
            entry["speedup"] = entry["tokens_per_s"]["speculative"] / entry["tokens_per_s"]["plain"]
            if mode == "greedy":
                entry["identical_rows"] = sum(
                    a == b for a, b in zip(tokens, result["outputs"]["plain"], strict=True)
                )
                cost_ratio[batch] = result["seconds"]["draft alone"] / result["seconds"]["plain"]
            entry["cost_ratio"] = cost_ratio[batch]
            entry["predicted_speedup"] = predicted_speedup(
                entry["tokens_per_row_per_round"], k, cost_ratio[batch]
            )
            settings.append(entry)
            print(
                f"batch {batch} {mode:6s}: plain {entry['tokens_per_s']['plain']:.0f} tok/s, "
                f"speculative (k={k}) {entry['tokens_per_s']['speculative']:.0f} tok/s "
                f"({entry['speedup']:.2f}x, predicted {entry['predicted_speedup']:.2f}x), "
                f"acceptance {entry['acceptance_rate']:.1%}"
            )
    return {"settings": settings, "cost_ratio": cost_ratio}


def sweep(models: dict[str, Any], rows: list[list[int]], *, ks: tuple[int, ...], new: int,
          repeats: int, cost_ratio: dict[int, float]) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy speculative decoding for each k at each batch size, against plain decoding."""
    run = decoders(models, dict(max_new_tokens=new, greedy=True))
    entries = []
    for batch in BATCHES:
        contenders: dict[str, Callable[[], Any]] = {
            "plain": lambda b=batch: in_batches(rows, b, run["plain"])
        }
        for k in ks:
            contenders[f"k={k}"] = lambda b=batch, k=k: in_batches(
                rows, b, lambda r: run["speculative"](r, k)
            )
        result = race(contenders, repeats)
        for k in ks:
            _, stats = result["outputs"][f"k={k}"]
            entries.append({
                "batch": batch,
                "k": k,
                "acceptance_rate": stats.acceptance_rate,
                "tokens_per_s": stats.new_tokens / result["seconds"][f"k={k}"],
                "plain_tokens_per_s": stats.new_tokens / result["seconds"]["plain"],
                "speedup": result["seconds"]["plain"] / result["seconds"][f"k={k}"],
                "predicted_speedup": predicted_speedup(
                    stats.new_tokens / (stats.rounds * batch), k, cost_ratio[batch]
                ),
                "tokens_per_row_per_round": stats.new_tokens / (stats.rounds * batch),
                "tokens_per_row_per_target_forward": stats.new_tokens / stats.row_rounds,
                "target_forwards": stats.rounds,
            })  # fmt: skip
    return entries


def plot(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(13, 4.8))
    speeds, acceptance, speedup = fig.subplots(1, 3)
    settings = result["measurements"]["settings"]
    labels = [f"b{e['batch']} {e['mode']}" for e in settings]
    x = np.arange(len(settings))
    for offset, name, color in ((-0.2, "plain", "C0"), (0.2, "speculative", "C1")):
        bars = speeds.bar(
            x + offset, [e["tokens_per_s"][name] for e in settings], 0.4, label=name, color=color
        )
        speeds.bar_label(bars, fmt="%.0f", fontsize=7)
    speeds.set_xticks(x, labels)
    speeds.set(ylabel="tokens/s (median)", title=f"target alone vs with draft (k={result['k']})")
    speeds.legend()
    for batch, color in zip(BATCHES, ("C0", "C1"), strict=True):
        entries = [e for e in result["k_sweep"] if e["batch"] == batch]
        ks = [e["k"] for e in entries]
        acceptance.plot(ks, [e["acceptance_rate"] for e in entries], "o-", color=color,
                        label=f"batch {batch}")  # fmt: skip
        speedup.plot(ks, [e["speedup"] for e in entries], "o-", color=color,
                     label=f"batch {batch} measured")  # fmt: skip
        speedup.plot(ks, [e["predicted_speedup"] for e in entries], "x--", color=color,
                     label=f"batch {batch} predicted")  # fmt: skip
    acceptance.set(xlabel="k (draft tokens per round)", ylabel="acceptance rate",
                   title="greedy: proposals accepted", ylim=(0, 1))  # fmt: skip
    acceptance.legend()
    speedup.axhline(1.0, color="k", lw=0.8)
    speedup.set(xlabel="k", ylabel="speed-up over plain decoding", title="greedy: speed-up")
    speedup.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick="tiny models, 3 steps, 4 new tokens: a smoke run",
        seed="seed of the inits, the batches, the prompts and the samples",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="target training steps (300)")
    parser.add_argument("--draft-steps", type=int, default=None, help="draft training steps (300)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round (default 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per row (96)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (5)")
    parser.add_argument(
        "--reuse-models", action="store_true", help="measure the models already in --out"
    )
    args = conventions.start(parser, argv)
    steps = args.steps or (3 if args.quick else 300)
    draft_steps = args.draft_steps or (3 if args.quick else 300)
    new = args.new_tokens or (4 if args.quick else 96)
    repeats = args.repeats or (1 if args.quick else 5)
    ks = (1, 2) if args.quick else SWEEP_K
    args.out.mkdir(parents=True, exist_ok=True)
    models = train_models(args, steps, draft_steps)
    block = models["target"]["config"].block_size
    _, val = conventions.shakespeare(args.data_dir, block_size=block)
    rows = prompts(val, max(BATCHES), args.seed)
    if args.quick:  # the quick target's block holds 16 positions
        rows = [row[: block - new] for row in rows]
    with shape_checks(False):  # timed code runs unchecked (gpt_fn.shapes)
        measurements = measure(models, rows, k=args.k, new=new, repeats=repeats, seed=args.seed)
        k_sweep = sweep(models, rows, ks=ks, new=new, repeats=max(1, repeats // 2),
                        cost_ratio=measurements["cost_ratio"])  # fmt: skip
    result = {
        "models": {
            name: {"config": m["config"].to_dict(), "steps": m["steps"], "val_loss": m["val_loss"]}
            for name, m in models.items()
        },
        "k": args.k,
        "new_tokens": new,
        "prompt_tokens": len(rows[0]),
        "repeats": repeats,
        "measurements": measurements,
        "k_sweep": k_sweep,
    }
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
