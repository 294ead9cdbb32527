"""`prepare`: a corpus tokenized into a dataset folder of GPT-2 token shards and `meta.json`.

`prepare(corpus, out_dir)` encodes every document of a corpus (`gpt_fn.data.corpora`) with
GPT-2's BPE (tiktoken, in batches on a thread pool: its encoder releases the GIL), appends
`<|endoftext|>` after each (GPT-2 and nanoGPT's openwebtext separate documents this way), and
splits the token stream like nanoGPT: the first `1 - val_fraction` of the tokens are train,
the rest val. The splits are written as llm.c shards (`gpt_fn.data.shards`) of `shard_tokens`
tokens (the last of each split shorter), named `tokens_{train,val}_{i:06d}.bin`. `meta.json`
records the corpus, the source hash, counts, tokenizer, dtype and every shard with its token
count. Memory stays flat whatever the corpus size: the stream is written shard by shard, then
the val tail is copied out of the last train shards once the total is known. `meta.json` is
written first marked incomplete and last complete, and each shard atomically
(`gpt_fn.files.write_atomic`), so an interrupted run never leaves a dataset that looks
complete. A second call with the same source text and settings only reads the source and
returns.

References: nanoGPT `data/shakespeare/prepare.py`, `data/openwebtext/prepare.py`; llm.c
`dev/data/data_common.py` (`write_datafile`).
"""

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gpt_fn.data import corpora
from gpt_fn.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    SHARD_HEADER_BYTES,
    TOKEN_DTYPE,
    Split,
    listed_shards,
    read_meta,
    shard_header,
)
from gpt_fn.files import lock_folder, write_atomic
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

SHARD_PREFIX = "tokens"
SHARD_TOKENS = 100_000_000
"""Tokens per shard by default: llm.c's and modded-nanogpt's FineWeb shards (200 MB each)."""
_BATCH_PIECES_PER_THREAD = 4
"""Pieces in flight per thread: enough to keep every thread busy, few enough to bound memory."""
_COPY_TOKENS = 1 << 20
"""Tokens per read when the val tail is copied out of the train shards (2 MB)."""


class Prepared(NamedTuple):
    """What `prepare` returns: the dataset's `meta.json` contents and whether it was rewritten."""

    meta: dict[str, object]
    rebuilt: bool
    """False when the dataset on disk already matched the source and settings."""


def _shard_name(split: Split, index: int) -> str:
    return f"{SHARD_PREFIX}_{split}_{index:06d}.bin"


class _Queue:
    """Token arrays from an iterator, handed out in runs of at most n tokens."""

    def __init__(self, chunks: Iterable[np.ndarray]) -> None:
        self._chunks = iter(chunks)
        self._head = np.empty(0, dtype=TOKEN_DTYPE)

    def exhausted(self) -> bool:
        while not len(self._head):
            try:
                self._head = next(self._chunks)
            except StopIteration:
                return True
        return False

    def take(self, n: int) -> Iterator[np.ndarray]:
        while n > 0 and not self.exhausted():
            part, self._head = self._head[:n], self._head[n:]
            n -= len(part)
            yield part


def _write_shards(
    out: Path, split: Split, chunks: Iterable[np.ndarray], shard_tokens: int
) -> dict[str, int]:
    """Write `chunks` as shards `tokens_<split>_000000.bin`, ... of `shard_tokens`; name -> count."""
    queue = _Queue(chunks)
    shards: dict[str, int] = {}
    while not queue.exhausted():
        name = _shard_name(split, len(shards))
        count = 0

        def fill(temporary: Path) -> None:
            nonlocal count
            with open(temporary, "wb") as file:
                file.write(shard_header(0))
                for part in queue.take(shard_tokens):
                    file.write(memoryview(np.ascontiguousarray(part)))
                    count += len(part)
                file.seek(0)
                file.write(shard_header(count))

        write_atomic(out / name, fill)
        shards[name] = count
    return shards


def _read_tokens(path: Path, start: int, stop: int) -> Iterator[np.ndarray]:
    """Tokens `start:stop` of a shard we wrote, in runs of `_COPY_TOKENS` (file reads, not a memmap).

    Plain reads keep the copy's memory at one run: a memmap's pages would count in the resident
    set until the process ends.
    """
    with open(path, "rb") as file:
        file.seek(SHARD_HEADER_BYTES + start * np.dtype(TOKEN_DTYPE).itemsize)
        while start < stop:
            run = np.fromfile(file, dtype=TOKEN_DTYPE, count=min(_COPY_TOKENS, stop - start))
            if not len(run):
                raise ValueError(f"{path} ended early while preparing: was it changed meanwhile?")
            start += len(run)
            yield run


