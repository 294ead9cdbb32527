"""Token shards on disk: llm.c's file format, a dataset folder's `meta.json`, and reading them.

A shard is the format llm.c and modded-nanogpt use for FineWeb: a header of 256 int32 (magic
20240520, version 1, token count, zeros), then the tokens as uint16. A dataset folder holds
a split's shards (`*_train_*.bin`, `*_val_*.bin`) and, when `gpt_fn.data.prepare` wrote it, a
`meta.json` that lists every shard with its token count. A folder of llm.c / modded-nanogpt
shards without `meta.json` is a dataset as it is: `load_meta` and `load_split` find the shards
by name.

`load_split(data_dir, split)` opens a split's shards as read-only memmaps, validated, and
returns one memmap (one shard) or a `TokenStream`, their virtual concatenation.
`read_token_file` reads any of the token files a user may hand over: a dataset folder (its
val split), one llm.c shard, or a raw uint16 file.

References: llm.c `dev/data/data_common.py` (`write_datafile`) and modded-nanogpt
`data/cached_fineweb10B.py` / `train_gpt.py` (`_load_data_shard`).
"""

import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import UInt16

from gpt_fn.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2

FORMAT_VERSION = 2
"""Bumped when the layout of the token files or `meta.json` changes; old datasets re-prepare.
1: headerless `train.bin`/`val.bin`; 2: llm.c shards listed in `meta.json`."""
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and page cache of int32
META_FILE = "meta.json"
Split = Literal["train", "val"]

SHARD_MAGIC = 20240520
"""First int32 of an llm.c token shard (llm.c `dev/data/data_common.py`)."""
SHARD_VERSION = 1
"""Second int32: 1 is uint16 GPT-2 tokens (llm.c's version 2 is uint32 LLaMA-3 tokens)."""
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


class TokenStream:
    """Token shards read as one 1-d uint16 sequence: a virtual concatenation, nothing copied.

    What `load_split` returns for a split of several shards (one shard is a plain memmap).
    `len()` and indexing behave as on `np.concatenate(shards)`: an int gives one token, a
    slice a new array (a view when it lies in one shard), an integer array of any shape the
    tokens at those positions (what `get_batch` uses; a row may cross a shard boundary).
    `np.asarray(stream)` concatenates every shard in memory.
    """

    dtype = np.dtype(TOKEN_DTYPE)
    ndim = 1

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        shards = tuple(shards)
        for i, shard in enumerate(shards):
            if not isinstance(shard, np.ndarray) or shard.dtype != TOKEN_DTYPE or shard.ndim != 1:
                raise TypeError(f"shards[{i}] must be a 1-d uint16 array")
        self.shards = tuple(shard for shard in shards if len(shard))
        if not self.shards:
            raise ValueError("a TokenStream needs at least one token")
        self.starts = np.cumsum([0, *(len(shard) for shard in self.shards)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} tokens in {len(self.shards)} shards)"

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        whole = np.concatenate(self.shards)
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index: object) -> np.ndarray | np.uint16:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(index, (int, np.integer)):
            position = operator.index(index)
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} is out of range for {len(self)} tokens")
            return self._gather(np.asarray(position % len(self), dtype=np.int64))[()]
        positions = np.asarray(index)
        if positions.dtype.kind not in "iu":
            raise IndexError(
                f"a TokenStream is indexed by ints, slices or int arrays, got {index!r}"
            )
        positions = positions.astype(np.int64)
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"an index is out of range for {len(self)} tokens")
        return self._gather(np.where(positions < 0, positions + len(self), positions))

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        for shard_index in range(max(first, 0), len(self.shards)):
            begin = int(self.starts[shard_index])
            if begin >= stop:
                break
            shard = self.shards[shard_index]
            pieces.append(shard[max(start - begin, 0) : min(stop - begin, len(shard))])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=TOKEN_DTYPE)

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        flat = positions.reshape(-1)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=TOKEN_DTYPE)
        for shard_index in np.unique(shard_of):
            where = shard_of == shard_index
            out[where] = self.shards[shard_index][flat[where] - self.starts[shard_index]]
        return out.reshape(positions.shape)


