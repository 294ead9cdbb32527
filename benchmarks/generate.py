"""Greedy decoding speed: gpt_fn's preallocated KV cache (eager and compiled) against HF `generate`.

A 4-layer, 256-wide GPT-2 with GPT-2's vocabulary (50257), random weights; HF's
`GPT2LMHeadModel` gets the same weights through `gpt_fn.hf.to_hf_state_dict` and decodes with
its own KV cache. Cases, 128 new greedy tokens each:

- batch 1 and batch 8, 16-token prompts;
- a ragged batch of 8 prompts of 4 to 64 tokens: gpt_fn takes the token lists, HF the same
  prompts left-padded with their attention mask.

Contenders: `gpt_fn cached` (`sampling.generate`), `gpt_fn compiled` (the same with
`compile=True`: the cached step through `torch.compile` over the filled slots, compiled in
warm-up),
`gpt_fn uncached` (the whole context recomputed each step) and `HF generate`. Every run
checks that all contenders produce the same tokens. A second table holds the cost of a step
as the sequence grows: tokens/s at 64, 256 and 1024 new tokens on the same model with a
1040-token block (batch 1), gpt_fn cached against HF, and the median step early and late in
the longest request (the clock read at every token). On the same model, `long_over_short` is
tokens/s at 768 new tokens over tokens/s at 64, eager and compiled (the four runs take turns,
and each request's long and short tokens must agree; also per CPU-second, which a busy
machine's waits for a core do not enter, and the compilations they took): a step attends
over the slots filled so far, so a long request should cost about what a short one does per
token. Contenders take turns within each repeat; figures are medians.

A third figure bounds what any decoder could reach at batch 1: `matvecs only` times the
matrix-vector products of a step and nothing else (one row times each block's four weight
matrices and the LM head, back to back: no attention, norms or Python between them), taking
turns with HF generate. A batch-1 step is a chain of such products whose cost is reading the
weights (64 MB at 4 x 256 with GPT-2's vocabulary), so its tokens/s over HF's is the highest
ratio a decoder on the same weights can reach on this machine in this run.

    python benchmarks/generate.py [--quick] [--threads N] [--out DIR] [--profile]

`--profile` prints torch.profiler's table for one cached batch-1 run.

`run(quick, ...)` returns the numbers as a dict (its keyword arguments set the model, the
prompts and the lengths) and `markdown(result)` renders them.
"""

import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2LMHeadModel

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import hf, sampling
from gpt_fn.nn.padding import pad
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50257, block_size=256, n_layer=4, n_head=4, n_embd=256)
PROMPT_TOKENS = 16
NEW_TOKENS, QUICK_NEW_TOKENS = 128, 8
RAGGED = (4, 64)  # prompt lengths of the ragged batch, from .. to
LENGTHS, QUICK_LENGTHS = (64, 256, 1024), (8, 16)
SHORT_LONG, QUICK_SHORT_LONG = (64, 768), (8, 16)  # new tokens of long_over_short's requests
CONTENDERS = ("gpt_fn cached", "gpt_fn compiled", "gpt_fn uncached", "HF generate")


