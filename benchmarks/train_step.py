"""One training step, gpt_fn against Hugging Face `GPT2LMHeadModel`: tokens/s and MFU.

A step is forward with targets (the loss), backward and an AdamW update, on a 6-layer,
384-wide, 6-head GPT with a 256-token block, batch 8 and GPT-2's padded vocabulary (50304;
nanoGPT's "baby GPT" widths). The two contenders start from the same weights
(`gpt_fn.hf.to_hf_state_dict`) and see the same batch:

- gpt_fn: `gpt_fn.GPT(config)(x, y)` returns the loss through the fused LM head +
  cross-entropy (no (tokens, vocab) logits), then `loss.backward()` and
  `gpt_fn.optim.adamw(...).update_` in place over `module.params()` and their grads;
- HF: `GPT2LMHeadModel` with `attn_implementation="sdpa"` and no dropout, called with
  `labels=y, shift_labels=y` (HF's loss over all positions, as ours), then `backward()` and
  `torch.optim.AdamW(foreach=True)` with the same hyperparameters and decay groups.

Modes: fp32 eager, bf16 autocast, each with and without `torch.compile` of the model (the
optimizers stay eager). Within each repeat the contenders take turns, and who goes first
alternates, so load from other processes hits both alike; figures are medians over repeats
after warm-up; the first step (which includes compilation) is reported apart. The first-step
losses of the two must agree (same weights, same batch); their difference is reported, as is
the difference after the last step, after identical updates on both sides.

MFU is `gpt_fn.flops`'s (PaLM appendix B; nanoGPT `estimate_mfu`): achieved
`tokens/s x train_flops_per_token` over `peak_flops(device, dtype)`, a datasheet peak on
known GPUs and a measured 1024^3 matmul on CPUs (so on a CPU it is relative to what this
machine's BLAS reaches in that dtype; in fp32 for the bf16 modes where bf16 is not native,
see below).

On a CPU without native bf16 matmuls (no AVX512-BF16/AMX) ATen's bf16 matmul runs at a few
GFLOP/s, ~50x slower than fp32, so the bf16 modes there use batch 1 and 3 repeats (the
`batch` column says so), and their MFU is against the fp32 peak (the measured bf16 peak is
below what some of the model's bf16 matmuls reach); `--dtypes float32` skips them. On CUDA the full run also trains the
`gpt2` preset (124M parameters, block 1024, batch 16, bf16 autocast, compiled, SDPA limited
to the flash backend).

    python benchmarks/train_step.py [--quick] [--dtypes float32,bfloat16] [--compile|--no-compile]
                                    [--device cpu|cuda] [--threads N] [--out DIR]

`--quick`: a 2-layer, 64-wide model, fp32 eager only: seconds. Compile modes run only in the
full mode by default (inductor takes about a minute per model on a CPU). Shape checks are off
throughout. `run(quick, ...)` returns the numbers as a dict (its keyword arguments set the
model and batch), `markdown(result)` renders them and `plot(result, path)` draws tokens/s per
mode.
"""