Tokens = UInt16[np.ndarray, " tokens"] | TokenStream
"""A split's tokens: one memmap (a dataset of one shard per split) or a `TokenStream`."""


def shard_header(count: int) -> bytes:
    """The 1024-byte header of an llm.c shard of `count` uint16 tokens."""
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, count)
    return header.tobytes()


def read_shard(path: str | os.PathLike[str]) -> UInt16[np.ndarray, " tokens"]:
    """The tokens of one llm.c shard as a read-only memmap; `ValueError` naming the file if bad.

    Checked: the header's magic and version, and that the file holds exactly the header's
    token count (a truncated or padded file is an error, not fewer or more tokens).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard {path} is missing: run `gpt-fn prepare` again")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(
            f"{path} holds {size} bytes, too few for the {SHARD_HEADER_BYTES}-byte header of a "
            "token shard"
        )
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    magic, version, count = (int(x) for x in header[:3])
    if magic != SHARD_MAGIC:
        raise ValueError(
            f"{path} is not a token shard: magic {magic}, expected {SHARD_MAGIC} (llm.c's format)"
        )
    if version != SHARD_VERSION:
        raise ValueError(
            f"{path} has shard version {version}; gpt_fn reads version {SHARD_VERSION} "
            "(uint16 GPT-2 tokens)"
        )
    expected = SHARD_HEADER_BYTES + count * np.dtype(TOKEN_DTYPE).itemsize
    if count < 1 or size != expected:
        raise ValueError(
            f"{path} holds {size} bytes but its header says {count} tokens ({expected} bytes): "
            "the file is truncated or damaged"
        )
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def read_meta(data_dir: Path) -> dict[str, object] | None:
    """`meta.json` of `data_dir` as a dict; None when it is missing or unreadable."""
    try:
        meta = json.loads((data_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def listed_shards(meta: dict[str, object]) -> dict[str, dict[str, int]]:
    """`meta["shards"]` checked: split -> {file name -> token count}, counts adding up."""
    shards = meta.get("shards")
    ok = isinstance(shards, dict) and all(
        isinstance(shards.get(split), dict)
        and all(
            isinstance(name, str) and "/" not in name and isinstance(count, int) and count > 0
            for name, count in shards[split].items()
        )
        and sum(shards[split].values()) == meta.get(f"{split}_tokens")
        for split in ("train", "val")
    )
    if not ok:
        raise ValueError(f"{META_FILE} lists no valid shards")
    return shards


def is_shard_folder(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder of llm.c / modded-nanogpt shards (`*_train_*.bin`, no
    `meta.json`): it trains as it is, with nothing to prepare."""
    path = Path(path)
    return (
        path.is_dir() and not (path / META_FILE).exists() and bool(_foreign_shards(path, "train"))
    )


def _foreign_shards(data_dir: Path, split: Split) -> list[Path]:
    """llm.c / modded-nanogpt shards of a split, found by name (`*_train_*.bin`), sorted."""
    return sorted(data_dir.glob(f"*_{split}_*.bin"))


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, object]:
    """The `meta.json` of a prepared dataset; a clear error when there is none.

    A folder of llm.c shards without `meta.json` gets one made up from their headers: GPT-2's
    tokenizer (what shard version 1 holds), the token counts and the shards found by name.
    """
    path = Path(data_dir)
    meta = read_meta(path)
    if meta is None:
        if (path / META_FILE).exists() or not _foreign_shards(path, "train"):
            raise FileNotFoundError(
                f"no prepared dataset in {str(data_dir)!r} ({META_FILE} missing or unreadable, "
                "and no *_train_*.bin shards): run `gpt-fn prepare` (gpt_fn.data.prepare) to "
                "create it"
            )
        shards = {
            split: {p.name: len(read_shard(p)) for p in _foreign_shards(path, split)}
            for split in ("train", "val")
        }
        return {
            "corpus": str(path),
            "source": "llm.c shards",
            "tokenizer": "gpt2",
            "vocab_size": gpt2().n_vocab,
            "eot_token": EOT_TOKEN,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "train_tokens": sum(shards["train"].values()),
            "val_tokens": sum(shards["val"].values()),
            "shards": shards,
        }
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"the dataset in {str(data_dir)!r} has format_version {meta.get('format_version')!r}, "
            f"this gpt_fn reads {FORMAT_VERSION}: run `gpt-fn prepare` again"
        )
    if meta.get("complete") is not True:
        raise ValueError(
            f"the dataset in {str(data_dir)!r} is incomplete (an interrupted `gpt-fn prepare`?): "
            "run `gpt-fn prepare` again"
        )
    return meta