def run(
    quick: bool = False,
    *,
    threads: int | None = 1,
    config: gpt_fn.GPTConfig = CONFIG,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int | None = None,
    lengths: tuple[int, ...] | None = None,
    short_long: tuple[int, int] | None = None,
    compile: bool | None = None,
) -> dict:
    """Tokens/s of each contender per case, the ratios, and tokens/s against length.

    `threads`: torch's intra-op CPU threads, 1 by default: decode steps are small kernels,
    and on a shared 2-core machine a second thread waits for a busy core more than it helps.
    `compile` (default: not in quick runs) adds the compiled contender.
    """
    new_tokens = new_tokens or (QUICK_NEW_TOKENS if quick else NEW_TOKENS)
    lengths = lengths or (QUICK_LENGTHS if quick else LENGTHS)
    short_long = short_long or (QUICK_SHORT_LONG if quick else SHORT_LONG)
    compile = (not quick) if compile is None else compile
    warmup, repeats = (1, 1) if quick else (1, 5)
    with cpu_threads(threads), shape_checks(False), torch.no_grad():
        threads_used = torch.get_num_threads()
        params = gpt_fn.init_params(config, seed=0)
        model = _hf_model(params, config)
        generator = torch.Generator().manual_seed(0)
        low, high = RAGGED
        ragged_lengths = torch.linspace(low, min(high, config.block_size - new_tokens), 8).long()
        cases = {
            "batch 1": _rows(1, prompt_tokens, config, generator),
            "batch 8": _rows(8, prompt_tokens, config, generator),
            f"ragged batch 8 (prompts {low}-{int(ragged_lengths[-1])})": [
                torch.randint(0, config.vocab_size, (int(n),), generator=generator).tolist()
                for n in ragged_lengths
            ],
        }
        results = [
            _case(name, rows, params, model, config, new_tokens, compile, warmup, repeats)
            for name, rows in cases.items()
        ]
        floor = _floor(params, model, cases["batch 1"], config, new_tokens, warmup, repeats)
        long_config = dataclasses.replace(
            config, block_size=prompt_tokens + max(*lengths, *short_long)
        )
        long_params = {
            **params,
            "wpe.weight": torch.randn(long_config.block_size, config.n_embd) * 0.02,
        }
        long_model = _hf_model(long_params, long_config)
        prompt = _rows(1, prompt_tokens, config, generator)
        growth = []
        for n in lengths:
            contenders = {
                "gpt_fn cached": lambda n=n: _gpt_fn(long_params, prompt, long_config, n),
                "HF generate": lambda n=n: _hf_generate(long_model, prompt, n),
            }
            timings = take_turns(contenders, warmup + repeats, device=torch.device("cpu"))
            growth.append(
                {
                    "new_tokens": n,
                    "tokens_per_s": {
                        name: n / statistics.median(t[warmup:])
                        for name, t in timings.seconds.items()
                    },
                }
            )
        steps = _step_times(long_params, long_model, prompt, long_config, max(lengths))
        long_over_short = _long_over_short(
            long_params, prompt, long_config, short_long, compile, warmup, repeats
        )
    return {
        "benchmark": "generate",
        "config": config.to_dict(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "long_block_size": long_config.block_size,
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads_used,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": results,
        "floor": floor,
        "growth": growth,
        "steps": steps,
        "long_over_short": long_over_short,
    }


def _rows(batch: int, length: int, config: gpt_fn.GPTConfig, generator: torch.Generator):
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator).tolist()


def _case(name, rows, params, model, config, new_tokens, compile, warmup, repeats) -> dict:
    contenders: dict[str, Callable[[], list[list[int]]]] = {
        "gpt_fn cached": lambda: _gpt_fn(params, rows, config, new_tokens),
        "gpt_fn uncached": lambda: _gpt_fn(params, rows, config, new_tokens, use_cache=False),
        "HF generate": lambda: _hf_generate(model, rows, new_tokens),
    }
    if compile:
        contenders["gpt_fn compiled"] = lambda: _gpt_fn(
            params, rows, config, new_tokens, compile=True
        )
    outputs: dict[str, list[list[int]]] = {}
    timings = take_turns(
        contenders, warmup + repeats, device=torch.device("cpu"), record=outputs.__setitem__
    )
    tokens = len(rows) * new_tokens
    tokens_per_s = {
        name: tokens / statistics.median(times[warmup:]) for name, times in timings.seconds.items()
    }
    hf_speed = tokens_per_s["HF generate"]
    return {
        "case": name,
        "batch": len(rows),
        "tokens_per_s": tokens_per_s,
        "over_hf": {name: speed / hf_speed for name, speed in tokens_per_s.items()},
        "same_tokens": all(out == outputs["HF generate"] for out in outputs.values()),
    }


