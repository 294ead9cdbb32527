"""Greedy decoding speed: gpt_fn with and without the KV cache against HF `generate`.

A 4-layer, 256-wide GPT-2 with GPT-2's vocabulary (50257) and a 256-token block, random
weights; HF's `GPT2LMHeadModel` gets the same weights through `gpt_fn.hf.to_hf_state_dict`.
Each contender continues the same 16-token prompts by 128 greedy tokens (batch 1 and 8), and
the run checks that all three produce the same tokens. Contenders alternate within each repeat,
so drift in a shared machine's load hits all alike; figures are medians over repeats.

    python benchmarks/generate.py [--quick] [--threads N] [--out DIR] [--profile]

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the
weights, the LM head's (50257 x 256) above all; gpt_fn multiplies by a contiguous
(d_model, vocab) copy of `wte` made once per `generate` call (`lm_head_matrix`), which this
CPU reads ~3x faster than `F.linear`'s (vocab, d_model) layout. `--profile` prints
torch.profiler's table for one cached batch-1 run.

`run(quick, ...)` returns the numbers as a dict (its keyword arguments set the model, the
prompt and the batch sizes) and `markdown(result)` renders them.
"""

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2LMHeadModel

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import hf, sampling
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50257, block_size=256, n_layer=4, n_head=4, n_embd=256)
PROMPT_TOKENS = 16
NEW_TOKENS, QUICK_NEW_TOKENS = 128, 32
BATCHES = (1, 8)
CONTENDERS = ("gpt_fn cached", "gpt_fn uncached", "HF generate")


def run(
    quick: bool = False,
    *,
    threads: int | None = 1,
    config: gpt_fn.GPTConfig = CONFIG,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int | None = None,
    batches: tuple[int, ...] = BATCHES,
) -> dict:
    """Median tokens/s of each contender at each batch size, and the speed-up ratios.

    `new_tokens` defaults to `NEW_TOKENS` (quick: `QUICK_NEW_TOKENS`); `prompt_tokens +
    new_tokens` must fit `config.block_size`. `threads`: torch's intra-op CPU threads for the
    run, 1 by default: decode steps are tiny kernels, and on a shared 2-core machine a second
    thread spends more time waiting for a busy core than it saves (we measured 5x slower runs
    of both gpt_fn and HF with 2 threads under load). `None` keeps torch's setting.
    """
    new_tokens = new_tokens or (QUICK_NEW_TOKENS if quick else NEW_TOKENS)
    warmup, repeats = (1, 1) if quick else (1, 3)
    with cpu_threads(threads):
        threads_used = torch.get_num_threads()
        params = gpt_fn.init_params(config, seed=0)
        model = _hf_model(params, config)
        results = []
        for batch in batches:
            prompt = torch.randint(
                0,
                config.vocab_size,
                (batch, prompt_tokens),
                generator=torch.Generator().manual_seed(batch),
            )
            contenders: dict[str, Callable[[], torch.Tensor]] = {
                "gpt_fn cached": lambda prompt=prompt: sampling.generate(
                    params, prompt, config, max_new_tokens=new_tokens, greedy=True
                ),
                "gpt_fn uncached": lambda prompt=prompt: sampling.generate(
                    params, prompt, config, max_new_tokens=new_tokens, greedy=True, use_cache=False
                ),
                "HF generate": lambda prompt=prompt: _hf_generate(model, prompt, new_tokens),
            }
            outputs: dict[str, torch.Tensor] = {}
            with shape_checks(False), torch.no_grad():
                timings = take_turns(
                    contenders,
                    warmup + repeats,
                    device=torch.device("cpu"),
                    record=outputs.__setitem__,
                )
            tokens_per_s = {
                name: batch * new_tokens / statistics.median(times[warmup:])
                for name, times in timings.seconds.items()
            }
            results.append(
                {
                    "batch": batch,
                    "tokens_per_s": tokens_per_s,
                    "cached_over_hf": tokens_per_s["gpt_fn cached"] / tokens_per_s["HF generate"],
                    "cached_over_uncached": tokens_per_s["gpt_fn cached"]
                    / tokens_per_s["gpt_fn uncached"],
                    "same_tokens": all(
                        torch.equal(outputs[name], outputs["HF generate"]) for name in outputs
                    ),
                }
            )
    return {
        "benchmark": "generate",
        "config": config.to_dict(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads_used,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": results,
    }


def _hf_model(params: gpt_fn.Params, config: gpt_fn.GPTConfig) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel(GPT2Config(**hf.config_to_hf_dict(config))).eval()
    model.load_state_dict(hf.to_hf_state_dict(params, config))
    return model


def _hf_generate(model: GPT2LMHeadModel, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random weights may emit GPT-2's eos; generate them all
        pad_token_id=0,
        use_cache=True,
    )
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return out


def markdown(result: dict) -> str:
    """A table of tokens/s per batch size and the speed-up ratios."""
    c = result["config"]
    lines = [
        f"Greedy decoding, {c['n_layer']} layers x {c['n_embd']} wide, vocab {c['vocab_size']}, "
        f"{result['prompt_tokens']}-token prompt + {result['new_tokens']} new tokens, CPU, "
        f"{result['threads']} thread(s), torch {result['torch']}, transformers "
        f"{result['transformers']}; median of {result['repeats']} after {result['warmup']} warmup",
        "",
        "| batch | "
        + " | ".join(f"{name} tok/s" for name in CONTENDERS)
        + " | cached / HF | cached / uncached | same tokens |",
        "| ---: | " + " | ".join("---:" for _ in CONTENDERS) + " | ---: | ---: | :---: |",
    ]
    for row in result["results"]:
        speeds = " | ".join(f"{row['tokens_per_s'][name]:.1f}" for name in CONTENDERS)
        lines.append(
            f"| {row['batch']} | {speeds} | **{row['cached_over_hf']:.2f}x** | "
            f"**{row['cached_over_uncached']:.2f}x** | {'yes' if row['same_tokens'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def profile_table(
    *, threads: int | None = 1, rows: int = 15, config: gpt_fn.GPTConfig = CONFIG
) -> str:
    """torch.profiler's op table for one cached batch-1 generate of 128 tokens."""
    with cpu_threads(threads), shape_checks(False):
        params = gpt_fn.init_params(config, seed=0)
        prompt = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long)
        sampling.generate(params, prompt, config, max_new_tokens=8, greedy=True)  # warm up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sampling.generate(params, prompt, config, max_new_tokens=NEW_TOKENS, greedy=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    parser = command_line(
        "generate", __doc__, quick="32 tokens, one repeat: a smoke run", threads=1
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's op table")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile_table(threads=args.threads))
    result = run(args.quick, threads=args.threads)
    finish("generate", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
