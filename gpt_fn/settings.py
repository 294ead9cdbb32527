"""The settings of a training run: one frozen dataclass; each field's help and kind said once.

`TrainSettings` is what `gpt-fn train` parses its flags into (one flag per field, the help
text from the field's metadata) and what a checkpoint records. Every value is type-checked
when the object is built, whether it came from a flag, a `--config` JSON file or Python:
`{"compile": "no"}` is an error, not `compile=True`.

Each field has a kind, which decides what resuming may change (`resume_settings`):

- `run`: the run's trajectory depends on it (data, batch, schedule, optimizer, precision,
  seed). A resumed run keeps the checkpoint's value; a different one is refused unless
  `allow_changes` is set, and then reported.
- `model`: the model's shape; the checkpoint's model config decides, a different one is refused.
- `execution`: where and how the run executes and reports (device, compile, kernel, evals,
  samples, paths). May change freely; changes are reported.
- `length`: `max_steps`. Resuming may stop earlier (never before the checkpoint's step) or
  extend the run: the lr schedule is part of the run and stays as it was, so steps past the
  end of its decay (if any) train at `min_lr`.

Fields whose default is `None` (or `"auto"`) are derived (`resolved()`: the warmup scales with
the run, the cosine ends at `max_steps`, the autocast dtype follows the device); the checkpoint records
the derived values, and on resume a derived field left unset keeps the run's value.
"""

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from beartype import BeartypeConf
from beartype.door import is_bearable

from gpt_fn.checkpoint import KeepSchedule
from gpt_fn.checks import SEED_LIMIT
from gpt_fn.config import PRESETS, GPTConfig
from gpt_fn.data import BUILTIN_CORPORA, is_shard_folder
from gpt_fn.nn import KernelName
from gpt_fn.runlog import LOGGERS, RunLogError, check_available

Kind = Literal["run", "model", "execution", "length", "flag"]
DEFAULT_WARMUP_STEPS = 20
"""Warmup of a long run; shorter runs warm up for a tenth of their steps."""


def _setting(default: Any, help: str, kind: Kind) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind})


class SettingsError(ValueError):
    """A setting has the wrong type or value, or a resumed run would change its settings."""