def _floor(
    params: gpt_fn.Params,
    model: GPT2LMHeadModel,
    rows: list[list[int]],
    config: gpt_fn.GPTConfig,
    new_tokens: int,
    warmup: int,
    repeats: int,
) -> dict:
    """Tokens/s of a batch-1 "decoder" that only reads the weights, against HF generate."""
    matrices = [
        params[f"h.{i}.{name}.weight"]
        for i in range(config.n_layer)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    inputs = [torch.randn(1, w.shape[1]) for w in matrices]
    head = sampling.decoding_head(params, rows=1)
    hidden = torch.randn(1, config.n_embd)

    def matvecs_only() -> None:
        for _ in range(new_tokens):
            for x, w in zip(inputs, matrices, strict=True):
                torch.nn.functional.linear(x, w)
            head(hidden)

    contenders = {
        "matvecs only": matvecs_only,
        "HF generate": lambda: _hf_generate(model, rows, new_tokens),
    }
    timings = take_turns(contenders, warmup + repeats, device=torch.device("cpu"))
    tokens_per_s = {
        name: new_tokens / statistics.median(t[warmup:]) for name, t in timings.seconds.items()
    }
    weights = [*matrices, head.matrix]
    return {
        "weight_mb": sum(w.numel() * w.element_size() for w in weights) / 1e6,
        "step_ms": 1e3 / tokens_per_s["matvecs only"],
        "tokens_per_s": tokens_per_s,
        "over_hf": tokens_per_s["matvecs only"] / tokens_per_s["HF generate"],
    }


def _step_times(
    params: gpt_fn.Params,
    model: GPT2LMHeadModel,
    rows: list[list[int]],
    config: gpt_fn.GPTConfig,
    new_tokens: int,
) -> dict:
    """Median ms of a decode step early and late in one request of `new_tokens` tokens.

    The clock is read at every new token (`generate_stream`'s yields; HF's `streamer.put`), so
    a step is the time from one token to the next: the windows are the first and the last
    `min(64, new_tokens // 4)` steps."""
    window = max(1, min(64, new_tokens // 4))
    clocks: dict[str, list[float]] = {"gpt_fn cached": [], "HF generate": []}
    stream = sampling.generate_stream(params, rows, config, max_new_tokens=new_tokens, greedy=True)
    for _ in stream:
        clocks["gpt_fn cached"].append(time.perf_counter())

    class Clock:  # HF's streamer protocol: put(prompt), put(token) per step, end()
        def put(self, value) -> None:
            clocks["HF generate"].append(time.perf_counter())

        def end(self) -> None:
            pass

    _hf_generate(model, rows, new_tokens, streamer=Clock())
    result = {"new_tokens": new_tokens, "window": window}
    for name, times in clocks.items():
        times = times[-new_tokens:]  # HF's first put is the prompt
        steps = [1e3 * (b - a) for a, b in itertools.pairwise(times)]
        result[name] = {
            "first_ms": statistics.median(steps[:window]),
            "last_ms": statistics.median(steps[-window:]),
        }
    return result


def _long_over_short(
    params: gpt_fn.Params,
    rows: list[list[int]],
    config: gpt_fn.GPTConfig,
    short_long: tuple[int, int],
    compile: bool,
    warmup: int,
    repeats: int,
) -> dict:
    """Tokens/s of a long request over a short one's, eager (and compiled), taking turns.

    `same_tokens`: the short request's tokens start the long one's, and compiled decoding
    gives eager decoding's tokens. `cpu_ratio`: the same ratio in tokens per CPU-second of
    this process (a busy machine's waits for a core left out). `compilations`: the graphs
    dynamo compiled for them all."""
    short, long = short_long
    modes = {"gpt_fn cached": {}, **({"gpt_fn compiled": {"compile": True}} if compile else {})}
    contenders = {
        f"{mode}, {n} new": lambda n=n, options=options: _gpt_fn(params, rows, config, n, **options)
        for mode, options in modes.items()
        for n in short_long
    }
    outputs: dict[str, list[list[int]]] = {}
    graphs_before = counters["stats"]["unique_graphs"]
    timings = take_turns(
        contenders, warmup + repeats, device=torch.device("cpu"), record=outputs.__setitem__
    )
    speeds, cpu_speeds = (
        {
            mode: {
                str(n): n / statistics.median(times[f"{mode}, {n} new"][warmup:])
                for n in short_long
            }
            for mode in modes
        }
        for times in (timings.seconds, timings.cpu_seconds)
    )
    reference = outputs[f"gpt_fn cached, {long} new"]
    expected = {long: reference, short: [row[:short] for row in reference]}
    return {
        "short": short,
        "long": long,
        "tokens_per_s": speeds,
        "ratio": {mode: speeds[mode][str(long)] / speeds[mode][str(short)] for mode in modes},
        "cpu_ratio": {
            mode: cpu_speeds[mode][str(long)] / cpu_speeds[mode][str(short)] for mode in modes
        },
        "same_tokens": all(
            outputs[f"{mode}, {n} new"] == expected[n] for mode in modes for n in short_long
        ),
        "compilations": counters["stats"]["unique_graphs"] - graphs_before,
    }


def _gpt_fn(params, rows, config, new_tokens, **options) -> list[list[int]]:
    """The new tokens of each row (lists in, lists out)."""
    out = sampling.generate(params, rows, config, max_new_tokens=new_tokens, greedy=True, **options)
    return [row[len(prompt) :] for row, prompt in zip(out, rows, strict=True)]


def _hf_model(params: gpt_fn.Params, config: gpt_fn.GPTConfig) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel(GPT2Config(**hf.config_to_hf_dict(config))).eval()
    model.load_state_dict(hf.to_hf_state_dict(params, config))
    return model


def _hf_generate(
    model: GPT2LMHeadModel, rows: list[list[int]], new_tokens: int, streamer: object = None
) -> list[list[int]]:
    """HF's greedy new tokens of each row; `streamer` (HF's protocol) sees every token."""
    tokens, mask = pad(rows, side="left")
    out = model.generate(
        tokens,
        attention_mask=mask.long(),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random weights may emit GPT-2's eos; generate them all
        pad_token_id=0,
        use_cache=True,
        streamer=streamer,
    )
    return out[:, tokens.shape[1] :].tolist()


def markdown(result: dict) -> str:
    """Tokens/s per case with the ratios to HF, then tokens/s against the number generated."""
    c = result["config"]
    names = [n for n in CONTENDERS if n in result["results"][0]["tokens_per_s"]]
    lines = [
        f"Greedy decoding, {c['n_layer']} layers x {c['n_embd']} wide, vocab {c['vocab_size']}, "
        f"{result['new_tokens']} new tokens, CPU, {result['threads']} thread(s), torch "
        f"{result['torch']}, transformers {result['transformers']}; median of "
        f"{result['repeats']} after {result['warmup']} warm-up",
        "",
        "| case | " + " | ".join(f"{n} tok/s" for n in names)
        + " | " + " | ".join(f"{n} / HF" for n in names if n.startswith("gpt_fn"))
        + " | same tokens |",
        "| --- | " + " | ".join("---:" for _ in names) + " | "
        + " | ".join("---:" for n in names if n.startswith("gpt_fn")) + " | :---: |",
    ]  # fmt: skip
    for row in result["results"]:
        speeds = " | ".join(f"{row['tokens_per_s'][n]:.1f}" for n in names)
        ratios = " | ".join(f"{row['over_hf'][n]:.2f}x" for n in names if n.startswith("gpt_fn"))
        same = "yes" if row["same_tokens"] else "NO"
        lines.append(f"| {row['case']} | {speeds} | {ratios} | {same} |")
    floor = result["floor"]
    lines += [
        "",
        f"Floor at batch 1: a step's matrix-vector products alone (one row times "
        f"{floor['weight_mb']:.1f} MB of weights, nothing between them) take "
        f"{floor['step_ms']:.2f} ms here, {floor['tokens_per_s']['matvecs only']:.1f} tok/s: "
        f"{floor['over_hf']:.2f}x HF generate's "
        f"{floor['tokens_per_s']['HF generate']:.1f} tok/s in the same turns, the most any "
        "decoder on these weights could reach.",
        "",
        f"Tokens/s against the number of tokens generated (batch 1, "
        f"{result['prompt_tokens']}-token prompt, block {result['long_block_size']}):",
        "",
        "| new tokens | gpt_fn cached tok/s | HF generate tok/s | gpt_fn / HF |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in result["growth"]:
        ours, theirs = row["tokens_per_s"]["gpt_fn cached"], row["tokens_per_s"]["HF generate"]
        lines.append(f"| {row['new_tokens']} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    steps = result["steps"]
    lines += [
        "",
        f"A step early and late in one request of {steps['new_tokens']} new tokens (median ms of "
        f"the first and the last {steps['window']} steps): "
        + "; ".join(
            f"{name} {steps[name]['first_ms']:.2f} -> {steps[name]['last_ms']:.2f}"
            for name in ("gpt_fn cached", "HF generate")
        ),
    ]
    ratios = result["long_over_short"]
    lines += [
        "",
        f"Tokens/s at {ratios['long']} new tokens over tokens/s at {ratios['short']} (same "
        "model, taking turns): "
        + "; ".join(
            f"{name} {speeds[str(ratios['long'])]:.1f} / {speeds[str(ratios['short'])]:.1f} = "
            f"**{ratios['ratio'][name]:.2f}x**"
            for name, speeds in ratios["tokens_per_s"].items()
        )
        + "; per CPU-second: "
        + "; ".join(f"{name} **{ratio:.2f}x**" for name, ratio in ratios["cpu_ratio"].items())
        + f"; same tokens: {'yes' if ratios['same_tokens'] else 'NO'}; compilations: "
        f"{ratios['compilations']}",
    ]
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
    parser = command_line("generate", __doc__, quick="8 tokens, one repeat: a smoke run", threads=1)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's op table")
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the compiled contender"
    )
    args = parser.parse_args(argv)
    if args.profile:
        print(profile_table(threads=args.threads))
    result = run(args.quick, threads=args.threads, compile=False if args.no_compile else None)
    finish("generate", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
