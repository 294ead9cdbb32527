"""Corpora -> GPT-2 token shards -> batches: the data layer of a training run.

Four modules, each a step, each a few plain functions:

- `corpora`: a corpus (`"shakespeare"`, offline; `"tinyshakespeare"`, downloaded and verified;
  a text file, a `.jsonl` file or a folder of them) read as a stream of documents.
- `shards`: llm.c's token shard format, a dataset folder's `meta.json`, `load_split` (one
  memmap or a `TokenStream` over a split's shards) and `read_token_file`.
- `preparation`: `prepare(corpus, out_dir)`, a corpus tokenized into train/val shards.
- `batches`: `get_batch` and `eval_batch`, pure functions of `(seed, step, rank)`.

Every public name is importable from `gpt_fn.data`. A module's constants are read where they
are defined (`gpt_fn.data.corpora.TINYSHAKESPEARE_URL`): set them there.
"""

from gpt_fn.data.batches import eval_batch, get_batch
from gpt_fn.data.corpora import (
    BUILTIN_CORPORA,
    DOWNLOAD_TIMEOUT_S,
    PIECE_CHARS,
    TINYSHAKESPEARE_BYTES,
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL,
    Corpus,
    CorpusSource,
    document_pieces,
    fetch_tinyshakespeare,
    load_corpus,
    open_corpus,
    play_text,
    shakespeare_documents,
)
from gpt_fn.data.preparation import SHARD_PREFIX, SHARD_TOKENS, Prepared, prepare, source_sha256
from gpt_fn.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    SHARD_HEADER_BYTES,
    SHARD_HEADER_INTS,
    SHARD_MAGIC,
    SHARD_VERSION,
    TOKEN_DTYPE,
    Split,
    Tokens,
    TokenStream,
    is_shard_folder,
    listed_shards,
    load_meta,
    load_split,
    read_meta,
    read_shard,
    read_token_file,
    shard_header,
)

__all__ = [
    "BUILTIN_CORPORA",
    "DOWNLOAD_TIMEOUT_S",
    "FORMAT_VERSION",
    "META_FILE",
    "PIECE_CHARS",
    "SHARD_HEADER_BYTES",
    "SHARD_HEADER_INTS",
    "SHARD_MAGIC",
    "SHARD_PREFIX",
    "SHARD_TOKENS",
    "SHARD_VERSION",
    "TINYSHAKESPEARE_BYTES",
    "TINYSHAKESPEARE_SHA256",
    "TINYSHAKESPEARE_URL",
    "TOKEN_DTYPE",
    "Corpus",
    "CorpusSource",
    "Prepared",
    "Split",
    "TokenStream",
    "Tokens",
    "document_pieces",
    "eval_batch",
    "fetch_tinyshakespeare",
    "get_batch",
    "is_shard_folder",
    "listed_shards",
    "load_corpus",
    "load_meta",
    "load_split",
    "open_corpus",
    "play_text",
    "prepare",
    "read_meta",
    "read_shard",
    "read_token_file",
    "shakespeare_documents",
    "shard_header",
    "source_sha256",
]
