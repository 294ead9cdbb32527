"""What `gpt-fn inspect` costs: its readouts and its report, against one forward of the model.

One GPT-2-small-shaped model (random weights) and the 14-token IOI prompt. Contenders, taking
turns: a plain `gpt_fn.forward` (the peer: what the model itself costs), `inspect_prompt` (one
`run_with_cache` with the attention patterns, the logit lens, direct logit attribution, head
scores) and `write_report` (six PNGs, `report.md`, `results.json`) of that inspection, each
as a multiple of the forward. Checked: the DLA rows sum to the forward's logit difference.

    python benchmarks/inspect_prompt.py [--quick] [--threads N] [--out DIR]
"""

import statistics
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import inspect as inspection
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import gpt2, single_token

CONFIG = gpt_fn.GPTConfig.from_preset("gpt2")
PROMPT = "When Mary and John went to the store, John gave a drink to"
FORWARD = "forward"
READOUTS = "inspect_prompt"
REPORT = "write_report"


def run(quick: bool = False, *, threads: int | None = 1, config: gpt_fn.GPTConfig = CONFIG) -> dict:
    """Median seconds of each contender and each one's multiple of the forward."""
    repeats = 1 if quick else 3
    tokens = torch.tensor(gpt2().encode_ordinary(PROMPT))
    answer, wrong = single_token(" Mary"), single_token(" John")
    with cpu_threads(threads), shape_checks(False), tempfile.TemporaryDirectory() as folder:
        params = gpt_fn.init_params(config, seed=0)
        found = inspection.inspect_prompt(params, tokens, config, answer=answer, wrong=wrong)
        contenders = {
            FORWARD: lambda: gpt_fn.forward(params, tokens[None], config),
            READOUTS: lambda: inspection.inspect_prompt(
                params, tokens, config, answer=answer, wrong=wrong
            ),
            REPORT: lambda: inspection.write_report(found, folder, config),
        }
        with torch.no_grad():
            timings = take_turns(contenders, repeats, device=torch.device("cpu"))
            last = gpt_fn.forward(params, tokens[None], config)[0, -1]
        # The readouts agree with the model: the DLA rows sum to the forward's logit difference.
        difference = float(last[answer] - last[wrong])
        dla_error = abs(float(found.dla_by_head.sum()) - difference)
    seconds = {name: statistics.median(s) for name, s in timings.seconds.items()}
    return {
        "benchmark": "inspect_prompt",
        "config": config.to_dict(),
        "tokens": len(tokens),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "repeats": repeats,
        "median_s": seconds,
        "forwards": {name: s / seconds[FORWARD] for name, s in seconds.items()},
        "logit_difference": difference,
        "dla_sum_abs_error": dla_error,
    }


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"{c['n_layer']} layers x {c['n_embd']}, {c['n_head']} heads, vocab {c['vocab_size']}; "
        f"one {result['tokens']}-token prompt; CPU, {result['threads']} thread(s), torch "
        f"{result['torch']}; median seconds of {result['repeats']} interleaved repeats",
        "",
        "| | seconds | forwards |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds in result["median_s"].items():
        lines.append(f"| {name} | {seconds:.3f} | {result['forwards'][name]:.1f} |")
    lines += [
        "",
        f"The DLA rows sum to the forward's logit difference ({result['logit_difference']:.4f}) "
        f"within {result['dla_sum_abs_error']:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = command_line("inspect_prompt", __doc__, quick="one repeat: a smoke run", threads=1)
    args = parser.parse_args(argv)
    finish("inspect_prompt", run(args.quick, threads=args.threads), args.out, markdown=markdown)


if __name__ == "__main__":
    main()
