"""Indirect object identification: which heads carry the answer, by activation patching.

Question. "When Mary and John went to the store, John gave a drink to" is completed with
" Mary": the indirect object, the name that was not repeated (Wang et al. 2022,
"Interpretability in the Wild"). Swap the names ("When John and Mary went to the store, Mary
gave a drink to") and a model that does the task prefers " John". Patching one component
of the clean run into the corrupted run, one at a time, measures how much of the clean
answer each restores: which heads, and which positions of the residual stream, carry it?

Setup. Eight prompts of that template (four name pairs, each in both orders; every name one
GPT-2 token, so the prompts align). Metric: the mean logit difference between the clean
answer and the other name at the last position. `gpt_fn.patching.activation_patch` (clean
into corrupted, TransformerLens's `get_act_patch_*` direction) over every head's output
(`attn.z`, by head) and over the residual stream entering each block at each position
(`resid_pre`, by position), each entry as the fraction of the clean-corrupted gap restored:
`(patched - corrupted) / (clean - corrupted)`. The top head's entry is checked against a
plain forward with `hooks.patch`. Without weights the script trains its own model first: 2
layers x 4 heads x 64 on the template with two of `NAMES` in random roles, the loss on the
answer alone.

    python experiments/ioi_patching.py                   # trains the toy model (300 steps)
    python experiments/ioi_patching.py --hf DIR          # GPT-2 weights (save_pretrained)
    python experiments/ioi_patching.py --checkpoint DIR  # a gpt_fn checkpoint (the main job's)
    python experiments/ioi_patching.py --random          # GPT-2 small's shape, untrained
    python experiments/ioi_patching.py --quick           # 5 training steps: a smoke run

Writes `ioi_patching.png` (the layer x head map), `resid_pre.png` (the layer x position map),
`dla_heads.png` (each head's direct logit attribution on the clean prompts: its direct effect,
next to the patching map's total effect) and `results.json` into `--out`.
"""

import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from experiments import conventions
from gpt_fn import hf, hooks, optim, patching, plots
from gpt_fn.checkpoint import load_checkpoint
from gpt_fn.model import IGNORE_INDEX
from gpt_fn.runtime import CPU_FP32
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import gpt2, single_token
from gpt_fn.train import train_step

NAME = "ioi_patching"
TEMPLATE = "When{io} and{s} went to the store,{s} gave a drink to"
"""`io` is the indirect object (the answer), `s` the subject, named twice."""
PAIRS = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
MIN_GAP = 0.1
"""A clean-corrupted gap in logit difference below this is noise (a random model): the maps
are then the change itself, not a fraction of it."""
NAMES = [
    " Mary",
    " John",
    " Tom",
    " James",
    " Dan",
    " Sid",
    " Martin",
    " Amy",
    " Alice",
    " Bob",
    " Sarah",
    " Paul",
    " Kate",
    " Mark",
    " Anna",
    " Luke",
    " Emma",
    " Jack",
    " Lisa",
    " Sam",
    " Rose",
    " Tim",
    " Jane",
    " Max",
    " Ben",
    " Eve",
    " Joe",
    " Ann",
]
"""The names a toy model is trained on (each one GPT-2 token; `PAIRS` are among them)."""
TOY_CONFIG = gpt_fn.GPTConfig(vocab_size=50257, block_size=16, n_layer=2, n_head=4, n_embd=64)
TOY_BATCH, TOY_LR, TRAIN_STEPS, QUICK_STEPS = 32, 3e-3, 300, 5


def prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted (names swapped) prompts, and each row's answer and other name."""
    clean, corrupted, answers, others = [], [], [], []
    for first, second in PAIRS:
        for io, s in ((first, second), (second, first)):
            clean.append(gpt2().encode_ordinary(TEMPLATE.format(io=io, s=s)))
            corrupted.append(gpt2().encode_ordinary(TEMPLATE.format(io=s, s=io)))
            answers.append(single_token(io))
            others.append(single_token(s))
    return (
        torch.tensor(clean),
        torch.tensor(corrupted),
        torch.tensor(answers),
        torch.tensor(others),
    )