def load_split(data_dir: str | os.PathLike[str], split: Split, *, block_size: int) -> Tokens:
    """A split's tokens, validated: one read-only memmap, or a `TokenStream` over its shards.

    Checked: every shard exists with a good header and exactly the token count `meta.json`
    records, every id is below the vocab size (one pass over the files), and the split holds
    at least `block_size + 1` tokens (one input row and its shifted target).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    meta = load_meta(data_dir)
    if meta.get("dtype") != np.dtype(TOKEN_DTYPE).name:
        raise ValueError(
            f"{data_dir}/{META_FILE} says dtype {meta.get('dtype')!r}, expected "
            f"{np.dtype(TOKEN_DTYPE).name!r}: run `gpt-fn prepare` again"
        )
    try:
        listed = listed_shards(meta)[split]
    except ValueError as error:
        raise ValueError(f"{data_dir}/{META_FILE}: {error}: run `gpt-fn prepare` again") from error
    if not listed:
        raise FileNotFoundError(f"{data_dir} has no {split} shards (*_{split}_*.bin)")
    shards = []
    for name, count in listed.items():
        shard = read_shard(Path(data_dir) / name)
        if len(shard) != count:
            raise ValueError(
                f"{Path(data_dir) / name} holds {len(shard)} tokens, {META_FILE} records "
                f"{count}: run `gpt-fn prepare` again"
            )
        largest = int(shard.max())
        vocab_size = meta.get("vocab_size")
        if not isinstance(vocab_size, int) or largest >= vocab_size:
            raise ValueError(
                f"{Path(data_dir) / name} holds token id {largest}, not below the vocab size "
                f"{vocab_size!r}: changed in place? run `gpt-fn prepare --force` to rebuild it"
            )
        shards.append(shard)
    total = sum(len(shard) for shard in shards)
    if total < block_size + 1:
        raise ValueError(
            f"the {split} split has {total} tokens, fewer than block_size + 1 = "
            f"{block_size + 1}: use a smaller block_size or a larger corpus"
        )
    return shards[0] if len(shards) == 1 else TokenStream(shards)


def read_token_file(path: str | os.PathLike[str]) -> UInt16[np.ndarray, " tokens"]:
    """GPT-2 tokens from a dataset folder (its val split), an llm.c shard or a raw uint16 file.

    An llm.c shard is told from a raw file by its first four bytes (the shard magic). Every id
    must be a GPT-2 token: an id the tokenizer never makes (a vocabulary's padding, 50257 and
    up) has no bytes. Errors name the file.
    """
    path = Path(path)
    if path.is_dir():
        return np.asarray(load_split(path, "val", block_size=1))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as file:
        is_shard = file.read(4) == np.int32(SHARD_MAGIC).tobytes()
    if is_shard:
        return _gpt2_tokens(path, read_shard(path))
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty: it holds no tokens")
    if size % 2:
        raise ValueError(f"{path} holds {size} bytes, not a whole number of uint16 token ids")
    return _gpt2_tokens(path, np.memmap(path, dtype=TOKEN_DTYPE, mode="r"))


def _gpt2_tokens(path: Path, tokens: np.ndarray) -> np.ndarray:
    """`tokens` if every id is below GPT-2's vocabulary size; a `ValueError` naming `path` if not."""
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= GPT2_VOCAB_SIZE:
        raise ValueError(
            f"{path} holds id {largest}, not a GPT-2 token (< {GPT2_VOCAB_SIZE}): is it a GPT-2 "
            "token file?"
        )
    return tokens
