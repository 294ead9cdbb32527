"""The `gpt-fn` command: `train`, `prepare`, `sample`, `export`, `eval`, `lm-eval`, `inspect`,
`sae`.

    gpt-fn train                          # cpu-small on the offline Shakespeare corpus, then samples
    gpt-fn train --config run.json --max-steps 2000
    gpt-fn train --resume                 # continue out/ with the settings saved in its checkpoint
    gpt-fn prepare --data tinyshakespeare
    gpt-fn sample --checkpoint out --prompt "ROMEO:" --top-k 200
    gpt-fn export --checkpoint out --out gpt2-shakespeare --vocab-size 50257
    gpt-fn eval --checkpoint out --tokens data/shakespeare --choices hellaswag_val.jsonl
    gpt-fn lm-eval --model gpt_fn --model_args checkpoint=out --tasks lambada_openai
    gpt-fn inspect --checkpoint out --prompt "ROMEO: But, soft! what light through yonder" \
                   --answer " window" --out romeo
    gpt-fn sae train --checkpoint out --site h.2.resid_post --d-sae 4096 --kind topk --k 32

The command only parses, calls and reports. Every failure a user can cause ends in one line
on stderr naming the problem and a non-zero exit: 2 for a bad flag, 1 for bad input or a
diverged run, 130 for Ctrl-C. A traceback means a bug in gpt_fn.
"""

import argparse
import codecs
import dataclasses
import json
import os
import re
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gpt_fn import data, hf, sae_cli, sampling
from gpt_fn import eval as evaluation
from gpt_fn.analysis import LN_MODES
from gpt_fn.checkpoint import (
    CheckpointError,
    kept_checkpoint,
    read_checkpoint_info,
)
from gpt_fn.config import GPTConfig
from gpt_fn.hooks import load_hooks
from gpt_fn.loading import load_model
from gpt_fn.memory import InsufficientMemoryError
from gpt_fn.rundir import RunDirError
from gpt_fn.runlog import LOGGERS
from gpt_fn.runtime import resolve_device
from gpt_fn.settings import (
    DERIVED,
    SettingsError,
    TrainSettings,
    current_names,
    field_help,
)
from gpt_fn.shapes import Params
from gpt_fn.tokenizer import EOT_TOKEN, gpt2, single_token
from gpt_fn.train import TrainingDiverged, TrainingInterrupted, train