def _encoded(
    pieces: Iterable[tuple[str, bool]], num_threads: int, documents: list[int]
) -> Iterator[np.ndarray]:
    """The token stream of `pieces`, `<|endoftext|>` after each document, as uint16 arrays.

    Pieces are encoded in batches on a thread pool (tiktoken's encoder releases the GIL);
    each thread takes every `num_threads`-th piece of a batch as one task, so many small
    documents cost few tasks. One thread encodes in the calling thread: tiktoken measured
    ~20% slower in any other thread here (benchmarks/prepare.py). `documents[0]` counts the
    documents seen.
    """
    encoding = gpt2()
    eot = np.array([EOT_TOKEN], dtype=TOKEN_DTYPE)

    def encode(run: list[str]) -> list[np.ndarray]:
        # encode_to_numpy with nothing special allowed or disallowed is encode_ordinary, without
        # a Python list of ints per token.
        return [encoding.encode_to_numpy(text, disallowed_special=()) for text in run]

    def flush(batch: list[str], ends: list[bool], pool: ThreadPoolExecutor | None) -> np.ndarray:
        runs = [batch[i::num_threads] for i in range(num_threads)]
        encoded = list(map(encode, runs) if pool is None else pool.map(encode, runs))
        parts = []
        for i, last in enumerate(ends):
            parts.append(encoded[i % num_threads][i // num_threads].astype(TOKEN_DTYPE))
            if last:
                parts.append(eot)
                documents[0] += 1
        return np.concatenate(parts)

    limit = _BATCH_PIECES_PER_THREAD * num_threads * corpora.PIECE_CHARS
    pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None
    try:
        batch: list[str] = []
        ends: list[bool] = []
        size = 0
        for piece, last in pieces:
            batch.append(piece)
            ends.append(last)
            size += len(piece) + 64  # + a little per piece: tiny documents still fill a batch
            if size >= limit:
                yield flush(batch, ends, pool)
                batch, ends, size = [], [], 0
        if batch:
            yield flush(batch, ends, pool)
    finally:
        if pool is not None:
            pool.shutdown()


def source_sha256(documents: Iterable[str]) -> str:
    """sha256 of the text the token files decode to: each document followed by `<|endoftext|>`.

    For a one-file corpus this is not the file's own sha256 (the marker is appended); the
    tinyshakespeare download is checked against the file's hash separately.
    """
    return _fingerprint((document, True) for document in documents)[0]


def _fingerprint(pieces: Iterable[tuple[str, bool]]) -> tuple[str, int]:
    """(`source_sha256` of the documents the pieces make up, number of documents)."""
    digest = hashlib.sha256()
    documents = sum(last for _, last in _hashed(pieces, digest.update))
    return digest.hexdigest(), documents


def _hashed(
    pieces: Iterable[tuple[str, bool]], update: Callable[[bytes], object]
) -> Iterator[tuple[str, bool]]:
    """`pieces` passed through, each fed to a digest's `update` (`<|endoftext|>` after a document)."""
    eot = gpt2().decode([EOT_TOKEN]).encode("utf-8")
    for piece, last in pieces:
        update(piece.encode("utf-8"))
        if last:
            update(eot)
        yield piece, last


def prepare(
    corpus: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    num_threads: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    force: bool = False,
) -> Prepared:
    """Tokenize `corpus` into `out_dir/tokens_{train,val}_*.bin` + `meta.json`; a no-op when up to date.

    Up to date means `meta.json` is complete and records the same source hash
    (`source_sha256`) and settings (format version, tokenizer, dtype, `val_fraction`,
    `shard_tokens`) and every shard it lists has the recorded size; shards' contents are not
    read, so `force=True` rebuilds a dataset whose shards were changed in place. `num_threads`
    (default: the cores this process may use) encode in parallel. Memory use does not depend
    on the corpus size (about `4 * num_threads * corpora.PIECE_CHARS` characters of text and their
    tokens at a time). Processes preparing one `out_dir` take turns (`gpt_fn.files.lock_folder`):
    the second finds the first's dataset up to date.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 2:
        raise ValueError(f"shard_tokens must be an int >= 2, got {shard_tokens!r}")
    if shard_tokens > np.iinfo(np.int32).max:
        raise ValueError(f"shard_tokens must fit the int32 header, got {shard_tokens}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"data dir {str(out)!r} is a file, not a folder")
    source = corpora.open_corpus(corpus, cache_dir=out)
    encoding = gpt2()
    if encoding.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"{encoding.name} has {encoding.n_vocab} ids: too many for uint16")
    # One pass over the source before anything is written: its hash decides whether to
    # rebuild, and a file that is not UTF-8 or a bad JSON line fails here.
    sha256, n_documents = _fingerprint(corpora.document_pieces(source))
    settings: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "source_sha256": sha256,
        "tokenizer": encoding.name,
        "vocab_size": encoding.n_vocab,
        "eot_token": EOT_TOKEN,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    existing = read_meta(out)
    if not force and existing is not None and _is_up_to_date(out, existing, settings):
        return Prepared(existing, rebuilt=False)  # nothing to write: a read-only folder will do
    with lock_folder(out):  # a second process waits here, then finds the dataset up to date
        existing = read_meta(out)
        if not force and existing is not None and _is_up_to_date(out, existing, settings):
            return Prepared(existing, rebuilt=False)
        # An incomplete meta.json first: until the complete one replaces it, nothing reads the
        # folder (not even as a folder of someone else's shards).
        write_atomic(out / META_FILE, _meta_bytes({**settings, "complete": False}))
        _remove_dataset(out, old_format=existing is not None)

        start = time.perf_counter()
        documents = [0]
        seen = hashlib.sha256()
        pieces = _hashed(corpora.document_pieces(source), seen.update)
        stream = _write_shards(
            out, "train", _encoded(pieces, num_threads or _cores(), documents), shard_tokens
        )
        if seen.hexdigest() != sha256 or documents[0] != n_documents:
            _remove_dataset(out, old_format=False)
            raise RuntimeError(f"corpus {source.name!r} changed while it was being prepared")
        total = sum(stream.values())
        n_train = int(total * (1.0 - val_fraction))  # nanoGPT: the last tokens are val
        if min(n_train, total - n_train) < 2:
            _remove_dataset(out, old_format=False)
            (out / META_FILE).unlink(missing_ok=True)
            raise ValueError(
                f"corpus {source.name!r} has {total} tokens: too few to give train and val "
                f"at least 2 tokens each with val_fraction={val_fraction}"
            )
        train, val = _split_stream(out, list(stream), n_train, total, shard_tokens)
        seconds = time.perf_counter() - start
        meta = {
            **settings,
            "complete": True,
            "corpus": source.name,
            "documents": n_documents,
            "train_tokens": n_train,
            "val_tokens": total - n_train,
            "shards": {"train": train, "val": val},
            "tokenize_seconds": round(seconds, 3),
        }
        write_atomic(out / META_FILE, _meta_bytes(meta))
        return Prepared(meta, rebuilt=True)


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _split_stream(
    out: Path, names: list[str], n_train: int, total: int, shard_tokens: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Turn the stream's shards (all named train) into train shards + val shards; their counts.

    Every stream shard but the last is full, so token `n_train` is in shard
    `n_train // shard_tokens`: its tail and every later shard are copied into val shards, then
    it is cut to its head and the later ones deleted.
    """
    boundary, offset = divmod(n_train, shard_tokens)

    def val_tokens() -> Iterator[np.ndarray]:
        for index in range(boundary, len(names)):
            stop = shard_tokens if index < len(names) - 1 else total - index * shard_tokens
            yield from _read_tokens(out / names[index], offset if index == boundary else 0, stop)

    val = _write_shards(out, "val", val_tokens(), shard_tokens)
    for name in names[boundary + 1 :]:
        (out / name).unlink()
    if offset:
        path = out / names[boundary]

        def fill(temporary: Path) -> None:
            with open(temporary, "wb") as file:
                file.write(shard_header(offset))
                for run in _read_tokens(path, 0, offset):
                    file.write(memoryview(run))

        write_atomic(path, fill)  # the shard's head replaces it once written in full
    else:
        (out / names[boundary]).unlink()
    train = {name: shard_tokens for name in names[:boundary]}
    if offset:
        train[names[boundary]] = offset
    return train, val


def _remove_dataset(out: Path, *, old_format: bool) -> None:
    """Delete the shards a previous `prepare` wrote here (and format 1's token files)."""
    for path in out.glob(f"{SHARD_PREFIX}_*_*.bin"):
        path.unlink()
    for path in out.glob(f".{SHARD_PREFIX}_*.tmp"):  # left by an interrupted write_atomic
        path.unlink()
    if old_format:
        for name in ("train.bin", "val.bin"):
            (out / name).unlink(missing_ok=True)


def _meta_bytes(meta: dict[str, object]) -> bytes:
    return (json.dumps(meta, indent=2) + "\n").encode("utf-8")


def _is_up_to_date(data_dir: Path, meta: dict[str, object], settings: dict[str, object]) -> bool:
    if meta.get("complete") is not True or any(meta.get(k) != v for k, v in settings.items()):
        return False
    try:
        shards = listed_shards(meta)
    except ValueError:
        return False
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for names in shards.values():
        for name, count in names.items():
            path = data_dir / name
            if not path.is_file() or path.stat().st_size != SHARD_HEADER_BYTES + count * itemsize:
                return False
    return True
