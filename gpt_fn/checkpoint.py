"""Training checkpoints: one safetensors file holding params, optimizer state and metadata.

The file is written atomically (`gpt_fn.files.write_atomic`: a temporary file, flushed and
renamed over the old one), so a run killed mid-write keeps the last good checkpoint. Tensors
are stored as `params/<name>` and `optimizer/<name>`; the step, the model config, the training
settings and a sha256 of every tensor go in the safetensors metadata as JSON.

`load_checkpoint` verifies what it reads: the format, the checksum (a flipped byte anywhere
in the tensor data is an error, not a silently different model), and that the params are
exactly those of the recorded model config. `save_checkpoint` refuses non-finite params, so
a diverged run can never replace its last good checkpoint.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch

from gpt_fn.config import GPTConfig
from gpt_fn.files import write_atomic
from gpt_fn.model import check_params
from gpt_fn.shapes import Params

FORMAT = "gpt_fn-checkpoint-v2"
UNCHECKED_FORMATS = ("gpt_fn-checkpoint-v1",)
"""Older formats that still load: written before checkpoints carried a checksum."""
FILENAME = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the run that reads it."""


class Checkpoint(NamedTuple):
    params: Params
    optimizer_state: dict[str, torch.Tensor]
    step: int
    model_config: GPTConfig
    train_settings: dict[str, Any]


class CheckpointInfo(NamedTuple):
    """What a checkpoint's metadata says, read without loading its tensors."""

    path: Path
    step: int
    model_config: GPTConfig
    train_settings: dict[str, Any]


def checkpoint_path(path: str | Path) -> Path:
    """`path` itself if it is a file, else the checkpoint file inside the folder `path`."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / FILENAME


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically to `path` (a file, or a folder to hold `checkpoint.safetensors`).

    Raises `CheckpointError` (and writes nothing) if a param holds NaN or inf.
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
    metadata = {
        "format": FORMAT,
        "step": str(checkpoint.step),
        "model_config": json.dumps(checkpoint.model_config.to_dict()),
        "train_settings": json.dumps(checkpoint.train_settings),
        "sha256": tensors_sha256(tensors),
    }
    return write_atomic(
        target, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=metadata)
    )


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu") -> Checkpoint:
    """Read and verify a checkpoint written by `save_checkpoint`; `CheckpointError` names what is wrong."""
    source = checkpoint_path(path)
    metadata = _read_metadata(source)
    try:
        with safetensors.safe_open(str(source), framework="pt", device=str(device)) as f:
            # clone(): safetensors hands out views at 32-byte offsets; fresh 64-byte-aligned
            # storage makes CPU kernels take the same code paths as in the run that saved it,
            # so a resumed run matches an uninterrupted one to the last bit.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"checkpoint {source} is corrupt or truncated: {error}") from error
    if metadata["format"] == FORMAT and tensors_sha256(tensors) != metadata.get("sha256"):
        raise CheckpointError(
            f"checkpoint {source} is corrupt: its tensors do not match the sha256 recorded "
            "when it was written"
        )
    info = _info(source, metadata)
    params = _under(tensors, "params/")
    try:
        check_params(params, info.model_config)
    except (KeyError, ValueError) as error:
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


def _read_metadata(source: Path) -> dict[str, str]:
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}")
    try:
        with safetensors.safe_open(str(source), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"checkpoint {source} is corrupt or truncated: {error}") from error
    if metadata.get("format") not in (FORMAT, *UNCHECKED_FORMATS):
        raise CheckpointError(
            f"{source} is not a gpt_fn checkpoint (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return metadata


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
        )
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {source} has bad metadata: {error}") from error


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
