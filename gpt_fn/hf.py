"""GPT-2 weights both ways: Hugging Face `GPT2LMHeadModel` checkpoints <-> our parameter dict.

Our names are HF's without the `transformer.` prefix (`h.3.attn.c_attn.weight`), so the
conversion is a short list of differences (Radford et al. 2019; nanoGPT `from_pretrained`;
HF `transformers/models/gpt2/modeling_gpt2.py`):

- GPT-2's `Conv1D` stores its weight as `(in, out)`; we store `(out, in)` like `nn.Linear`, so
  the `c_attn`, `c_proj` and `c_fc` weights are transposed.
- The LM head is tied to the token embedding: `lm_head.weight` is `wte.weight`.
- HF checkpoints may carry the old causal-mask buffers `h.{i}.attn.bias`/`attn.masked_bias`,
  which are not parameters and are skipped.

`load` reads a local HF GPT-2 directory (`config.json` + safetensors or `pytorch_model.bin`,
sharded or not) without importing `transformers`, or a Hub model id through `huggingface_hub`;
`save` writes a directory that `GPT2LMHeadModel.from_pretrained` loads.
"""

import json
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from gpt_fn.config import GPTConfig
from gpt_fn.files import write_folder_atomic
from gpt_fn.model import check_params, check_shapes, param_shapes
from gpt_fn.shapes import Params
from gpt_fn.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, write_tokenizer_files


@runtime_checkable
class HFConfigLike(Protocol):
    """Anything with `to_dict()`, such as a `transformers.GPT2Config` (not imported here)."""

    def to_dict(self) -> dict[str, Any]: ...


StateDict = Mapping[str, Tensor]
"""A HF state dict: tensors by HF name, with or without the `transformer.` prefix."""

HF_PREFIX = "transformer."
# Layers built from GPT-2's Conv1D, whose weights are stored (in, out).
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# The causal-mask buffers older GPT-2 checkpoints saved next to the parameters.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# GPT2Config's defaults (transformers 5.x `configuration_gpt2.py`): config.json files omit
# fields left at their defaults, and `config_to_hf_dict` writes every field out.
HF_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "summary_activation": None,
    "summary_proj_to_labels": True,
    "summary_first_dropout": 0.1,
    "scale_attn_weights": True,
    "use_cache": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": None,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# Both name GELU with the tanh approximation, which is what `gpt_fn.nn.mlp` computes.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
HUB_CONNECT_TIMEOUT_S = 5.0
"""Seconds the Hub's host may take to accept a connection before `load` calls it offline."""
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def config_from_hf(
    hf_config: HFConfigLike | Mapping[str, Any], *, dropout: float = 0.0
) -> GPTConfig:
    """Our config for a HF GPT-2 config (a `GPT2Config` or the dict read from `config.json`).

    Fields missing from a dict take GPT2Config's defaults, as `transformers` does. Settings
    our model does not compute raise `ValueError` naming the field. HF's dropout rates are not
    carried over (our model has no dropout on attention probabilities, HF's `attn_pdrop`), so
    the caller picks `dropout` for fine-tuning; it is 0 for inference.
    """
    fields = dict(hf_config.to_dict() if isinstance(hf_config, HFConfigLike) else hf_config)
    fields = {**HF_GPT2_DEFAULTS, **fields}
    model_type = fields.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"model_type must be 'gpt2', got {model_type!r}")
    if fields["activation_function"] not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"activation_function {fields['activation_function']!r} is not supported; "
            f"choose one of {SUPPORTED_ACTIVATIONS} (GELU, tanh approximation)"
        )
    required = {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
    }
    for name, value in required.items():
        if fields[name] != value:
            raise ValueError(f"{name}={fields[name]!r} is not supported; only {name}={value}")
    n_inner = fields["n_inner"]
    if n_inner is not None and n_inner != 4 * fields["n_embd"]:
        raise ValueError(
            f"n_inner={n_inner!r} is not supported; only None or 4 * n_embd = {4 * fields['n_embd']}"
        )
    return GPTConfig(
        vocab_size=fields["vocab_size"],
        block_size=fields["n_positions"],
        n_layer=fields["n_layer"],
        n_head=fields["n_head"],
        n_embd=fields["n_embd"],
        bias=True,
        dropout=dropout,
        layer_norm_eps=float(fields["layer_norm_epsilon"]),
    )