# no_type_check: the fields are checked by `__post_init__` (a JSON `"lr": 1` is a valid
# number), not by jaxtyping's import hook, whose beartype check would refuse it first.
@typing.no_type_check
@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a run; the defaults are the CPU main job (`gpt-fn train` with no flags)."""

    data: str = _setting(
        "shakespeare",
        "corpus: shakespeare (offline, the default), tinyshakespeare (downloaded), a local "
        ".txt/.jsonl file or folder of them, or a folder of llm.c token shards (used as is)",
        "run",
    )
    data_dir: str | None = _setting(
        None, "where the token files go (default: data/<corpus name>)", "execution"
    )
    out_dir: str = _setting("out", "checkpoint, metrics.jsonl and loss.png go here", "execution")
    preset: str = _setting("cpu-small", f"model shape preset: {', '.join(PRESETS)}", "model")
    n_layer: int | None = _setting(None, "transformer blocks (default: the preset's)", "model")
    n_head: int | None = _setting(None, "attention heads (default: the preset's)", "model")
    n_embd: int | None = _setting(None, "model width (default: the preset's)", "model")
    block_size: int | None = _setting(
        None, "context length in tokens (default: the preset's, or the weights')", "model"
    )
    dropout: float | None = _setting(None, "dropout rate (default: the preset's)", "model")
    init_from: str = _setting(
        "scratch", "scratch, or GPT-2 weights: a HF directory or hub name (e.g. gpt2)", "model"
    )
    attention: KernelName = _setting(
        "sdpa", "attention kernel: sdpa (fused) or manual (explicit scores)", "execution"
    )
    batch_size: int = _setting(16, "rows per micro-step, summed over DDP ranks", "run")
    grad_accum: int = _setting(1, "micro-steps per optimizer step", "run")
    max_steps: int = _setting(300, "optimizer steps of the run", "length")
    lr: float = _setting(2e-3, "peak learning rate (linear warmup, then cosine to --min-lr)", "run")
    min_lr: float = _setting(2e-4, "learning rate at the end of the cosine decay", "run")
    warmup_steps: int | None = _setting(
        None,
        f"linear warmup steps (default: {DEFAULT_WARMUP_STEPS}, or a tenth of a shorter run)",
        "run",
    )
    lr_decay_steps: int | None = _setting(
        None, "step at which the cosine decay reaches --min-lr (default: --max-steps)", "run"
    )
    optimizer: Literal["adamw", "muon"] = _setting(
        "muon",
        "adamw, or muon: Muon for the blocks' matrices, AdamW for embeddings, gains, biases",
        "run",
    )
    muon_lr: float = _setting(
        0.02, "Muon's peak learning rate (the same warmup and cosine as --lr)", "run"
    )
    muon_momentum: float = _setting(0.95, "Muon's (Nesterov) momentum", "run")
    weight_decay: float = _setting(0.1, "weight decay on matrices (AdamW and Muon)", "run")
    beta1: float = _setting(0.9, "AdamW beta1", "run")
    beta2: float = _setting(0.95, "AdamW beta2", "run")
    grad_clip: float = _setting(1.0, "clip the global gradient norm to this (0: off)", "run")
    eval_interval: int = _setting(100, "evaluate and checkpoint every N steps", "execution")
    keep_checkpoints: str | None = _setting(
        None,
        "also keep the checkpoints of some steps in OUT/checkpoints/: every:N, log (steps 1, 2, "
        "4, 8, ...) or log+every:N, and the last step; each is resumable (--from-step)",
        "execution",
    )
    eval_batches: int = _setting(10, "batches in each validation-loss estimate", "execution")
    sample_every: int = _setting(
        0, "also print a sample every N steps (0: only at the end)", "execution"
    )
    sample_tokens: int = _setting(160, "tokens in each printed sample", "execution")
    autocast_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _setting(
        "auto",
        "autocast dtype (auto: bfloat16 on CUDA, float32 on CPU; float16 with dynamic loss "
        "scaling)",
        "run",
    )
    compile: bool | None = _setting(
        None, "torch.compile the model (default: on for CUDA, off on CPU)", "execution"
    )
    activation_checkpointing: bool = _setting(
        False,
        "recompute each block's activations in backward instead of keeping them (less memory, "
        "one more forward of the blocks; same losses and gradients)",
        "execution",
    )
    log: str = _setting(
        "",
        "run logs besides metrics.jsonl: wandb and/or tensorboard (repeat --log; extras "
        ".[wandb], .[tensorboard]; wandb honours WANDB_MODE=offline)",
        "execution",
    )
    log_project: str | None = _setting(None, "the wandb project (default: gpt-fn)", "execution")
    log_name: str | None = _setting(
        None, "the wandb run's display name (default: the --out-dir folder's name)", "execution"
    )
    eval_choices: str | None = _setting(
        None,
        "a HellaSwag-layout .jsonl of multiple-choice items scored at every eval (acc, acc_norm)",
        "execution",
    )
    eval_text: str | None = _setting(
        None, "a held-out text file whose bits per byte are measured at every eval", "execution"
    )
    device: str = _setting(
        "auto", "auto (CUDA when present, else cpu), cpu, cuda, cuda:1, ...", "execution"
    )
    parallel: Literal["ddp", "fsdp"] = _setting(
        "ddp",
        "under torchrun: ddp (every rank holds the model) or fsdp (params, grads and "
        "optimizer state sharded; checkpoints through torch.distributed.checkpoint)",
        "execution",
    )
    seed: int = _setting(0, "seed of the init, the batches and dropout", "run")
    resume: bool = _setting(
        False, "continue the run in --out-dir from its checkpoint, with its settings", "flag"
    )
    overwrite: bool = _setting(
        False, "start a new run in an --out-dir that holds one, deleting it", "flag"
    )
    from_step: int | None = _setting(
        None,
        "with --resume: resume from the kept checkpoint of step N (OUT/checkpoints/); the "
        "later steps' records and kept checkpoints are dropped",
        "flag",
    )
    allow_changes: bool = _setting(
        False,
        "with --resume: train on with settings or a corpus that differ from the run's, or a "
        "metrics log that ends before its checkpoint",
        "flag",
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _checked_type(field.name, getattr(self, field.name), FIELD_TYPES[field.name])
            object.__setattr__(self, field.name, value)
        if not self.data.strip():
            raise SettingsError(
                "data must not be empty: name a built-in corpus, a text file, a .jsonl file or "
                "a folder"
            )
        positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("sample_every", "sample_tokens", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SettingsError(f"{name} must be >= 0, got {value!r}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise SettingsError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise SettingsError(
                f"lr_decay_steps must be >= 1 (or unset: --max-steps), got {self.lr_decay_steps}"
            )
        for name in ("lr", "min_lr", "muon_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingsError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.min_lr > self.lr:
            raise SettingsError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingsError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise SettingsError(f"dropout must be in [0, 1), got {self.dropout!r}")
        try:
            GPTConfig.from_preset(self.preset)  # where a preset's name is checked
        except ValueError as error:
            raise SettingsError(str(error)) from None
        warmup, decay = self.resolved_warmup_steps, self.resolved_lr_decay_steps
        if warmup >= decay:
            raise SettingsError(
                f"warmup_steps ({warmup}) must be < lr_decay_steps ({decay}): the cosine needs "
                "at least one step"
            )
        for name in self.log_kinds:
            if name not in LOGGERS:
                raise SettingsError(f"unknown --log {name!r}: choose from {', '.join(LOGGERS)}")
        if self.allow_changes and not self.resume:
            raise SettingsError("allow_changes only applies with resume")
        if self.from_step is not None and not self.resume:
            raise SettingsError("from_step only applies with resume")
        if self.from_step is not None and self.from_step < 1:
            raise SettingsError(f"from_step must be >= 1, got {self.from_step!r}")
        if self.keep_checkpoints is not None:
            try:
                KeepSchedule.parse(self.keep_checkpoints)
            except ValueError as error:
                raise SettingsError(str(error)) from None
        if self.overwrite and self.resume:
            raise SettingsError(
                "resume continues the run in out_dir; overwrite deletes it: pick one"
            )

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "TrainSettings":
        """Settings from a mapping (a `--config` file, a checkpoint); unknown names are errors."""
        if not isinstance(fields, Mapping):
            raise SettingsError(
                f"training settings must be a JSON object of field: value, got a "
                f"{type(fields).__name__}"
            )
        fields = current_names(fields)
        unknown = sorted(set(fields) - set(FIELD_TYPES))
        if unknown:
            raise SettingsError(f"unknown training settings: {unknown}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def log_kinds(self) -> tuple[str, ...]:
        """The run logs `log` names (`"wandb,tensorboard"` -> both), each once."""
        return tuple(dict.fromkeys(name.strip() for name in self.log.split(",") if name.strip()))

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(DEFAULT_WARMUP_STEPS, self.resolved_lr_decay_steps // 10)

    @property
    def resolved_lr_decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    def resolved(self, autocast_dtype: str) -> "TrainSettings":
        """These settings with the derived fields filled in (`autocast_dtype`: what "auto"
        became)."""
        return dataclasses.replace(
            self,
            warmup_steps=self.resolved_warmup_steps,
            lr_decay_steps=self.resolved_lr_decay_steps,
            autocast_dtype=autocast_dtype,
        )

    def model_config(self, base: GPTConfig | None = None) -> GPTConfig:
        """The preset (or `base`, e.g. GPT-2 weights' config) with this run's overrides."""
        overrides = {
            name: getattr(self, name)
            for name in ("n_layer", "n_head", "n_embd", "block_size", "dropout")
            if getattr(self, name) is not None
        }
        if base is None:
            return GPTConfig.from_preset(self.preset, **overrides)
        return dataclasses.replace(base, **overrides)

    def data_path(self) -> Path:
        if is_shard_folder(self.data):
            return Path(self.data)
        if self.data_dir is not None:
            return Path(self.data_dir)
        return Path("data") / (self.data if self.data in BUILTIN_CORPORA else Path(self.data).stem)


def check_this_machine(settings: TrainSettings) -> None:
    """`SettingsError` in one line if this machine lacks what `settings` asks for: a run log's
    package, an eval file. Checked where a run starts, on its final (resumed: merged) settings,
    not in `TrainSettings`: a checkpoint's saved settings must load on any machine."""
    try:
        check_available(settings.log_kinds)
    except RunLogError as error:
        raise SettingsError(str(error)) from None
    for name in ("eval_choices", "eval_text"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise SettingsError(f"{name}: no such file {path!r}")


# Not typing.get_type_hints: it returns nothing for a no_type_check class.
FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(TrainSettings)}
DERIVED = {"warmup_steps": None, "lr_decay_steps": None, "autocast_dtype": "auto"}
"""Fields whose value is derived when unset, and the value that means unset."""
RENAMED = {"dtype": "autocast_dtype"}
"""Former names of settings, as older checkpoints and `--config` files hold them."""


def current_names(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` with each former name (`RENAMED`) replaced by the setting's current name."""
    return {RENAMED.get(name, name): value for name, value in fields.items()}


def field_help(name: str) -> str:
    return next(f for f in dataclasses.fields(TrainSettings) if f.name == name).metadata["help"]


def field_kind(name: str) -> Kind:
    return next(f for f in dataclasses.fields(TrainSettings) if f.name == name).metadata["kind"]


def resume_settings(
    requested: TrainSettings, saved: Mapping[str, Any], *, step: int
) -> tuple[TrainSettings, list[str]]:
    """The settings a resumed run trains with, and one note per setting that changes.

    `requested` is what the user asked for (`resume=True`); `saved` the run's settings from
    its checkpoint at `step`. See the module docstring for what may change and how. Raises
    `SettingsError` naming every refused change.
    """
    try:
        # Flags say how this command starts; the run's own flags are not kept.
        flags = {
            f.name: f.default
            for f in dataclasses.fields(TrainSettings)
            if f.metadata["kind"] == "flag"
        }
        run = TrainSettings.from_dict({**saved, **flags})
    except (SettingsError, TypeError) as error:
        raise SettingsError(f"the checkpoint's training settings are unusable: {error}") from error
    run = run.resolved(
        run.autocast_dtype
    )  # checkpoints record resolved settings; older ones may not
    merged: dict[str, Any] = {}
    refused: list[str] = []
    notes: list[str] = []
    for field in dataclasses.fields(TrainSettings):
        name, kind = field.name, field.metadata["kind"]
        value, before = getattr(requested, name), getattr(run, name)
        if name in DERIVED and value == DERIVED[name]:
            value = before
        merged[name] = value
        if value == before or kind in ("flag", "model"):
            continue  # the model config is compared with the checkpoint's where it is built
        change = f"{name} {before!r} -> {value!r}"
        if kind == "run":
            refused.append(change)
        elif kind == "execution":
            notes.append(f"changed {change}")
        elif value < step:  # max_steps
            raise SettingsError(
                f"max_steps {value} is below the checkpoint's step {step}: a resumed run can "
                "only go forward"
            )
        elif value > before:
            decay = run.resolved_lr_decay_steps
            past = f", so steps {decay} to {value - 1} train at min_lr" if value > decay else ""
            notes.append(
                f"extending the run from {before} to {value} steps: its lr schedule is kept "
                f"(cosine to min_lr={run.min_lr:g} at step {decay}){past}"
            )
    if refused and not requested.allow_changes:
        raise SettingsError(
            "resuming would change the run's settings ("
            + ", ".join(refused)
            + "): a resumed run keeps the settings saved in its checkpoint; drop these, or "
            "pass --allow-changes to train on with them (the run then differs from an "
            "uninterrupted one)"
        )
    notes += [f"changed {change} (--allow-changes)" for change in refused]
    return TrainSettings(**merged), notes


_NUMBER_TOWER = BeartypeConf(is_pep484_tower=True)
"""An int is a valid `float` setting (a JSON `"lr": 1`), as PEP 484's numeric tower says."""


def _checked_type(name: str, value: Any, hint: Any) -> Any:
    """`value` if it has the type `hint` names (an int is also a float, a bool neither: a flag
    is no count), as a float where a float is due; else one line of `SettingsError`."""
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    if is_bearable(value, hint, conf=_NUMBER_TOWER) and (
        not isinstance(value, bool) or bool in options
    ):
        converts = float in options and int not in options and isinstance(value, int)
        return float(value) if converts else value
    expected = " or ".join(_type_name(option) for option in options)
    raise SettingsError(f"{name} must be {expected}, got {value!r}")


def _type_name(option: Any) -> str:
    if typing.get_origin(option) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(option))
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
    return names.get(option, "null" if option is type(None) else str(option))
