"""Training checkpoints: one safetensors file, or a sharded `torch.distributed.checkpoint` folder.

The file is written atomically (`gpt_fn.files.write_atomic`: a temporary file, flushed and
renamed over the old one), so a run killed mid-write keeps the last good checkpoint. Tensors
are stored as `params/<name>` and `optimizer/<name>`; the step, the model config, the training
settings, the sha256 of the training data's source and a sha256 of every tensor go in the
safetensors metadata as JSON, and a second sha256 covers that metadata.

`load_checkpoint` verifies what it reads: the format, the checksums (a flipped byte anywhere
in the tensor data or in the metadata, e.g. a changed `min_lr`, is an error, not a silently
different model or schedule), and that the params are exactly those of the recorded model
config; `read_checkpoint_info` verifies the metadata's checksum. Formats v1 and v2 load
too: v2's checksum covers only its tensors, v1 has none. `save_checkpoint` refuses
non-finite params, so a diverged run can never replace its last good checkpoint, and a
failed write (a full disk) is a `CheckpointWriteError` that leaves the old file in place.

An FSDP run writes `checkpoint.dcp/` instead (`save_sharded_checkpoint`): every rank writes
its shards of the same `params/...` and `optimizer/...` tensors through
`torch.distributed.checkpoint` (DCP), and `gpt_fn.json` holds the step, config and settings.
It is written to a temporary folder and swapped in by renames, so an interrupted save never
replaces the last good one. DCP reshards on load: `load_sharded_into` fills the tensors of a
run on any number of ranks (DTensors or plain), and `load_checkpoint` reads it whole, so an
FSDP checkpoint converts to the single file (`save_checkpoint`) and to HF (`gpt_fn.hf.save`).
DCP's tensor files carry no checksum of ours (they have no place for one); `gpt_fn.json`
carries the sha256 of its own metadata.

A run with `--keep-checkpoints` (`KeepSchedule`) also keeps a series of checkpoints under
`checkpoints/step_000001.safetensors`, ...: each a whole checkpoint in the format above
(params and optimizer state, atomic and checksummed, resumable). `load_series` reads a series
back as one param dict stacked along a leading `step` axis, so `torch.func.vmap` analyses
every checkpoint in one call.
"""

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch

from gpt_fn.config import GPTConfig
from gpt_fn.files import write_atomic
from gpt_fn.model import check_params
from gpt_fn.shapes import Params