def config_to_hf_dict(config: GPTConfig) -> dict[str, Any]:
    """A complete `GPT2Config` dict (as `config.json` holds it) for `config`.

    `resid_pdrop`/`embd_pdrop` are `config.dropout` and `attn_pdrop` is 0, the dropout our model
    applies. The end-of-text token ids are GPT-2's only where the vocabulary contains them.
    """
    _require_bias(config)
    end_of_text = EOT_TOKEN if config.vocab_size > EOT_TOKEN else None
    return {
        **HF_GPT2_DEFAULTS,
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": config.layer_norm_eps,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
    }


def _require_bias(config: GPTConfig) -> None:
    if not config.bias:
        raise ValueError("GPTConfig.bias=False has no GPT-2 equivalent: GPT-2 always has biases")


def _is_conv1d_weight(name: str) -> bool:
    return name.endswith(".weight") and name.removesuffix(".weight").endswith(CONV1D_LAYERS)


def hf_param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's HF name (without `transformer.`) and shape in HF's layout."""
    return {
        name: shape[::-1] if _is_conv1d_weight(name) else shape
        for name, shape in param_shapes(config).items()
    }


def _strip_prefix(state_dict: StateDict) -> dict[str, Tensor]:
    """Keys without `transformer.`; mask buffers dropped; `lm_head.weight` kept for a tie check."""
    stripped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(HF_PREFIX)
        if MASK_BUFFER.fullmatch(name):
            continue
        if name in stripped:
            raise ValueError(f"state dict has key {name!r} both with and without {HF_PREFIX!r}")
        stripped[name] = value
    return stripped


def check_hf_state_dict(state_dict: StateDict, config: GPTConfig) -> None:
    """Raise `KeyError`/`ValueError` naming the first missing, unexpected or misshapen HF key.

    Mirrors `gpt_fn.model.check_params` in HF's layout and names.
    """
    _require_bias(config)
    state = _strip_prefix(state_dict)
    state.pop("lm_head.weight", None)
    check_shapes(state, hf_param_shapes(config), what="HF state dict (HF layout)")


def from_hf_state_dict(state_dict: StateDict, config: GPTConfig) -> Params:
    """Our params from a HF GPT-2 state dict (keys with or without `transformer.`).

    Conv1D weights are transposed into new contiguous tensors; the other tensors are returned
    as they are (contiguous), so they may share storage with `state_dict`. An `lm_head.weight`,
    if present, must equal `wte.weight`: untied heads are not supported.
    """
    check_hf_state_dict(state_dict, config)
    state = _strip_prefix(state_dict)
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state["wte.weight"]):
        raise ValueError(
            "'lm_head.weight' differs from 'wte.weight'; only a tied LM head is supported"
        )
    return {
        name: (state[name].t() if _is_conv1d_weight(name) else state[name]).contiguous()
        for name in param_shapes(config)
    }


def to_hf_state_dict(params: Params, config: GPTConfig) -> dict[str, Tensor]:
    """A state dict that `GPT2LMHeadModel.load_state_dict` accepts (strict), tensors contiguous.

    Keys carry the `transformer.` prefix; `lm_head.weight` is the same tensor as
    `transformer.wte.weight` (tied). Untransposed tensors may share storage with `params`.
    """
    _require_bias(config)
    check_params(params, config)
    state = {
        HF_PREFIX + name: (value.t() if _is_conv1d_weight(name) else value).contiguous()
        for name, value in params.items()
    }
    state["lm_head.weight"] = state[HF_PREFIX + "wte.weight"]
    return state


def _looks_like_path(name: str) -> bool:
    """Whether a missing `name` was meant as a local path rather than a Hub id (`org/model`)."""
    return name.startswith((".", "/", "~")) or os.sep in name or name.count("/") > 1


def _local_fetch(directory: Path) -> Callable[[str], Path | None]:
    def fetch(filename: str) -> Path | None:
        path = directory / filename
        return path if path.is_file() else None

    return fetch


def _hub_fetch(repo_id: str) -> Callable[[str], Path | None]:
    """Files of a Hub repository: from huggingface_hub's cache, else downloaded.

    Before a download, the Hub's host must answer within `HUB_CONNECT_TIMEOUT_S`: offline,
    huggingface_hub would retry for half a minute and print each retry.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
    except ImportError as error:
        raise OSError(
            f"{repo_id!r} is not a local directory, and huggingface_hub is not installed to "
            "download it from the Hugging Face Hub (pip install huggingface_hub)"
        ) from error
    reachable: list[bool] = []  # checked once, at the first file not in the cache

    def offline(filename: str, reason: str) -> OSError:
        return OSError(
            f"{repo_id!r} is not a local directory, and fetching {filename!r} from the Hugging "
            f"Face Hub failed ({reason}). Offline? Pass a local directory with config.json "
            "and model.safetensors or pytorch_model.bin."
        )

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
        except RemoteEntryNotFoundError:
            return None
        if constants.HF_HUB_OFFLINE:
            raise offline(filename, "HF_HUB_OFFLINE is set")
        if not reachable:
            host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=HUB_CONNECT_TIMEOUT_S).close()
                reachable.append(True)
            except OSError as error:
                raise offline(filename, f"cannot reach {host}: {error}") from None
        try:
            return Path(hf_hub_download(repo_id, filename))
        except RemoteEntryNotFoundError:  # the repository exists but lacks this file
            return None
        except Exception as error:
            raise offline(filename, type(error).__name__) from error

    return fetch


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch.load raise their own types
        raise ValueError(f"{path} is corrupt or truncated: {error}") from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def _read_checkpoint(
    fetch: Callable[[str], Path | None], where: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config dict and merged weights of a checkpoint, preferring safetensors."""
    config_path = fetch("config.json")
    if config_path is None:
        raise FileNotFoundError(f"{where} has no config.json")
    hf_config = _read_json(config_path)
    for filename in WEIGHT_FILES:
        path = fetch(filename)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return hf_config, _read_weights(path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path} has no weight_map naming the shard of each weight")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = fetch(shard)
            if shard_path is None:
                raise FileNotFoundError(f"{where} lists shard {shard!r} in {filename} but lacks it")
            state.update(_read_weights(shard_path))
        return hf_config, state
    raise FileNotFoundError(f"{where} has none of the weight files {WEIGHT_FILES}")


def load(
    name_or_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Params, GPTConfig]:
    """GPT-2 params and config from a local HF directory or a Hub model id (`"gpt2"`).

    A local directory is read without `transformers`. A Hub id is downloaded (or read from the
    cache) with `huggingface_hub`; without a network that fails with `OSError` (set
    `HF_HUB_OFFLINE=1` to skip huggingface_hub's retries). A path that does not exist raises
    `FileNotFoundError`.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        fetch, where = _local_fetch(path), f"directory {str(path)!r}"
    elif path.exists():
        raise NotADirectoryError(f"{str(path)!r} is a file; pass the directory holding it")
    elif isinstance(name_or_dir, os.PathLike) or _looks_like_path(str(name_or_dir)):
        raise FileNotFoundError(f"no such directory: {str(path)!r}")
    else:
        fetch, where = _hub_fetch(str(name_or_dir)), f"Hub model {str(name_or_dir)!r}"
    hf_config, state = _read_checkpoint(fetch, where)
    config = config_from_hf(hf_config)
    params = from_hf_state_dict(state, config)
    return {name: value.to(device=device, dtype=dtype) for name, value in params.items()}, config


def save(
    params: Params,
    config: GPTConfig,
    directory: str | os.PathLike[str],
    *,
    tokenizer: bool | None = None,
) -> None:
    """Write a directory that `GPT2LMHeadModel.from_pretrained` loads: `config.json`,
    `model.safetensors` and (`tokenizer`) GPT-2's tokenizer files, atomically
    (`gpt_fn.files.write_folder_atomic`): a full disk leaves `directory` as it was and raises
    `OSError` naming it.

    `lm_head.weight` is left out: safetensors refuses tensors that share storage, and
    transformers re-ties the head to `wte` on load (`tie_word_embeddings=True`), as its own
    `save_pretrained` does. `tokenizer=None` writes the tokenizer files (`vocab.json`,
    `merges.txt`, `tokenizer_config.json`: `AutoTokenizer.from_pretrained(directory)` then
    works) when the model's vocabulary holds GPT-2's 50257 ids.
    """
    state = to_hf_state_dict(params, config)
    del state["lm_head.weight"]
    hf_config = {
        **config_to_hf_dict(config),
        "dtype": str(params["wte.weight"].dtype).removeprefix("torch."),
    }
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{str(out)!r} is a file, not a directory")
    tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    if tokenizer is None:
        tokenizer = config.vocab_size >= GPT2_VOCAB_SIZE

    def fill(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        try:
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        except SafetensorError as error:  # an I/O error, as safetensors' Rust code words it
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from None
        if tokenizer:
            write_tokenizer_files(folder, model_max_length=config.block_size)

    try:
        write_folder_atomic(out, fill)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"cannot write {out}: {reason}; nothing was written") from None
