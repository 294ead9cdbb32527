"""Training checkpoints: one safetensors file holding params, optimizer state and metadata.

The file is written to a temporary name in the same folder, flushed to disk and renamed over
the old one (`os.replace` is atomic on POSIX), so a run killed mid-write keeps the last good
checkpoint. Tensors are stored as `params/<name>` and `optimizer/<name>`; the step, the
model config and the training settings go in the safetensors metadata as JSON.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch

from gpt_fn.config import GPTConfig
from gpt_fn.shapes import Params

FORMAT = "gpt_fn-checkpoint-v1"
FILENAME = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the run that reads it."""


class Checkpoint(NamedTuple):
    params: Params
    optimizer_state: dict[str, torch.Tensor]
    step: int
    model_config: GPTConfig
    train_settings: dict[str, Any]


def checkpoint_path(path: str | Path) -> Path:
    """`path` itself if it is a file, else the checkpoint file inside the folder `path`."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / FILENAME


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically to `path` (a file, or a folder to hold `checkpoint.safetensors`)."""
    target = checkpoint_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
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
    }
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; `CheckpointError` names what is wrong."""
    source = checkpoint_path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}")
    try:
        with safetensors.safe_open(str(source), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            # clone(): safetensors hands out views at 32-byte offsets; fresh 64-byte-aligned
            # storage makes CPU kernels take the same code paths as in the run that saved it,
            # so a resumed run matches an uninterrupted one to the last bit.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"checkpoint {source} is corrupt or truncated: {error}") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{source} is not a gpt_fn checkpoint (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        model_config = GPTConfig.from_dict(json.loads(metadata["model_config"]))
        step = int(metadata["step"])
        train_settings = json.loads(metadata["train_settings"])
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {source} has bad metadata: {error}") from error
    return Checkpoint(
        params=_under(tensors, "params/"),
        optimizer_state=_under(tensors, "optimizer/"),
        step=step,
        model_config=model_config,
        train_settings=train_settings,
    )


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