def logit_difference(answers: torch.Tensor, others: torch.Tensor):
    """The metric: the mean over rows of the answer's logit minus the other name's, last
    position."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last.gather(1, answers[:, None]) - last.gather(1, others[:, None])).mean()

    return metric


def training_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` prompts of the template with two distinct names of `NAMES` in random roles, and
    targets that score only the last position (the indirect object); others are ignored."""
    rows, answers = [], []
    for _ in range(batch):
        io, s = (NAMES[i] for i in torch.randperm(len(NAMES), generator=generator)[:2].tolist())
        rows.append(gpt2().encode_ordinary(TEMPLATE.format(io=io, s=s)))
        answers.append(single_token(io))
    x = torch.tensor(rows)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, -1] = torch.tensor(answers)
    return x, y


def train_toy(steps: int, seed: int) -> tuple[gpt_fn.Params, list[float]]:
    """`TOY_CONFIG` trained on fresh `training_batch`es for `steps` steps; params, losses."""
    module = gpt_fn.GPT(TOY_CONFIG, seed=seed)
    params = module.params()
    optimizer = optim.adamw(
        optim.warmup_cosine(TOY_LR, TOY_LR / 10, max(1, steps // 10), steps), weight_decay=0.01
    )
    state = optimizer.init(params)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with shape_checks(False):
        for _ in range(steps):
            batch = [training_batch(TOY_BATCH, generator)]
            loss, _ = train_step(
                module, params, optimizer, state, batch, runtime=CPU_FP32, grad_clip=1.0
            )
            losses.append(loss.item())
    return {name: value.detach() for name, value in params.items()}, losses


def load_model(args) -> tuple[gpt_fn.Params, gpt_fn.GPTConfig, str, list[float]]:
    """The model to patch, a line saying what it is, and its training losses (if trained here)."""
    if args.hf is not None:
        params, config = hf.load(args.hf)
        return params, config, f"GPT-2 weights from {args.hf}", []
    if args.checkpoint is not None:
        saved = load_checkpoint(args.checkpoint)
        about = f"checkpoint {args.checkpoint}, step {saved.step}"
        return saved.params, saved.model_config, about, []
    if args.random:
        config = gpt_fn.GPTConfig.from_preset("gpt2")
        shape = f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd}"
        return gpt_fn.init_params(config, seed=args.seed), config, f"random weights ({shape})", []
    steps = QUICK_STEPS if args.quick else args.train_steps
    params, losses = train_toy(steps, args.seed)
    c = TOY_CONFIG
    about = f"{c.n_layer} layers x {c.n_head} heads x {c.n_embd} trained {steps} steps on IOI"
    return params, TOY_CONFIG, about, losses


def run(params: gpt_fn.Params, config: gpt_fn.GPTConfig) -> dict[str, Any]:
    clean, corrupted, answers, others = prompts()
    metric = logit_difference(answers, others)
    with shape_checks(False), torch.no_grad():
        clean_value = metric(gpt_fn.forward(params, clean, config)).item()
        corrupted_value = metric(gpt_fn.forward(params, corrupted, config)).item()
        gap = clean_value - corrupted_value
        sweeps, seconds = {}, {}
        for site, by in (("attn.z", "head"), ("resid_pre", "position")):
            started = time.perf_counter()
            sweeps[site] = patching.activation_patch(
                params, clean, corrupted, config, metric, site=site, by=by
            )
            seconds[site] = time.perf_counter() - started
        # The top head's entry again, by a plain forward with hooks.patch.
        heads = sweeps["attn.z"]
        layer, head = divmod(int((heads - corrupted_value).abs().argmax()), config.n_head)
        _, cache = gpt_fn.run_with_cache(params, clean, config, names=[f"h.{layer}.attn.z"])
        hooked = gpt_fn.forward(
            params,
            corrupted,
            config,
            hooks=hooks.patch(f"h.{layer}.attn.z", cache[f"h.{layer}.attn.z"], heads=[head]),
        )
        check = abs(metric(hooked).item() - heads[layer, head].item())
        # Each head's direct effect on the clean run's logit difference (DLA, frozen ln_f),
        # next to its total effect above.
        _, clean_cache = gpt_fn.run_with_cache(params, clean, config)
        dla, _ = gpt_fn.direct_logit_attribution(
            params, clean_cache, answers, config, by="head", incorrect=others
        )
        dla_heads = dla[: config.n_layer * config.n_head].mean(1).view(config.n_layer, -1)
    return {
        "prompts": [gpt2().decode(row) for row in clean.tolist()],
        "corrupted": [gpt2().decode(row) for row in corrupted.tolist()],
        "tokens": [gpt2().decode([t]) for t in clean[0].tolist()],
        "config": config.to_dict(),
        "clean_logit_difference": clean_value,
        "corrupted_logit_difference": corrupted_value,
        "heads": heads.tolist(),
        "resid_pre": sweeps["resid_pre"].tolist(),
        # Each entry as the fraction of the gap it restores; none where the gap is noise.
        "heads_restored": restored(heads, corrupted_value, gap),
        "resid_pre_restored": restored(sweeps["resid_pre"], corrupted_value, gap),
        "dla_heads": dla_heads.tolist(),
        "dla_total": dla.mean(1).sum().item(),
        "top_head": [layer, head],
        "top_head_check": {"hooked_forward": metric(hooked).item(), "max_abs_diff": check},
        "sweep_seconds": seconds,
    }


def restored(patched: torch.Tensor, corrupted: float, gap: float) -> list[list[float]] | None:
    """`(patched - corrupted) / gap`, or None when the gap is below `MIN_GAP`."""
    return None if abs(gap) < MIN_GAP else ((patched - corrupted) / gap).tolist()


def plot(result: dict[str, Any], path: Path) -> None:
    clean, corrupted = result["clean_logit_difference"], result["corrupted_logit_difference"]
    numbers = f"clean {clean:.3f}, corrupted {corrupted:.3f}"
    plots.head_heatmap(
        torch.tensor(result["dla_heads"]),
        title=f"IOI, each head's direct logit attribution\n(clean logit difference {clean:.3f})",
        label="logit difference, direct",
        path=path.parent / "dla_heads.png",
    )
    for key, what, file, axes in (
        ("heads", "each head", path, {}),
        ("resid_pre", "resid_pre at each position", path.parent / "resid_pre.png",
         {"columns": "position", "column_labels": result["tokens"]}),
    ):  # fmt: skip
        fractions = result[f"{key}_restored"]
        if fractions is None:  # no gap to speak of: the change itself
            values = torch.tensor(result[key]) - corrupted
            label = "logit difference, patched - corrupted"
        else:
            values, label = torch.tensor(fractions), "fraction of the clean - corrupted gap"
        plots.head_heatmap(
            values,
            title=f"IOI, patching {what}\n({numbers})",
            label=label,
            path=file,
            **axes,
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = conventions.command_line(
        NAME, __doc__, quick=f"{QUICK_STEPS} training steps: a smoke run",
        seed="seed of the model's init and its training prompts (when no weights are given)",
        data_dir=False,
    )  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf", type=Path, help="GPT-2 weights: a save_pretrained directory")
    source.add_argument("--checkpoint", type=Path, help="a gpt_fn checkpoint (file or out dir)")
    source.add_argument(
        "--random", action="store_true", help="random weights of GPT-2 small's shape, untrained"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=TRAIN_STEPS,
        help=f"steps of the toy model trained when no weights are given (default {TRAIN_STEPS})",
    )
    args = conventions.start(parser, argv)
    params, config, model, losses = load_model(args)
    result = {"model": model, "train_loss": losses, **run(params, config)}
    layer, head = result["top_head"]
    print(
        f"{model}: logit difference clean {result['clean_logit_difference']:.3f}, corrupted "
        f"{result['corrupted_logit_difference']:.3f}; top head L{layer}H{head} moves it to "
        f"{result['heads'][layer][head]:.3f} (a hooked forward agrees to "
        f"{result['top_head_check']['max_abs_diff']:.1e})"
    )
    return conventions.finish(NAME, args, result, plot)


if __name__ == "__main__":
    main()