import argparse
import contextlib
import functools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, dtype_names, finish
from benchmarks.timing import DTYPES, check_dtypes, cpu_threads, native_bf16, take_turns
from gpt_fn import flops, hf, optim
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384)
BATCH = 8
QUICK_CONFIG = gpt_fn.GPTConfig.from_preset("cpu-tiny")  # 2 layers x 64 wide, block 64
QUICK_BATCH = 4
GPT2_CONFIG = gpt_fn.GPTConfig.from_preset("gpt2", vocab_size=50304)
GPT2_BATCH = 16
HYPERPARAMETERS = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LR = 6e-4
CONTENDERS = ("gpt_fn", "HF")

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run(
    quick: bool = False,
    *,
    dtypes: tuple[str, ...] | None = None,
    compile: bool | None = None,
    device: str | None = None,
    threads: int | None = None,
    config: gpt_fn.GPTConfig | None = None,
    batch: int | None = None,
) -> dict:
    """Tokens/s, MFU and first-step loss agreement of both contenders in every mode.

    Defaults: quick runs `QUICK_CONFIG` at `QUICK_BATCH` in fp32 eager; the full run `CONFIG`
    at `BATCH` in every dtype, with and without compile, plus the `gpt2` preset on CUDA.
    `threads` sets torch's intra-op CPU threads for the run.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = dtypes or (("float32",) if quick else tuple(DTYPES))
    check_dtypes(dtypes)
    compile = (not quick) if compile is None else compile
    config = config or (QUICK_CONFIG if quick else CONFIG)
    batch = batch or (QUICK_BATCH if quick else BATCH)
    warmup, repeats = (1, 3) if quick else (2, 5)

    modes = []
    with cpu_threads(threads), shape_checks(False):
        threads_used = torch.get_num_threads()
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            slow_bf16 = dtype != torch.float32 and not native_bf16(dev)
            for compiled in (False, True) if compile else (False,):
                modes.append(
                    measure(
                        config,
                        batch=1 if slow_bf16 else batch,
                        dtype=dtype,
                        compiled=compiled,
                        device=dev,
                        warmup=1 if slow_bf16 else warmup,
                        repeats=3 if slow_bf16 else repeats,
                    )
                )
        if dev.type == "cuda" and not quick:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            modes.append(
                measure(
                    GPT2_CONFIG,
                    batch=GPT2_BATCH,
                    dtype=torch.bfloat16,
                    compiled=True,
                    device=dev,
                    warmup=warmup,
                    repeats=10,
                    # Flash only: a step that cannot use it fails instead of silently
                    # falling back to the math kernel.
                    context=lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
                    label="gpt2 preset, flash SDPA",
                )
            )
    return {
        "benchmark": "train_step",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "native_bf16": native_bf16(dev),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads_used,
        "modes": modes,
    }


def measure(
    config: gpt_fn.GPTConfig,
    *,
    batch: int,
    dtype: torch.dtype,
    compiled: bool,
    device: torch.device,
    warmup: int,
    repeats: int,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    label: str = "",
) -> dict:
    """Time both contenders' train steps in one mode; fresh models from the same weights."""
    params = gpt_fn.init_params(config, seed=0, device=device)
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), generator=generator)
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
    steps = {
        "gpt_fn": _gpt_fn_step(params, config, dtype, compiled),
        "HF": _hf_step(params, config, dtype, compiled, device),
    }
    del params  # each contender holds its own copy
    losses: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    seconds = take_turns(
        {name: functools.partial(_within, context, steps[name], x, y) for name in CONTENDERS},
        1 + warmup + repeats,  # step 0 also compiles
        device=device,
        record=lambda name, loss: losses[name].append(float(loss)),
    ).seconds
    tokens = batch * config.block_size
    # Without native bf16 the measured bf16 peak (one 1024^3 matmul on ATen's fallback) is
    # slower than some of the model's own bf16 matmuls (MFU against it would exceed 100%); the
    # fastest such a CPU multiplies is fp32, so bf16 MFU there is relative to the fp32 peak.
    peak_dtype = dtype if native_bf16(device) else torch.float32
    peak = flops.peak_flops(device, peak_dtype)
    tokens_per_s = {
        name: tokens / statistics.median(seconds[name][1 + warmup :]) for name in CONTENDERS
    }
    return {
        "label": label,
        "config": config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compiled,
        "batch": batch,
        "tokens_per_step": tokens,
        "warmup": warmup,
        "repeats": repeats,
        "first_step_s": {name: seconds[name][0] for name in CONTENDERS},
        "median_s": {name: statistics.median(seconds[name][1 + warmup :]) for name in CONTENDERS},
        "min_s": {name: min(seconds[name][1 + warmup :]) for name in CONTENDERS},
        "tokens_per_s": tokens_per_s,
        "peak_flops": peak,
        "peak_flops_dtype": str(peak_dtype).removeprefix("torch."),
        "flops_per_token": flops.train_flops_per_token(config, config.block_size),
        "mfu": {
            name: flops.mfu(tokens_per_s[name], config, config.block_size, peak)
            for name in CONTENDERS
        },
        "ratio": tokens_per_s["gpt_fn"] / tokens_per_s["HF"],
        "first_loss": {name: losses[name][0] for name in CONTENDERS},
        "first_loss_diff": abs(losses["gpt_fn"][0] - losses["HF"][0]),
        "last_loss_diff": abs(losses["gpt_fn"][-1] - losses["HF"][-1]),
    }


