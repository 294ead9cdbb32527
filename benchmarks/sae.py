"""SAE training throughput: `gpt_fn.sae.train_sae` against SAELens's `SAETrainer`, K = 1 and 4.

Both train TopK SAEs at `h.2.resid_post` of a 4-layer, 512-wide GPT with GPT-2's vocabulary,
on the same activations: the model (gpt_fn's, run to the site with `stop_at=`) feeds the same
shuffle buffer (`gpt_fn.sae.activation_batches`). gpt_fn trains the K SAEs from one model
pass per batch; SAELens's trainer trains one SAE per run, so K SAEs are K runs, each making
its own model passes (what training K SAELens SAEs costs). Figures are tokens of activations
per second per SAE set: `steps * batch_size / seconds`, the median of the rounds after a
warm-up, contenders taking turns (`benchmarks.timing.take_turns`).

Needs sae-lens, so it runs in the sae-interop venv (not in `python -m benchmarks`):

    python benchmarks/sae.py [--quick] [--threads N] [--out DIR]
"""

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

import gpt_fn
from benchmarks.run import command_line, cpu_model, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import sae as saes
from gpt_fn.shapes import shape_checks

CONFIG = gpt_fn.GPTConfig(vocab_size=50257, block_size=128, n_layer=4, n_head=8, n_embd=512)
SITE = "h.2.resid_post"
SIZES = {1: [(4096, 32)], 4: [(2048, 16), (4096, 32), (4096, 64), (8192, 32)]}  # (d_sae, k)


def run(quick: bool = False, *, threads: int | None = 1, config: gpt_fn.GPTConfig = CONFIG) -> dict:
    """Median tokens/s of each contender for K = 1 and K = 4, and gpt_fn's ratio to SAELens."""
    steps, rounds = (2, 2) if quick else (8, 4)
    settings = saes.SAETrainSettings(
        steps=steps, batch_size=1024, model_batch_size=8, block_size=128, buffer_batches=1
    )
    if quick:
        settings = settings._replace(batch_size=64, model_batch_size=1, block_size=64)
    with cpu_threads(threads), shape_checks(False):
        params = gpt_fn.init_params(config, seed=0)
        corpus = torch.randint(
            0, config.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0)
        )
        corpus = corpus.numpy().astype("uint16")
        results: dict = {
            "benchmark": "sae",
            "config": config.to_dict(),
            "site": SITE,
            "threads": torch.get_num_threads() if threads is None else threads,
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "steps": steps,
            "rows": [],
        }
        for k, sizes in SIZES.items():
            if quick:
                sizes = [(d_sae // 16, top // 4) for d_sae, top in sizes]
            configs = [
                saes.SAEConfig(d_in=config.n_embd, d_sae=d_sae, kind="topk", k=top)
                for d_sae, top in sizes
            ]
            contenders: dict[str, Callable[[], object]] = {
                "gpt_fn": lambda c=configs: saes.train_sae(
                    params, config, SITE, corpus, c, settings=settings
                ),
                "SAELens": lambda c=configs: [
                    _saelens(params, config, corpus, one, settings) for one in c
                ],
            }
            timings = take_turns(contenders, rounds + 1, device=torch.device("cpu"))
            tokens = steps * settings.batch_size
            speed = {name: tokens / statistics.median(s[1:]) for name, s in timings.seconds.items()}
            results["rows"].append({"K": k, **speed, "ratio": speed["gpt_fn"] / speed["SAELens"]})
    return results


def _saelens(params, config, corpus, sae_config: saes.SAEConfig, settings: saes.SAETrainSettings):
    """One SAELens run: its trainer on its own stream of the same activations."""
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=sae_config.d_in, d_sae=sae_config.d_sae, k=sae_config.k)
    )
    trainer_config = SAETrainerConfig(
        total_training_samples=settings.steps * settings.batch_size,
        train_batch_size_samples=settings.batch_size,
        lr=settings.lr,
        lr_end=settings.lr,  # constant, as gpt_fn's run
    )
    batches = saes.activation_batches(params, config, SITE, corpus, settings)
    return SAETrainer(trainer_config, sae, batches).fit()


def markdown(results: dict) -> str:
    lines = [
        f"TopK SAEs at {results['site']}, {results['steps']} steps; tokens/s, {results['cpu']}, "
        f"{results['threads']} thread(s), torch {results['torch']}",
        "",
        "| K SAEs | gpt_fn `train_sae` | SAELens `SAETrainer` (K runs) | gpt_fn / SAELens |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['K']} | {row['gpt_fn']:,.0f} | {row['SAELens']:,.0f} | {row['ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = command_line("sae", __doc__, quick="tiny sizes: a smoke test", threads=1)
    args = parser.parse_args(argv)
    finish("sae", run(args.quick, threads=args.threads), args.out, markdown=markdown)


if __name__ == "__main__":
    main()
