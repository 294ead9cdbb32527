"""What every experiment shares (experiments/README.md, "Shared conventions"), in one place.

- `command_line`: `--quick`, `--seed`, `--threads` (1 by default), `--out` (default
  `experiments/out/<name>/`) and, for the experiments that read the prepared corpus,
  `--data-dir`; `start` parses them and sets torch's CPU threads.
- `QUICK_SHAPE`: the smoke-run model every `--quick` trains (1 layer, 32 wide, block 16).
- `shakespeare`: the offline Shakespeare corpus as GPT-2 BPE tokens, prepared once into
  `--data-dir` and reused, split into train and val.
- `finish`: the results under the fields every experiment records, written as `results.json`
  with the experiment's figure `<name>.png` into `--out`.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_fn import data

OUT = Path("experiments/out")
DATA_DIR = OUT / "data" / "shakespeare"
QUICK_SHAPE = {"n_layer": 1, "n_embd": 32, "block_size": 16}
"""`cpu-tiny` narrowed for `--quick`: a smoke run of a few seconds whose numbers mean nothing."""


def command_line(
    name: str,
    doc: str,
    *,
    quick: str,
    seed: str = "seed of the init and the batches",
    data_dir: bool = True,
) -> argparse.ArgumentParser:
    """Experiment `name`'s parser (described by the first line of `doc`) with the shared options.

    `quick` and `seed` are their help texts; `data_dir=False` leaves out `--data-dir` for an
    experiment that does not read the prepared corpus.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--seed", type=int, default=0, help=seed)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine a second thread mostly waits)",
    )
    parser.add_argument(
        "--out", type=Path, default=OUT / name, help=f"output folder (default {OUT / name})"
    )
    if data_dir:
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=DATA_DIR,
            help="where the Shakespeare token files are prepared (reused when up to date)",
        )
    return parser


def start(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, with torch's CPU threads set to `--threads`."""
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    return args


def shakespeare(data_dir: Path, *, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and val tokens of the Shakespeare corpus, prepared into `data_dir` once."""
    data.prepare("shakespeare", data_dir)
    return (
        data.load_split(data_dir, "train", block_size=block_size),
        data.load_split(data_dir, "val", block_size=block_size),
    )


def finish(
    name: str,
    args: argparse.Namespace,
    result: dict[str, Any],
    plot: Callable[[dict[str, Any], Path], None],
) -> dict[str, Any]:
    """`result` with the fields every experiment records (its name, `--quick`, `--seed`, torch's
    version and threads), written to `--out` as `results.json` and drawn by `plot` as
    `<name>.png`; returns what was written."""
    result = {
        "experiment": name,
        "quick": args.quick,
        "seed": args.seed,
        **result,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / f"{name}.png")
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / (name + '.png')} and {args.out / 'results.json'}")
    return result
