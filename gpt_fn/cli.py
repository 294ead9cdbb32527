"""The `gpt-fn` command: `train`, `prepare` and `sample`.

    gpt-fn train                          # cpu-small on the offline Shakespeare corpus, then samples
    gpt-fn train --config run.json --max-steps 2000
    gpt-fn prepare --data tinyshakespeare
    gpt-fn sample --checkpoint out --prompt "ROMEO:" --top-k 200

Errors in flags or inputs print one line naming the problem and exit with status 2 (flags) or
1 (inputs, divergence).
"""

import argparse
import codecs
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt_fn.checkpoint import CheckpointError, load_checkpoint
from gpt_fn.config import PRESETS, GPTConfig

TRAIN_HELP = {
    "data": "corpus: shakespeare (offline, default), tinyshakespeare (download), or a text file/folder",
    "data_dir": "where the token files go (default: data/<corpus>)",
    "out_dir": "checkpoint, metrics.jsonl and loss.png go here",
    "preset": f"model size preset: {', '.join(PRESETS)}",
    "init_from": "scratch, or GPT-2 weights: a HF directory or hub name (e.g. gpt2)",
    "batch_size": "rows per micro-step, summed over DDP ranks",
    "grad_accum": "micro-steps per optimizer step",
    "lr": "peak learning rate (linear warmup, then cosine to --min-lr)",
    "lr_decay_steps": "steps of the cosine decay (default: --max-steps)",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "eval_interval": "evaluate and checkpoint every N steps",
    "eval_batches": "batches in each validation-loss estimate",
    "sample_every": "print a sample every N steps (0: only at the end)",
    "dtype": "autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    "compile": "torch.compile the model (default: on for CUDA)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "resume": "continue the run in --out-dir from its checkpoint",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, parser)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as error:
        print(f"gpt-fn {args.command}: error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt-fn", description="GPT-2 as pure functions: train, prepare data, sample."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a GPT (default: cpu-small on Shakespeare)")
    train.add_argument(
        "--config", type=Path, help="JSON file of training settings; flags override it"
    )
    _add_settings_flags(train)
    train.set_defaults(run=_train)

    prepare = commands.add_parser("prepare", help="tokenize a corpus into train/val token files")
    prepare.add_argument("--data", default="shakespeare", help=TRAIN_HELP["data"])
    prepare.add_argument("--data-dir", help=TRAIN_HELP["data_dir"])
    prepare.add_argument("--val-fraction", type=float, default=0.1)
    prepare.set_defaults(run=_prepare)

    sample = commands.add_parser("sample", help="stream samples from a checkpoint or GPT-2 weights")
    source = sample.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="a gpt_fn checkpoint (file or out dir)")
    source.add_argument("--hf", help="GPT-2 weights: a HF directory or hub name")
    sample.add_argument("--preset", default="cpu-tiny", help="random model when neither is given")
    sample.add_argument("--prompt", default="ROMEO:")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--top-p", type=float)
    sample.add_argument("--min-p", type=float)
    sample.add_argument("--repetition-penalty", type=float)
    sample.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--device", default="cpu")
    sample.set_defaults(run=_sample)
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainSettings` field (`lr_decay_steps` -> `--lr-decay-steps`)."""
    from gpt_fn.train import TrainSettings

    hints = typing.get_type_hints(TrainSettings)
    for field in dataclasses.fields(TrainSettings):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        kind = _base_type(hint)
        help_text = TRAIN_HELP.get(field.name, "")
        default_text = f" (default: {field.default})"
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text + default_text,
            )
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, choices=typing.get_args(kind), default=None, help=help_text + default_text
            )
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text + default_text)


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; other hints as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner
    return hint


def settings_from_args(args: argparse.Namespace) -> Any:
    """TrainSettings from defaults, then the `--config` file, then the flags given."""
    from gpt_fn.train import TrainSettings

    fields: dict[str, Any] = {}
    if args.config is not None:
        try:
            fields.update(json.loads(args.config.read_text()))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read --config {args.config}: {error}") from error
    for field in dataclasses.fields(TrainSettings):
        value = getattr(args, field.name)
        if value is not None:
            fields[field.name] = value
    return TrainSettings.from_dict(fields)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpt_fn.train import TrainingDiverged, train

    settings = settings_from_args(args)
    try:
        train(settings)
    except TrainingDiverged as error:
        print(f"gpt-fn train: {error}", file=sys.stderr)
        return 1
    return 0


def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpt_fn import data
    from gpt_fn.train import TrainSettings

    data_dir = TrainSettings(data=args.data, data_dir=args.data_dir).data_path()
    prepared = data.prepare(args.data, data_dir, val_fraction=args.val_fraction)
    meta = prepared.meta
    state = "prepared" if prepared.rebuilt else "up to date"
    print(
        f"{data_dir}: {state}, {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens"
    )
    return 0


def _sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpt_fn import hf, sampling
    from gpt_fn.model import init_params
    from gpt_fn.tokenizer import EOT_TOKEN, gpt2

    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    encoding = gpt2()
    params, config = _sampling_model(args, hf, init_params)
    params = {k: v.to(args.device) for k, v in params.items()}
    prompt_ids = encoding.encode(args.prompt, allowed_special="all")
    if not prompt_ids:
        parser.error("--prompt must not be empty")
    try:
        transform = sampling.make_transform(
            temperature=None if args.greedy else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            ban_tokens=range(encoding.n_vocab, config.vocab_size) or None,
        )
    except ValueError as error:
        parser.error(str(error))
    prompt = torch.tensor([prompt_ids], device=args.device)
    for index in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        print(args.prompt, end="", flush=True)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with torch.no_grad():
            for token in sampling.generate_stream(
                params,
                prompt,
                config,
                max_new_tokens=args.max_new_tokens,
                transform=transform,
                greedy=args.greedy,
                seed=None if args.greedy else args.seed + index,
                eos_token_id=EOT_TOKEN,
            ):
                if token.item() == EOT_TOKEN:
                    break
                print(
                    text.decode(encoding.decode_single_token_bytes(token.item())),
                    end="",
                    flush=True,
                )
        print(text.decode(b"", final=True))
    return 0


def _sampling_model(args: argparse.Namespace, hf: Any, init_params: Any) -> tuple[dict, GPTConfig]:
    if args.checkpoint is not None:
        saved = load_checkpoint(args.checkpoint)
        return saved.params, saved.model_config
    if args.hf is not None:
        return hf.load(args.hf)
    config = GPTConfig.from_preset(args.preset)
    print(f"(no --checkpoint or --hf: a random {args.preset} model)", file=sys.stderr)
    return init_params(config, seed=args.seed), config


if __name__ == "__main__":
    sys.exit(main())