FORMAT = "gpt_fn-checkpoint-v3"
TENSORS_CHECKED_FORMATS = (FORMAT, "gpt_fn-checkpoint-v2")
"""Formats whose `sha256` covers the tensors; v2's metadata is not checked."""
OLDER_FORMATS = ("gpt_fn-checkpoint-v2", "gpt_fn-checkpoint-v1")
"""Older formats that still load: v2 checks its tensors only, v1 nothing."""
SHARDED_FORMAT = "gpt_fn-dcp-v2"
OLDER_SHARDED_FORMATS = ("gpt_fn-dcp-v1",)
"""An older sharded format that still loads: its metadata carries no checksum."""
FILENAME = "checkpoint.safetensors"
SHARDED = "checkpoint.dcp"
SHARDED_META = "gpt_fn.json"
SERIES = "checkpoints"
"""The run folder's subfolder that holds the kept checkpoints (`series_path`)."""
SERIES_NAME = re.compile(r"step_(\d+)\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the run that reads it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the old one is kept."""


class Checkpoint(NamedTuple):
    params: Params
    optimizer_state: dict[str, torch.Tensor]
    step: int
    model_config: GPTConfig
    train_settings: dict[str, Any]
    data_sha256: str | None = None
    """The sha256 of the training data's source (`gpt_fn.data.prepare`'s `source_sha256`)."""


class CheckpointInfo(NamedTuple):
    """What a checkpoint's metadata says, read without loading its tensors."""

    path: Path
    step: int
    model_config: GPTConfig
    train_settings: dict[str, Any]
    data_sha256: str | None = None


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint `path` names: a `.safetensors` file or a `checkpoint.dcp` folder itself,
    else the one inside the run folder `path` (the newer step, if it holds both)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".dcp"):
        return path
    found = [p for p in (path / FILENAME, path / SHARDED) if p.exists()]
    if len(found) == 2:
        return max(found, key=lambda p: _info(p, _read_metadata(p)).step)
    return found[0] if found else path / FILENAME


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically to `path` (a file, or a folder to hold `checkpoint.safetensors`).

    Raises `CheckpointError` (and writes nothing) if a param holds NaN or inf, and
    `CheckpointWriteError` if the file cannot be written (the old one is left in place).
    """
    target = checkpoint_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, value in checkpoint.params.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"refusing to write a checkpoint of non-finite params: {name!r} holds NaN or inf"
            )
    tensors = {f"params/{k}": v.detach().contiguous().cpu() for k, v in checkpoint.params.items()}
    tensors |= {
        f"optimizer/{k}": v.detach().contiguous().cpu()
        for k, v in checkpoint.optimizer_state.items()
    }
    metadata = _signed(
        {**_described(checkpoint), "format": FORMAT, "sha256": tensors_sha256(tensors)}
    )
    try:
        return write_atomic(
            target,
            lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=metadata),
        )
    except (OSError, safetensors.SafetensorError) as error:  # its I/O errors are its own type
        kept = f"the checkpoint at {target} is kept" if target.exists() else "nothing was written"
        raise CheckpointWriteError(
            f"cannot write checkpoint {target} ({error}): is the disk full? {kept}"
        ) from error


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu") -> Checkpoint:
    """Read and verify a checkpoint written by `save_checkpoint`; `CheckpointError` names what is wrong."""
    source = checkpoint_path(path)
    metadata = _read_metadata(source)
    if source.is_dir():
        return _load_sharded_whole(source, metadata, device)
    try:
        with safetensors.safe_open(str(source), framework="pt", device=str(device)) as f:
            # clone(): safetensors hands out views at 32-byte offsets; fresh 64-byte-aligned
            # storage makes CPU kernels take the same code paths as in the run that saved it,
            # so a resumed run matches an uninterrupted one to the last bit.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"checkpoint {source} is corrupt or truncated: {error}") from error
    if metadata["format"] in TENSORS_CHECKED_FORMATS and tensors_sha256(tensors) != metadata.get(
        "sha256"
    ):
        raise CheckpointError(
            f"checkpoint {source} is corrupt: its tensors do not match the sha256 recorded "
            "when it was written"
        )
    return _checked(source, metadata, tensors)


def _checked(
    source: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]
) -> Checkpoint:
    info = _info(source, metadata)
    params = _under(tensors, "params/")
    try:
        check_params(params, info.model_config)
    except (KeyError, ValueError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)
        raise CheckpointError(
            f"checkpoint {source} does not hold the params of its model config: {message}"
        ) from error
    return Checkpoint(
        params=params,
        optimizer_state=_under(tensors, "optimizer/"),
        step=info.step,
        model_config=info.model_config,
        train_settings=info.train_settings,
        data_sha256=info.data_sha256,
    )


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """A checkpoint's step, model config and training settings, without reading its tensors."""
    source = checkpoint_path(path)
    return _info(source, _read_metadata(source))


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _described(checkpoint: Checkpoint) -> dict[str, str]:
    """The metadata entries that describe `checkpoint` (all but the format and checksums)."""
    described = {
        "step": str(checkpoint.step),
        "model_config": json.dumps(checkpoint.model_config.to_dict()),
        "train_settings": json.dumps(checkpoint.train_settings),
    }
    if checkpoint.data_sha256 is not None:
        described["data_sha256"] = checkpoint.data_sha256
    return described


