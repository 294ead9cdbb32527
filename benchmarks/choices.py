"""Multiple-choice scoring: each context run once for all its endings, against once per ending.

`gpt_fn.eval.multiple_choice(..., share_context=True)` runs an item's context once and scores
its endings from that context's KV cache (`score_endings`); the plain call runs the context
again with every ending, as lm-evaluation-harness does. Items are HellaSwag-shaped: a context
of about `CONTEXT_WORDS` words of Shakespeare and 4 endings of about `ENDING_WORDS` words (the
following text and three others from elsewhere in the plays: 71-110 and 21-43 tokens),
scored by the train-step benchmark's model (6 layers, 384 wide, GPT-2's padded vocabulary) or,
with `--model gpt2`, by one of GPT-2 small's shape, with random weights; the two ways'
log-probs must agree (their largest difference is reported). Time is the median of repeats,
the contenders taking turns.

    python benchmarks/choices.py [--quick] [--model bench|gpt2] [--threads N] [--out DIR]
"""

import random
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import GPTConfig, init_params
from gpt_fn.data import shakespeare_documents
from gpt_fn.eval import Choice, multiple_choice
from gpt_fn.shapes import shape_checks

CONFIG = GPTConfig(vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384)
QUICK_CONFIG = GPTConfig(vocab_size=50304, block_size=128, n_layer=2, n_head=2, n_embd=64)
MODELS = {"bench": CONFIG, "gpt2": GPTConfig.from_preset("gpt2")}
ITEMS, ENDINGS, CONTEXT_WORDS, ENDING_WORDS, BATCH = 32, 4, 60, 20, 8


def make_items(
    count: int, *, endings: int, context_words: int, ending_words: int, seed: int = 0
) -> list[Choice]:
    """`count` items cut from the plays: a context, the words after it and other passages."""
    words = " ".join(shakespeare_documents()[:3]).split()
    rng = random.Random(seed)

    def passage(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    items = []
    for _ in range(count):
        start = rng.randrange(len(words) - context_words - ending_words)
        context = " ".join(words[start : start + context_words])
        right = " ".join(words[start + context_words : start + context_words + ending_words])
        label = rng.randrange(endings)
        options = [passage(ending_words) for _ in range(endings - 1)]
        options.insert(label, right)
        items.append(Choice(context, tuple(options), label))
    return items


def run(
    quick: bool = False,
    *,
    threads: int | None = 1,
    config: GPTConfig | None = None,
    items: int | None = None,
) -> dict:
    """Both ways over the same items; the figures as a dict."""
    config = config or (QUICK_CONFIG if quick else CONFIG)
    choices = make_items(
        items or (8 if quick else ITEMS),
        endings=ENDINGS,
        context_words=CONTEXT_WORDS,
        ending_words=ENDING_WORDS,
    )
    params = init_params(config, seed=0)
    contenders = {
        "once per ending": lambda: multiple_choice(params, choices, config, batch_size=BATCH),
        "shared context": lambda: multiple_choice(
            params, choices, config, batch_size=BATCH, share_context=True
        ),
    }
    with cpu_threads(threads), shape_checks(False), torch.no_grad():
        threads_used = torch.get_num_threads()
        results = {name: fn() for name, fn in contenders.items()}  # also warms up
        timings = take_turns(contenders, 3 if quick else 5, device=torch.device("cpu"))
    plain, shared = results["once per ending"], results["shared context"]
    difference = max(
        abs(a - b)
        for row_a, row_b in zip(plain.logprobs, shared.logprobs, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    ms = {name: 1000 * statistics.median(times) for name, times in timings.seconds.items()}
    return {
        "benchmark": "choices",
        "threads": threads_used,
        "torch": torch.__version__,
        "config": config.to_dict(),
        "items": len(choices),
        "endings": ENDINGS,
        "batch_size": BATCH,
        "median_ms": ms,
        "speedup": ms["once per ending"] / ms["shared context"],
        "max_logprob_difference": difference,
        "same_accuracy": (plain.acc, plain.acc_norm) == (shared.acc, shared.acc_norm),
    }


def markdown(result: dict) -> str:
    c, ms = result["config"], result["median_ms"]
    return (
        f"Multiple choice, {result['items']} items x {result['endings']} endings "
        f"(contexts of {CONTEXT_WORDS} words, endings of {ENDING_WORDS}), batch "
        f"{result['batch_size']}: {c['n_layer']} layers, {c['n_embd']} wide, cpu, "
        f"{result['threads']} threads, torch {result['torch']}; median of repeats.\n\n"
        "| scoring | ms | speed-up | max log-prob difference |\n"
        "| --- | ---: | ---: | ---: |\n"
        f"| once per ending (lm-eval's way) | {ms['once per ending']:.0f} | 1.00x | - |\n"
        f"| shared context (`share_context=True`) | {ms['shared context']:.0f} | "
        f"{result['speedup']:.2f}x | {result['max_logprob_difference']:.1e} |\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = command_line("choices", __doc__, quick="a 2-layer, 64-wide model, 8 items", threads=1)
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="bench",
        help="bench: 6 layers x 384 (default); gpt2: GPT-2 small's shape (ignored with --quick)",
    )
    args = parser.parse_args(argv)
    config = None if args.quick else MODELS[args.model]
    result = run(args.quick, threads=args.threads, config=config)
    finish("choices", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
