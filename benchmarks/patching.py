"""Activation patching sweeps: `gpt_fn.patching` against TransformerLens's loop, same process.

One GPT-2-small-shaped model (12 layers, 768 wide, GPT-2's vocabulary; gpt_fn's random init,
saved as an HF GPT-2 with `gpt_fn.hf.save` for TransformerLens to load),
a clean and a corrupted prompt (1 x 10 tokens, IOI-sized) and a logit-difference
metric at the last position. Two sweeps, each also checked for equal results:

- the residual stream entering every block, position by position
  (`transformer_lens.patching.get_act_patch_resid_pre` against
  `activation_patch(site="resid_pre", by="position")`);
- every head's output over all positions (`get_act_patch_attn_head_out_all_pos` against
  `activation_patch(site="attn.z", by="head")`, and `attribution_patch`'s estimate of it).

TransformerLens runs one full forward per patched component (its `TransformerBridge` over
HF's GPT-2, hooks in compatibility mode); gpt_fn runs each input once with a cache and then
only the blocks from the patched layer on, `chunk` patched runs stacked in one forward. The
contenders take turns; each call is a whole sweep (hundreds of forwards), so the first
forward of each model runs before the clock instead of a warm-up round.

    python benchmarks/patching.py [--quick] [--threads N] [--out DIR]
"""

import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import hf
from gpt_fn.patching import activation_patch, attribution_patch
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
BATCH, SEQ = 1, 10
TL = "TransformerLens loop"
OURS = "gpt_fn activation_patch"
ESTIMATE = "gpt_fn attribution_patch"


def run(
    quick: bool = False,
    *,
    threads: int | None = 1,
    config: gpt_fn.GPTConfig = CONFIG,
    batch: int = BATCH,
    seq: int = SEQ,
) -> dict:
    """Median seconds of each contender per sweep, the speed-ups and the results' agreement."""
    from transformer_lens import patching

    repeats = 1 if quick else 3
    with cpu_threads(threads), shape_checks(False), tempfile.TemporaryDirectory() as directory:
        params, bridge = _models(config, Path(directory))
        generator = torch.Generator().manual_seed(1)
        clean, corrupted = torch.randint(0, config.vocab_size, (2, batch, seq), generator=generator)

        def logit_diff(logits: torch.Tensor) -> torch.Tensor:
            return (logits[:, -1, 1] - logits[:, -1, 2]).mean()

        with torch.no_grad():
            gpt_fn.forward(params, corrupted, config)  # first calls: allocator, kernels
            _, clean_cache = bridge.run_with_cache(clean)
        sweeps = {
            "resid_pre, every layer x position": {
                TL: lambda: patching.get_act_patch_resid_pre(
                    bridge, corrupted, clean_cache, logit_diff
                ),
                OURS: lambda: activation_patch(
                    params, clean, corrupted, config, logit_diff, site="resid_pre", by="position"
                ),
            },
            "head outputs, every layer x head": {
                TL: lambda: patching.get_act_patch_attn_head_out_all_pos(
                    bridge, corrupted, clean_cache, logit_diff
                ),
                OURS: lambda: activation_patch(
                    params, clean, corrupted, config, logit_diff, site="attn.z", by="head"
                ),
                ESTIMATE: lambda: attribution_patch(
                    params, clean, corrupted, config, logit_diff, site="attn.z", by="head"
                ),
            },
        }
        rows = []
        # TransformerLens's progress bar, one line per patched run, would bury the report.
        quiet = mock.patch.object(patching, "tqdm", lambda items, **_: items)
        with quiet, torch.no_grad():
            for sweep, contenders in sweeps.items():
                outputs: dict[str, torch.Tensor] = {}
                timings = take_turns(
                    contenders,
                    repeats,
                    device=torch.device("cpu"),
                    record=outputs.__setitem__,
                )
                seconds = {name: statistics.median(s) for name, s in timings.seconds.items()}
                rows.append(
                    {
                        "sweep": sweep,
                        "runs": int(outputs[TL].numel()),
                        "median_s": seconds,
                        "speedup_vs_tl": {n: seconds[TL] / s for n, s in seconds.items()},
                        "max_abs_diff_vs_tl": float((outputs[OURS] - outputs[TL]).abs().max()),
                    }
                )
    return {
        "benchmark": "patching",
        "config": config.to_dict(),
        "batch": batch,
        "seq": seq,
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "repeats": repeats,
        "rows": rows,
    }


def _models(config: gpt_fn.GPTConfig, directory: Path):
    """gpt_fn's random params and a TransformerLens bridge of the same weights, saved as an HF
    GPT-2 (`hf.save`)."""
    from transformer_lens.model_bridge import TransformerBridge

    params = gpt_fn.init_params(config, seed=0)
    hf.save(params, config, directory, tokenizer=False)
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    return params, bridge


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"{c['n_layer']} layers x {c['n_embd']}, {c['n_head']} heads, vocab {c['vocab_size']}; "
        f"batch {result['batch']} x {result['seq']} tokens; CPU, {result['threads']} thread(s), "
        f"torch {result['torch']}; median seconds of {result['repeats']} interleaved repeats "
        "(each a whole sweep)",
        "",
        f"| sweep | patched runs | {TL} s | {OURS} s | speed-up | {ESTIMATE} s | max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        s = row["median_s"]
        estimate = f"{s[ESTIMATE]:.2f}" if ESTIMATE in s else "-"
        lines.append(
            f"| {row['sweep']} | {row['runs']} | {s[TL]:.2f} | {s[OURS]:.2f} | "
            f"**{row['speedup_vs_tl'][OURS]:.1f}x** | {estimate} | "
            f"{row['max_abs_diff_vs_tl']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = command_line("patching", __doc__, quick="one repeat: a smoke run", threads=1)
    args = parser.parse_args(argv)
    finish("patching", run(args.quick, threads=args.threads), args.out, markdown=markdown)


if __name__ == "__main__":
    main()