def _signed(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` with `metadata_sha256`: a sha256 over every other entry, names and values."""
    entries = json.dumps(sorted(metadata.items()))
    return {**metadata, "metadata_sha256": hashlib.sha256(entries.encode()).hexdigest()}


def _verified(source: Path, metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` if its `metadata_sha256` matches its entries; else `CheckpointError`."""
    unsigned = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    if _signed(unsigned) != metadata:
        raise CheckpointError(
            f"checkpoint {source} is corrupt: its metadata (step, config, settings) does not "
            "match the sha256 recorded when it was written"
        )
    return metadata


def _read_metadata(source: Path) -> dict[str, str]:
    if source.is_dir():
        try:
            metadata = json.loads((source / SHARDED_META).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {source} has no readable {SHARDED_META}: {error}"
            ) from None
        if not isinstance(metadata, dict) or metadata.get("format") not in (
            SHARDED_FORMAT,
            *OLDER_SHARDED_FORMATS,
        ):
            raise CheckpointError(f"{source} is not a gpt_fn sharded checkpoint")
        return _verified(source, metadata) if metadata["format"] == SHARDED_FORMAT else metadata
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}")
    try:
        with open(source, "rb"):  # safetensors reports an unreadable file as a missing one
            pass
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {source}: {error.strerror}") from None
    try:
        with safetensors.safe_open(str(source), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"checkpoint {source} is corrupt or truncated: {error}") from error
    if metadata.get("format") not in (FORMAT, *OLDER_FORMATS):
        raise CheckpointError(
            f"{source} is not a gpt_fn checkpoint (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return _verified(source, metadata) if metadata["format"] == FORMAT else metadata


def _info(source: Path, metadata: dict[str, str]) -> CheckpointInfo:
    try:
        train_settings = json.loads(metadata["train_settings"])
        if not isinstance(train_settings, dict):
            raise TypeError(f"train_settings is a {type(train_settings).__name__}, not a dict")
        return CheckpointInfo(
            path=source,
            step=int(metadata["step"]),
            model_config=GPTConfig.from_dict(json.loads(metadata["model_config"])),
            train_settings=train_settings,
            data_sha256=metadata.get("data_sha256"),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {source} has bad metadata: {error}") from error


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_sharded_checkpoint(run_folder: str | Path, checkpoint: Checkpoint, *, rank: int) -> Path:
    """Write `run_folder/checkpoint.dcp` with every rank's shards (call on every rank).

    The tensors may be DTensors (FSDP) or plain. Written to `.checkpoint.dcp.tmp`, then swapped
    in: the old folder becomes `.checkpoint.dcp.old` for one rename, which
    `recover_sharded` undoes if a crash falls between the two renames.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = Path(run_folder)
    final, temporary, old = folder / SHARDED, folder / f".{SHARDED}.tmp", folder / f".{SHARDED}.old"
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    state = {f"params/{k}": v.detach() for k, v in checkpoint.params.items()}
    state |= {f"optimizer/{k}": v.detach() for k, v in checkpoint.optimizer_state.items()}
    dcp.save(state, checkpoint_id=temporary)
    if rank == 0:
        metadata = _signed({**_described(checkpoint), "format": SHARDED_FORMAT})
        write_atomic(temporary / SHARDED_META, json.dumps(metadata).encode())
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        temporary.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def recover_sharded(run_folder: str | Path) -> list[Path]:
    """After a crash mid-save: put back a swapped-out checkpoint, drop a half-written one."""
    folder = Path(run_folder)
    final, temporary, old = folder / SHARDED, folder / f".{SHARDED}.tmp", folder / f".{SHARDED}.old"
    removed = []
    if old.exists() and not final.exists():
        old.rename(final)
    for leftover in (temporary, old):
        if leftover.exists():
            shutil.rmtree(leftover)
            removed.append(leftover)
    return removed


def load_sharded_into(
    path: str | Path, params: Params, optimizer_state: dict[str, torch.Tensor]
) -> CheckpointInfo:
    """Fill `params` and `optimizer_state` (DTensors or plain, on any number of ranks) from a
    sharded checkpoint, resharding as needed; returns its metadata."""
    import torch.distributed.checkpoint as dcp

    source = checkpoint_path(path)
    info = _info(source, _read_metadata(source))
    state = {f"params/{k}": v for k, v in params.items()}
    state |= {f"optimizer/{k}": v for k, v in optimizer_state.items()}
    with torch.no_grad():
        try:
            dcp.load(state, checkpoint_id=source)
        except Exception as error:  # DCP wraps missing keys and bad files in its own types
            raise CheckpointError(f"checkpoint {source} does not fit this run: {error}") from error
    return info


def _load_sharded_whole(
    source: Path, metadata: dict[str, str], device: torch.device | str
) -> Checkpoint:
    """A sharded checkpoint read whole into plain tensors, in one process."""
    import torch.distributed.checkpoint as dcp

    try:
        saved = dcp.FileSystemReader(str(source)).read_metadata().state_dict_metadata
        tensors = {
            name: torch.empty(item.size, dtype=item.properties.dtype, device=device)
            for name, item in saved.items()
        }
        dcp.load(tensors, checkpoint_id=source, no_dist=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {source} is corrupt or truncated: {error}") from error
    return _checked(source, metadata, tensors)


@dataclass(frozen=True)
class KeepSchedule:
    """Which steps a run keeps a checkpoint of (`--keep-checkpoints`): log-spaced steps 1, 2, 4,
    8, ... (Pythia's spacing), every `every` steps, or both; a run also keeps its last step.

    `KeepSchedule.parse("log+every:100")`; `step in schedule` says whether it is kept.
    """

    log: bool = False
    every: int | None = None

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"every:N needs N >= 1, got {self.every}")
        if not self.log and self.every is None:
            raise ValueError("a keep schedule keeps log-spaced steps, every N steps, or both")

    @classmethod
    def parse(cls, spec: str) -> "KeepSchedule":
        """`every:N`, `log` or `log+every:N` (either order); `ValueError` naming the spec."""
        log, every = False, None
        for part in spec.split("+"):
            match = re.fullmatch(r"every:(\d+)", part)
            if part == "log" and not log:
                log = True
            elif match and every is None and int(match[1]) >= 1:
                every = int(match[1])
            else:
                raise ValueError(
                    f"keep_checkpoints {spec!r} is not one of every:N (N >= 1), log, log+every:N"
                )
        return cls(log=log, every=every)

    def __contains__(self, step: int) -> bool:
        if step < 1:
            return False
        power_of_two = (step & (step - 1)) == 0
        return (self.log and power_of_two) or (self.every is not None and step % self.every == 0)

    def steps(self, start: int, last: int) -> list[int]:
        """The steps a run from `start` to `last` keeps: those in (start, last], with `last`."""
        return [s for s in range(start + 1, last + 1) if s in self or s == last]


class Series(NamedTuple):
    """A run's kept checkpoints: their steps, and their params stacked along a first axis."""

    steps: list[int]
    params: Params
    """Each tensor `(len(steps), *shape)`: `params[name][i]` is the param at `steps[i]`."""
    model_config: GPTConfig


def series_path(run_folder: str | Path, step: int) -> Path:
    """Where the run in `run_folder` keeps its checkpoint of `step`."""
    return Path(run_folder) / SERIES / f"step_{step:06d}.safetensors"


def kept_checkpoint(run_folder: str | Path, step: int) -> Path:
    """The path of the run's kept checkpoint of `step`; `CheckpointError` naming the kept
    steps if there is none."""
    path = series_path(run_folder, step)
    if not path.exists():
        kept = series_steps(run_folder)
        raise CheckpointError(
            f"{Path(run_folder) / SERIES} keeps no checkpoint of step {step}"
            + (f"; it keeps steps {kept}" if kept else " (the run kept none: --keep-checkpoints)")
        )
    return path


def series_steps(run_folder: str | Path) -> list[int]:
    """The steps the run in `run_folder` has kept a checkpoint of, in order."""
    folder = Path(run_folder) / SERIES
    if not folder.is_dir():
        return []
    names = (SERIES_NAME.fullmatch(path.name) for path in folder.iterdir())
    return sorted(int(match[1]) for match in names if match)


def load_series(
    run_folder: str | Path,
    *,
    steps: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> Series:
    """The kept checkpoints of the run in `run_folder` (all, or those of `steps`), each
    verified like `load_checkpoint`, with their params stacked along a leading `step` axis:

        series = load_series("out")
        logits = torch.func.vmap(lambda p: gpt_fn.forward(p, tokens, series.model_config))(
            series.params)                                  # (step, batch, seq, vocab)

    `CheckpointError` if there are none, a step is not kept, or two differ in model config.
    """
    kept = series_steps(run_folder)
    if not kept:
        raise CheckpointError(
            f"no kept checkpoints in {Path(run_folder) / SERIES} (train with --keep-checkpoints)"
        )
    wanted = kept if steps is None else list(steps)
    if not wanted:
        raise CheckpointError(f"steps is empty: name at least one of the kept steps {kept}")
    missing = [step for step in wanted if step not in kept]
    if missing:
        raise CheckpointError(
            f"{Path(run_folder) / SERIES} keeps no checkpoint of steps {missing}; "
            f"it keeps steps {kept}"
        )
    # Only each step's params are kept while loading: a checkpoint's optimizer state (about
    # 3x the params) goes as soon as its params are taken.
    stacked: dict[str, list[torch.Tensor]] = {}
    config = None
    for step in wanted:
        checkpoint = load_checkpoint(series_path(run_folder, step), device=device)
        if config is None:
            config = checkpoint.model_config
        elif checkpoint.model_config != config:
            raise CheckpointError(
                f"the kept checkpoint of step {step} is of another model config than that of "
                f"step {wanted[0]}: a series stacks checkpoints of one model"
            )
        for name, value in checkpoint.params.items():
            stacked.setdefault(name, []).append(value)
        del checkpoint
    params = {name: torch.stack(values) for name, values in stacked.items()}
    return Series(wanted, params, config)