def _within(
    context: Callable[[], contextlib.AbstractContextManager],
    step: Step,
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    with context():
        return step(x, y)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _gpt_fn_step(
    params: gpt_fn.Params, config: gpt_fn.GPTConfig, dtype: torch.dtype, compiled: bool
) -> Step:
    module = gpt_fn.GPT.from_params({name: p.clone() for name, p in params.items()}, config)
    model = torch.compile(module) if compiled else module
    opt = optim.adamw(LR, **HYPERPARAMETERS)
    state = opt.init(module.params())
    device = next(module.parameters()).device

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for p in module.parameters():
            p.grad = None
        with _autocast(device, dtype):
            loss = model(x, y)
        loss.backward()
        current = module.params()
        opt.update_({name: p.grad for name, p in current.items()}, state, current)
        return loss.detach()

    return step


def _hf_step(
    params: gpt_fn.Params,
    config: gpt_fn.GPTConfig,
    dtype: torch.dtype,
    compiled: bool,
    device: torch.device,
) -> Step:
    hf_config = GPT2Config(**hf.config_to_hf_dict(config), attn_implementation="sdpa")
    module = GPT2LMHeadModel(hf_config).to(device).train()
    module.load_state_dict(hf.to_hf_state_dict(params, config))  # copies; the tie survives
    model = torch.compile(module) if compiled else module
    named = dict(module.named_parameters())  # the tied lm_head appears once, as wte
    mask = optim.default_decay_mask(named)
    groups = [
        {
            "params": [p for n, p in named.items() if mask[n]],
            "weight_decay": HYPERPARAMETERS["weight_decay"],
        },
        {"params": [p for n, p in named.items() if not mask[n]], "weight_decay": 0.0},
    ]
    hyper = {k: v for k, v in HYPERPARAMETERS.items() if k != "weight_decay"}
    opt = torch.optim.AdamW(groups, lr=LR, foreach=True, **hyper)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            # shift_labels: the targets as given, so HF averages over all positions as we do.
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _mode_name(mode: dict) -> str:
    name = f"{mode['dtype']}{' autocast' if mode['dtype'] != 'float32' else ''}"
    name += ", compiled" if mode["compile"] else ", eager"
    return f"{mode['label']}: {name}" if mode["label"] else name


def markdown(result: dict) -> str:
    """One row per mode: both contenders' tokens/s and MFU, the ratio, the loss agreement."""
    lines = [
        f"One train step (forward + backward + AdamW), {result['device_name']}, "
        f"{result['threads']} thread(s), torch {result['torch']}, transformers "
        f"{result['transformers']}. Tokens/s from the median step after warm-up; ratio = "
        "gpt_fn tokens/s / HF tokens/s (above 1: gpt_fn faster); first step includes "
        "compilation; loss diff = |gpt_fn - HF| at the first and the last step.",
        "",
    ]
    configs = {
        json.dumps(mode["config"], sort_keys=True): mode["config"] for mode in result["modes"]
    }
    for c in configs.values():
        lines.append(
            f"- {c['n_layer']} layers x {c['n_embd']} wide, {c['n_head']} heads, block "
            f"{c['block_size']}, vocab {c['vocab_size']}"
        )
    lines += [
        "",
        "| mode | model | batch | gpt_fn tok/s | HF tok/s | ratio | gpt_fn MFU | HF MFU "
        "| peak TFLOP/s (dtype) | first step s (gpt_fn / HF) | first loss | first loss diff "
        "| last loss diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for mode in result["modes"]:
        c, tps, mfu = mode["config"], mode["tokens_per_s"], mode["mfu"]
        first = mode["first_step_s"]
        lines.append(
            f"| {_mode_name(mode)} | {c['n_layer']}x{c['n_embd']}, T={c['block_size']} | "
            f"{mode['batch']} | {tps['gpt_fn']:.0f} | {tps['HF']:.0f} | "
            f"**{mode['ratio']:.2f}x** | {100 * mfu['gpt_fn']:.1f}% | {100 * mfu['HF']:.1f}% | "
            f"{mode['peak_flops'] / 1e12:.3g} ({mode['peak_flops_dtype']}) | {first['gpt_fn']:.1f} / {first['HF']:.1f} | "
            f"{mode['first_loss']['gpt_fn']:.4f} | {mode['first_loss_diff']:.1e} | "
            f"{mode['last_loss_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: tokens/s of each contender in each mode."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(modes) + 2), 4))
    width = 0.38
    for i, name in enumerate(CONTENDERS):
        xs = [m + (i - 0.5) * width for m in range(len(modes))]
        ax.bar(xs, [mode["tokens_per_s"][name] for mode in modes], width, label=name)
    ax.set_xticks(range(len(modes)), [_mode_name(mode) for mode in modes], fontsize="small")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"one train step, {result['device_name']}, {result['threads']} thread(s)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = command_line("train_step", __doc__, quick="tiny model, fp32 eager: seconds")
    parser.add_argument(
        "--dtypes", type=dtype_names, default=None, help="comma-separated: float32,bfloat16"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile'd models (default: on in the full run)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args(argv)
    result = run(
        args.quick,
        dtypes=args.dtypes,
        compile=args.compile,
        device=args.device,
        threads=args.threads,
    )
    finish("train_step", result, args.out, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