# What a user can cause: bad values, missing or unreadable files, a failed download, a run
# that diverged, a request too large for memory. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    OSError,
    KeyError,
    RunDirError,
    TrainingDiverged,
    InsufficientMemoryError,
)
DEFAULT_PROMPT = "ROMEO:"
DEFAULT_TEMPERATURE = 0.8
SAMPLE_TOP_K = 200
"""The top-k of the samples `gpt-fn train` shows (`sample_text`)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = f"gpt-fn {args.command}"
    try:
        return args.run(args, parser)
    except TrainingInterrupted as stopped:
        print(f"{command}: {stopped}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gpt-fn sample | head`): stop writing, and keep the
        # interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{command}: output closed before the end (broken pipe)", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"{command}: error: {_message(error)}", file=sys.stderr)
        return 1
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        reason = _out_of_memory(error)
        if reason is None:
            raise
        print(
            f"{command}: error: out of memory ({reason}): ask for fewer rows, beams or tokens, "
            "or a smaller batch",
            file=sys.stderr,
        )
        return 1


def _out_of_memory(error: RuntimeError) -> str | None:
    """What an allocator that failed tried (CUDA's `torch.OutOfMemoryError`, or the CPU
    allocator's RuntimeError: "DefaultCPUAllocator: can't allocate memory: you tried to
    allocate N bytes"); `None` for any other error."""
    text = _message(error)
    cpu = re.search(
        r"(?:can't allocate|not enough) memory: you tried to allocate (\d+) bytes", text
    )
    if cpu is not None:
        return f"tried to allocate {int(cpu[1]) / 1e9:.1f} GB"
    if isinstance(error, torch.OutOfMemoryError):
        cuda = re.search(r"tried to allocate [\d.]+ \w+", text, re.IGNORECASE)
        return cuda[0] if cuda is not None else text.split(". ")[0]
    return None


def _message(error: BaseException) -> str:
    # str(KeyError("x")) is "'x'", with quotes; the message is its argument.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt-fn", description="GPT-2 as pure functions: train, prepare data, sample, export."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="train a GPT (default: cpu-small on Shakespeare)"
    )
    train_parser.add_argument(
        "--config", type=Path, help="JSON file of training settings; flags override it"
    )
    _add_settings_flags(train_parser)
    train_parser.set_defaults(run=_train)

    prepare = commands.add_parser("prepare", help="tokenize a corpus into train/val token files")
    prepare.add_argument("--data", default="shakespeare", help=field_help("data"))
    prepare.add_argument("--data-dir", help=field_help("data_dir"))
    prepare.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the tokens held out for val"
    )
    prepare.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when up to date (which checks shard sizes, not contents)",
    )
    prepare.set_defaults(run=_prepare)

    sample = commands.add_parser("sample", help="stream samples from a checkpoint or GPT-2 weights")
    _add_model_source(sample)
    sample.add_argument("--preset", default="cpu-tiny", help="random model when neither is given")
    prompts = sample.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help=f"text to continue (default {DEFAULT_PROMPT!r})")
    prompts.add_argument(
        "--prompt-file", type=Path, help="a text file of prompts, one a line: one batch"
    )
    sample.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    sample.add_argument(
        "--temperature", type=float, help=f"softmax temperature (default {DEFAULT_TEMPERATURE})"
    )
    sample.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    sample.add_argument("--top-p", type=float, help="keep the smallest set with this mass")
    sample.add_argument("--min-p", type=float, help="keep tokens >= this x the top probability")
    sample.add_argument("--repetition-penalty", type=float, help="CTRL's penalty on seen tokens")
    sample.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    sample.add_argument("--seed", type=int, default=0, help="seed of the samples")
    sample.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="samples of each prompt (one batch); with --num-beams, the best beams to print",
    )
    sample.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end a sample after this text (repeatable); the printed text ends with it",
    )
    sample.add_argument(
        "--num-beams", type=int, help="beam search with this many beams: the best beam per prompt"
    )
    sample.add_argument(
        "--draft-checkpoint",
        type=Path,
        help="speculative decoding: a smaller gpt_fn checkpoint of the same vocabulary drafts",
    )
    sample.add_argument(
        "--num-draft-tokens", type=int, default=4, help="tokens the draft proposes per round"
    )
    sample.add_argument("--device", default="auto", help=field_help("device"))
    sample.set_defaults(run=_sample)

    export = commands.add_parser(
        "export", help="write a checkpoint as a Hugging Face GPT-2 directory"
    )
    export.add_argument("--checkpoint", type=Path, required=True, help="a gpt_fn checkpoint")
    export.add_argument("--out", type=Path, required=True, help="the directory to write")
    export.add_argument(
        "--vocab-size",
        type=int,
        help="keep only the first N token embeddings (50257: GPT-2's tokenizer, dropping the "
        "rows padded for speed)",
    )
    export.set_defaults(run=_export)
    _add_eval_parsers(commands)
    _add_inspect_parser(commands)
    sae_cli.add_parser(commands)
    return parser


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="a gpt_fn checkpoint (file or out dir)")
    source.add_argument("--hf", help="GPT-2 weights: a HF directory or hub name")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainSettings` field (`lr_decay_steps` -> `--lr-decay-steps`)."""
    for field in dataclasses.fields(TrainSettings):
        flags = [_flag(field.name)]
        kind = _flag_type(field.type)
        help_text = field.metadata["help"]
        if field.default is not None and field.name not in DERIVED and kind is not bool:
            help_text += f" (default: {field.default})"
        if field.name == "log":  # repeatable: --log wandb --log tensorboard
            parser.add_argument(
                *flags, action="append", choices=LOGGERS, default=None, help=help_text
            )
        elif kind is bool:
            action = "store_true" if field.default is False else argparse.BooleanOptionalAction
            parser.add_argument(*flags, action=action, default=None, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(*flags, choices=typing.get_args(kind), default=None, help=help_text)
        else:
            parser.add_argument(
                *flags, type=kind, default=None, metavar=field.name.upper(), help=help_text
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(hint: Any) -> Any:
    """`int | None` -> int; other hints as they are."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is not typing.Literal and len(args) == 1:
        return args[0]
    return hint


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave: the `--config` file's, then the flags on the command line."""
    fields: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, ValueError) as error:
            raise SettingsError(f"cannot read --config {args.config}: {error}") from error
        if not isinstance(loaded, dict):
            raise SettingsError(
                f"--config {args.config} must hold a JSON object of settings, got a "
                f"{type(loaded).__name__}"
            )
        fields.update(loaded)
    for field in dataclasses.fields(TrainSettings):
        value = getattr(args, field.name)
        if isinstance(value, list):  # a repeated flag (--log)
            value = ",".join(value)
        if value is not None:
            fields[field.name] = value
    return fields


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The run's settings: the defaults (or, with --resume, the checkpoint's) plus what was given."""
    given = given_settings(args)
    base: dict[str, Any] = {}
    if given.get("resume"):
        out_dir = given.get("out_dir", TrainSettings.out_dir)
        try:
            # --from-step: the settings of the kept checkpoint the run goes back to
            source = (
                out_dir
                if given.get("from_step") is None
                else kept_checkpoint(out_dir, given["from_step"])
            )
            base = read_checkpoint_info(source).train_settings
        except CheckpointError as error:
            raise CheckpointError(f"--resume: {error}") from None
        base = {
            k: v for k, v in current_names(base).items() if k in TrainSettings.__dataclass_fields__
        }
    return TrainSettings.from_dict({**base, **given})


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    train(settings_from_args(args), sample=sample_text)
    return 0


def sample_text(params: Params, config: GPTConfig, *, tokens: int, seed: int) -> str:
    """A sample continuing `DEFAULT_PROMPT` ("ROMEO:") at temperature 0.8, top-k 200, ids past
    GPT-2's tokenizer banned: what `gpt-fn train` shows during and after a run (`train`'s
    `sample`)."""
    encoding = gpt2()
    prompt = [encoding.encode_ordinary(DEFAULT_PROMPT)]
    with torch.no_grad():
        out = sampling.generate(
            params,
            torch.tensor(prompt, device=params["wte.weight"].device),
            config,
            max_new_tokens=tokens,
            transform=sampling.make_transform(temperature=DEFAULT_TEMPERATURE, top_k=SAMPLE_TOP_K),
            seed=seed,
            eos_token_id=EOT_TOKEN,
            tokenizer=encoding,
        )
    return encoding.decode([t for t in out[0].tolist() if t != EOT_TOKEN])


def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    data_dir = TrainSettings(data=args.data, data_dir=args.data_dir).data_path()
    prepared = data.prepare(args.data, data_dir, val_fraction=args.val_fraction, force=args.force)
    meta = prepared.meta
    state = "prepared" if prepared.rebuilt else "up to date"
    print(
        f"{data_dir}: {state}, {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens"
    )
    return 0


def _sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for name in ("max_new_tokens", "num_samples", "num_draft_tokens"):
        if getattr(args, name) < 1:
            _usage_error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        _usage_error(f"--seed must be >= 0, got {args.seed}")
    if args.stop is not None and not all(args.stop):
        _usage_error("--stop must not be empty")
    if args.num_beams is not None:
        _check_beam_flags(args, parser)
    device = resolve_device(args.device)
    encoding = gpt2()
    texts = _prompt_texts(args, parser)
    prompts = [encoding.encode(text, allowed_special="all") for text in texts]
    try:
        transform = sampling.make_transform(
            temperature=None if args.greedy or args.num_beams else _temperature(args),
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
    except ValueError as error:
        _usage_error(str(error))
    params, config = _sampling_model(args, device)
    for index, ids in enumerate(prompts):
        if len(ids) > config.block_size:
            where = "--prompt" if args.prompt_file is None else f"--prompt-file line {index + 1}"
            raise ValueError(
                f"{where} is {len(ids)} tokens, longer than the model's block_size "
                f"{config.block_size}"
            )
    options = sampling.DecodeOptions(
        transform=transform,
        greedy=args.greedy,  # beam search reads neither greedy nor seed
        seed=None if args.greedy else args.seed,
        eos_token_id=EOT_TOKEN,
        stop=args.stop,
        tokenizer=encoding,  # ids past it (vocabulary padding) are never generated
    )
    if args.num_beams is not None:
        return _beam_search(args, params, config, texts, prompts, options, encoding)
    if args.draft_checkpoint is not None:
        return _speculative(args, params, config, texts, prompts, options, encoding, device)
    if len(prompts) == 1 and args.num_samples == 1:
        stream = sampling.generate_stream(
            params,
            torch.tensor(prompts, device=device),
            config,
            max_new_tokens=args.max_new_tokens,
            options=options,
        )
        _print_stream(texts[0], (int(token) for token in stream), encoding, args.stop)
        return 0
    # One batch: row i's randomness depends only on (seed, i) (`sampling.row_generators`),
    # so sample 1 of `--num-samples 2 --seed 0` never repeats sample 0 of `--seed 1`.
    rows = sampling.generate(
        params,
        prompts,
        config,
        max_new_tokens=args.max_new_tokens,
        options=options,
        num_samples=args.num_samples,
    )
    _print_rows(args, texts, prompts, rows, encoding)
    return 0


def _temperature(args: argparse.Namespace) -> float:
    return DEFAULT_TEMPERATURE if args.temperature is None else args.temperature


def _check_beam_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Beam search is deterministic: flags that sample or draft would be silently ignored."""
    if args.num_beams < 1:
        _usage_error(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.draft_checkpoint is not None:
        _usage_error("--num-beams searches, --draft-checkpoint drafts samples: choose one")
    for flag in ("temperature", "top_k", "top_p", "min_p"):
        if getattr(args, flag) is not None:
            _usage_error(
                f"--{flag.replace('_', '-')} shapes sampling; --num-beams searches "
                "deterministically: drop one of them"
            )
    if args.num_samples > args.num_beams:
        _usage_error(
            f"--num-samples {args.num_samples} with --num-beams {args.num_beams}: beam search "
            "keeps at most num-beams best beams per prompt"
        )


def _prompt_texts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The prompts: `--prompt`'s text, or the non-blank lines of `--prompt-file`."""
    if args.prompt_file is None:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if not text:
            _usage_error("--prompt must not be empty")
        return [text]
    try:
        lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise ValueError(f"--prompt-file {args.prompt_file}: cannot read it: {reason}") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"--prompt-file {args.prompt_file} holds no prompts (one a line)")
    return texts


def _beam_search(
    args: argparse.Namespace,
    params: Params,
    config: GPTConfig,
    texts: list[str],
    prompts: list[list[int]],
    options: sampling.DecodeOptions,
    encoding: Any,
) -> int:
    out = sampling.beam_search(
        params,
        prompts,
        config,
        args.num_beams,
        max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.num_samples,
        options=options,
    )
    for index, (row, score) in enumerate(zip(out.sequences, out.scores.tolist(), strict=True)):
        prompt, beam = divmod(index, args.num_samples)
        where = f"prompt {prompt + 1}, " if len(texts) > 1 else ""
        print(f"--- {where}beam {beam + 1}, score {score:.4f} ---")
        _print_stream(texts[prompt], iter(row[len(prompts[prompt]) :]), encoding, args.stop)
    return 0


def _speculative(
    args: argparse.Namespace,
    params: Params,
    config: GPTConfig,
    texts: list[str],
    prompts: list[list[int]],
    options: sampling.DecodeOptions,
    encoding: Any,
    device: torch.device,
) -> int:
    draft = load_model(checkpoint=args.draft_checkpoint, device=device)
    if draft.config.vocab_size != config.vocab_size:
        raise ValueError(
            f"--draft-checkpoint {args.draft_checkpoint} has vocab_size "
            f"{draft.config.vocab_size}, the model {config.vocab_size}: a draft must "
            "share the model's vocabulary"
        )
    rows = [ids for ids in prompts for _ in range(args.num_samples)]
    out = sampling.speculative_generate(
        params,
        rows,
        config,
        draft_params=draft.params,
        draft_config=draft.config,
        max_new_tokens=args.max_new_tokens,
        num_draft_tokens=args.num_draft_tokens,
        options=options,
    )
    _print_rows(args, texts, prompts, out.tokens, encoding)
    stats = out.stats
    print(
        f"(speculative decoding: {stats.accepted} of {stats.proposed} draft tokens accepted "
        f"({stats.acceptance_rate:.0%}); {stats.new_tokens} tokens in {stats.rounds} target "
        f"forwards over {len(rows)} rows)",
        file=sys.stderr,
    )
    return 0


def _print_rows(
    args: argparse.Namespace,
    texts: list[str],
    prompts: list[list[int]],
    rows: list[list[int]],
    encoding: Any,
) -> None:
    """Each row's prompt and its new tokens' text, under a header when there are several."""
    samples = args.num_samples
    for index, row in enumerate(rows):
        prompt, sample = divmod(index, samples)
        if len(texts) > 1:
            which = f", sample {sample + 1}" if samples > 1 else ""
            print(f"--- prompt {prompt + 1}{which} ---")
        elif samples > 1:
            print(f"--- sample {sample + 1} ---")
        _print_stream(texts[prompt], iter(row[len(prompts[prompt]) :]), encoding, args.stop)


def _print_stream(
    prompt: str, tokens: Iterator[int], encoding: Any, stop: Sequence[str] | None = None
) -> None:
    """The prompt, then each token's text as soon as it forms whole UTF-8 characters.

    With `stop` strings the new text ends with the first one it contains
    (`sampling.cut_at_stop`); the last characters that may begin one are held back until it
    is clear they do not.
    """
    print(prompt, end="", flush=True)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    keep = max(len(s) for s in stop) - 1 if stop else 0
    pending = ""
    with torch.no_grad():
        for token in tokens:
            if token == EOT_TOKEN:
                break
            pending += text.decode(encoding.decode_single_token_bytes(token))
            if stop and any(s in pending for s in stop):
                print(sampling.cut_at_stop(pending, stop))
                return
            shown = len(pending) - keep
            if shown > 0:
                print(pending[:shown], end="", flush=True)
                pending = pending[shown:]
    pending += text.decode(b"", final=True)
    print(sampling.cut_at_stop(pending, stop) if stop else pending)


def _usage_error(message: str) -> typing.NoReturn:
    """A bad combination of `sample` flags: one line naming it, exit 2 (argparse's code)."""
    print(f"gpt-fn sample: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _sampling_model(args: argparse.Namespace, device: torch.device) -> tuple[Params, GPTConfig]:
    if args.checkpoint is not None or args.hf is not None:
        model = load_model(checkpoint=args.checkpoint, hf=args.hf, device=device)
        return model.params, model.config
    # --seed is the samples' seed, not the model's
    model = load_model(preset=args.preset, seed=0, device=device)
    print(f"(no --checkpoint or --hf: a random {args.preset} model)", file=sys.stderr)
    return model.params, model.config


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    model = load_model(checkpoint=args.checkpoint)
    params, config = model.params, model.config
    if args.vocab_size is not None:
        params, config = _crop_vocab(params, config, args.vocab_size)
    hf.save(params, config, args.out)
    print(
        f"wrote {args.out}: GPT-2 with {config.n_layer} layers x {config.n_embd}, vocab "
        f"{config.vocab_size}, step {model.step} of {args.checkpoint}"
    )
    return 0


def _crop_vocab(params: Params, config: GPTConfig, vocab_size: int) -> tuple[Params, GPTConfig]:
    if not 0 < vocab_size <= config.vocab_size:
        raise ValueError(
            f"--vocab-size must be in [1, {config.vocab_size}] (the checkpoint's vocab), "
            f"got {vocab_size}"
        )
    cropped = dataclasses.replace(config, vocab_size=vocab_size)
    return {**params, "wte.weight": params["wte.weight"][:vocab_size].clone()}, cropped


# --- eval and lm-eval ---------------------------------------------------------------------


def _add_eval_parsers(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval", help="perplexity, bits per byte and multiple-choice accuracy of a model"
    )
    _add_model_source(evaluate)
    texts = evaluate.add_mutually_exclusive_group()
    texts.add_argument(
        "--text", type=Path, help="a UTF-8 text file: sliding-window perplexity and bits/byte"
    )
    texts.add_argument(
        "--tokens",
        type=Path,
        help="GPT-2 tokens scored like --text: a prepared data folder (its val split), an "
        "llm.c token shard, or a raw uint16 token file",
    )
    evaluate.add_argument(
        "--choices",
        type=Path,
        help="a HellaSwag-style jsonl file ({ctx, endings, label} a line): acc and acc_norm",
    )
    evaluate.add_argument(
        "--stride", type=int, help="tokens between window starts (default: block_size // 2)"
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=8, help="windows or endings per forward (default: 8)"
    )
    evaluate.add_argument("--device", default="auto", help=field_help("device"))
    evaluate.add_argument(
        "--hooks",
        metavar="MODULE:FUNCTION",
        help="score the model under an intervention: FUNCTION(params, config) in MODULE (a "
        "module name or a .py file) returns the {site: hook} dict (gpt_fn.hooks.load_hooks)",
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("eval.json"), help="the JSON results file (eval.json)"
    )
    evaluate.set_defaults(run=_eval)

    # prefix_chars="+": every flag after `lm-eval` is lm-eval's, passed on untouched.
    harness = commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's CLI with the gpt_fn model registered (--model gpt_fn)",
        add_help=False,
        prefix_chars="+",
    )
    harness.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    harness.set_defaults(run=_lm_eval)


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.checkpoint is None and args.hf is None:
        parser.error("give the model: --checkpoint DIR or --hf DIR")
    if args.text is None and args.tokens is None and args.choices is None:
        parser.error("give something to evaluate: --text FILE, --tokens FILE and/or --choices FILE")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stride is not None and args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    device = resolve_device(args.device)
    _check_writable("--out", args.out)
    # Inputs first: a bad file fails before the model loads.
    text_path = args.text or args.tokens
    tokens = None
    if args.text is not None:
        tokens = evaluation.encode_text(_read_text(args.text))
    elif args.tokens is not None:
        try:
            tokens = data.read_token_file(args.tokens)
        except (OSError, ValueError) as error:
            raise type(error)(f"--tokens {_message(error)}") from None
    items = evaluation.read_choices(args.choices) if args.choices is not None else None
    params, config, about = _eval_model(args, device)
    hooks = None if args.hooks is None else load_hooks(args.hooks, params, config)
    about["hooks"] = args.hooks
    results: dict[str, Any] = {"model": about}
    rows: list[tuple[str, str]] = []
    started = time.perf_counter()
    if tokens is not None:
        stride = config.block_size // 2 if args.stride is None else args.stride
        if stride > config.block_size:
            raise ValueError(
                f"--stride {stride} is more than the model's block_size {config.block_size}: "
                "windows would skip tokens"
            )
        if len(tokens) < 2:
            raise ValueError(
                f"{text_path} holds {len(tokens)} token(s); perplexity needs at least 2"
            )
        windows = len(
            evaluation.sliding_windows(len(tokens), block_size=config.block_size, stride=stride)
        )
        begun = time.perf_counter()
        with tqdm(total=windows, unit="window", file=sys.stderr, dynamic_ncols=True) as bar:
            scored = evaluation.perplexity(
                params, tokens, config, stride=stride, batch_size=args.batch_size,
                progress=bar.update, hooks=hooks,
            )  # fmt: skip
        seconds = time.perf_counter() - begun
        results["text"] = {"path": str(text_path), **scored.to_dict(), "seconds": seconds}
        rows += [
            (f"{text_path}", f"{scored.tokens:,} tokens, {scored.bytes:,} bytes"),
            ("  windows", f"{scored.windows:,} of {config.block_size}, stride {stride}"),
            ("  nats/token", f"{scored.nats_per_token:.4f}"),
            ("  perplexity", f"{scored.perplexity:.2f}"),
            ("  bits/byte", f"{scored.bits_per_byte:.4f}"),
            ("  seconds", f"{seconds:.1f}"),
        ]
    if items is not None:
        endings = sum(len(item.endings) for item in items)
        begun = time.perf_counter()
        with tqdm(total=endings, unit="ending", file=sys.stderr, dynamic_ncols=True) as bar:
            chosen = evaluation.multiple_choice(
                params, items, config, batch_size=args.batch_size, progress=bar.update, hooks=hooks
            )
        seconds = time.perf_counter() - begun
        results["choices"] = {"path": str(args.choices), **chosen.to_dict(), "seconds": seconds}
        rows += [
            (f"{args.choices}", f"{chosen.items:,} items, {endings:,} endings"),
            ("  acc", f"{chosen.acc:.4f}"),
            ("  acc_norm", f"{chosen.acc_norm:.4f}"),
            ("  acc_bytes", f"{chosen.acc_bytes:.4f}"),
            ("  seconds", f"{seconds:.1f}"),
        ]
    results["seconds"] = time.perf_counter() - started
    # The table first: were the file to fail now, the scores are not lost with it.
    print(f"model: {about['source']} ({about['description']})")
    if hooks is not None:
        print(f"hooks: {args.hooks}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", flush=True)
    try:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    except OSError as error:
        raise OSError(
            f"--out {args.out}: cannot write it ({error.strerror}); the results are above"
        ) from None
    print(f"wrote {args.out}")
    return 0


def _check_writable(flag: str, path: Path) -> None:
    """`OSError` naming `flag` unless a file can be written at `path` (checked before work
    whose results would go there)."""
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no folder {folder} to write it in")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"{flag} {path}: not writable (permission denied)")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--text {path} is not UTF-8 text: {error}") from None
    if not text.strip():
        raise ValueError(f"--text {path} is empty: there is nothing to score")
    return text


def _eval_model(
    args: argparse.Namespace, device: torch.device
) -> tuple[Params, GPTConfig, dict[str, Any]]:
    model = load_model(checkpoint=args.checkpoint, hf=args.hf, device=device)
    config = model.config
    about: dict[str, Any] = {"source": str(args.checkpoint if args.hf is None else args.hf)}
    if model.step is not None:
        about["step"] = model.step
    about["config"] = config.to_dict()
    about["description"] = (
        f"{config.n_layer} layers x {config.n_embd}, block {config.block_size}, "
        f"vocab {config.vocab_size}" + (f", step {model.step}" if model.step is not None else "")
    )
    return model.params, config, about


def _lm_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from gpt_fn import harness
    except ImportError as error:
        raise OSError(
            f"gpt-fn lm-eval needs lm-evaluation-harness: pip install 'gpt_fn[lm-eval]' ({error})"
        ) from error
    harness.main(args.args)
    return 0


# --- inspect --------------------------------------------------------------------------------


def _add_inspect_parser(commands: Any) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="a report on one prompt: logit lens, DLA per head, previous/duplicate-token heads",
    )
    _add_model_source(inspect)
    inspect.add_argument("--prompt", required=True, help="the text to inspect")
    inspect.add_argument(
        "--answer",
        metavar="TOKEN",
        help="the next token whose logit is attributed, a string that is one GPT-2 token "
        "(e.g. ' Mary'; default: the model's most likely next token)",
    )
    inspect.add_argument(
        "--wrong",
        metavar="TOKEN",
        help="a competing token, one GPT-2 token: attribute the answer's logit minus its logit",
    )
    inspect.add_argument(
        "--ln",
        choices=LN_MODES,
        default="recompute",
        help="the logit lens's final LayerNorm: each partial stream's own statistics "
        "(recompute, default) or the full stream's scale (frozen)",
    )
    inspect.add_argument(
        "--top", type=int, default=5, help="tokens and heads listed per table (default: 5)"
    )
    inspect.add_argument("--device", default="auto", help=field_help("device"))
    inspect.add_argument(
        "--out", type=Path, default=Path("inspect"), help="the report folder (default: inspect)"
    )
    inspect.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.checkpoint is None and args.hf is None:
        parser.error("give the model: --checkpoint DIR or --hf DIR")
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    from gpt_fn import inspect as inspection  # matplotlib loads only for this command

    device = resolve_device(args.device)
    # Inputs first: a bad prompt or token fails before the model loads.
    prompt = gpt2().encode_ordinary(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty: give the text to inspect")
    answer = None if args.answer is None else single_token(args.answer, name="--answer")
    wrong = None if args.wrong is None else single_token(args.wrong, name="--wrong")
    if answer is not None and answer == wrong:
        raise ValueError(f"--answer and --wrong are the same token {args.answer!r}")
    params, config, about = _eval_model(args, device)
    if len(prompt) > config.block_size:
        raise ValueError(
            f"--prompt is {len(prompt)} tokens; the model reads at most {config.block_size}"
        )
    for flag, ids in (("--prompt", prompt), ("--answer", [answer]), ("--wrong", [wrong])):
        outside = [i for i in ids if i is not None and i >= config.vocab_size]
        if outside:
            raise ValueError(
                f"{flag} holds GPT-2 token {outside[0]} ({gpt2().decode([outside[0]])!r}), "
                f"outside the model's vocabulary of {config.vocab_size}"
            )
    tokens = torch.tensor(prompt, device=device)
    found = inspection.inspect_prompt(
        params, tokens, config, answer=answer, wrong=wrong, ln=args.ln
    )
    with tqdm(unit="figure", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        written = inspection.write_report(
            found,
            args.out,
            config,
            title=f"gpt-fn inspect: {about['description']}",
            about={"model": about, "prompt": args.prompt},
            k=args.top,
            progress=bar.update,
        )
    target = inspection.attributed(written)
    print(f"{target}: logit{' difference' if wrong is not None else ''} "
          f"{written['logit_difference']:.4f}")  # fmt: skip
    for kind, scored in written["head_scores"].items():
        best = "none (no such key in the prompt)" if scored is None else ", ".join(
            f"L{layer}H{head} {score:.3f}" for layer, head, score in scored["top"][:3]
        )  # fmt: skip
        print(f"{kind.replace('_', '-')} heads: {best}")
    print(f"wrote {args.out}/report.md, results.json and {len(written['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
