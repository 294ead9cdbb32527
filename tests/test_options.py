"""`sampling.DecodeOptions`: one frozen object of decoding knobs, checked where it is built and
taken by every decoder (as `options=` or as the same keywords, never both)."""

import dataclasses
import inspect

import pytest
import torch

import gpt_fn
from gpt_fn import sampling
from gpt_fn.sampling import DecodeOptions, beam_search, generate, speculative_generate
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = gpt_fn.GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=32)
PARAMS = gpt_fn.init_params(CONFIG, seed=0)
DRAFT_CONFIG = gpt_fn.GPTConfig(vocab_size=101, block_size=32, n_layer=1, n_head=2, n_embd=16)
DRAFT = gpt_fn.init_params(DRAFT_CONFIG, seed=1)
ROWS = [[1, 2, 3], [7]]


class Letters:
    """A tokenizer whose ids 0..100 are letters (stop strings without GPT-2's vocabulary)."""

    n_vocab = 101

    def decode_single_token_bytes(self, token: int) -> bytes:
        return bytes([ord("a") + token % 26])


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("transform", 3, ValueError, "transform must be a function"),
        ("greedy", "yes", ValueError, "greedy must be a bool"),
        ("seed", -1, ValueError, "seed must be an int >= 0, got -1"),
        ("seed", 1.5, ValueError, "seed must be an int >= 0, got 1.5"),
        ("eos_token_id", -1, ValueError, "eos_token_id must be an int >= 0"),
        ("pad_token_id", True, ValueError, "pad_token_id must be an int >= 0, got True"),
        ("stop", "\n", ValueError, "stop must be a list of non-empty strings"),
        ("stop", ["ok", ""], ValueError, "stop must be a list of non-empty strings"),
        ("tokenizer", object(), TypeError, "tokenizer must be a tiktoken Encoding"),
        ("compile", 1, ValueError, "compile must be a bool"),
    ],
)
def test_a_bad_option_fails_when_built_with_one_line_naming_it(field, value, error, message):
    # The shape checker (on under pytest) would refuse a wrongly typed value first; users
    # without it get these errors.
    with shape_checks(False), pytest.raises(error, match=message) as raised:
        DecodeOptions(**{field: value})
    assert "\n" not in str(raised.value)


def test_options_are_frozen_and_keep_their_own_copy_of_the_stop_strings():
    stop = ["x"]
    options = DecodeOptions(greedy=True, stop=stop)
    stop.append("y")
    assert options.stop == ("x",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.greedy = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DecodeOptions(greedy=True, eos_token_id=101), r"eos_token_id 101 is outside \[0, vocab"),
        (DecodeOptions(greedy=True, pad_token_id=500), r"pad_token_id 500 is outside \[0, vocab"),
        (DecodeOptions(greedy=True, hooks={"h.7.mlp.out": abs}), "unknown activation site"),
        (DecodeOptions(), "seed must be an int >= 0 when sampling"),
    ],
)
def test_what_depends_on_the_model_is_checked_once_at_the_call(options, message):
    with pytest.raises(ValueError, match=message):
        generate(PARAMS, ROWS, CONFIG, max_new_tokens=2, options=options)


def test_options_and_the_same_keywords_give_the_same_tokens_in_every_decoder():
    knobs = dict(seed=3, eos_token_id=5, stop=["q"], tokenizer=Letters())
    options = DecodeOptions(**knobs)
    assert generate(PARAMS, ROWS, CONFIG, max_new_tokens=6, options=options) == generate(
        PARAMS, ROWS, CONFIG, max_new_tokens=6, **knobs
    )
    draft = dict(draft_params=DRAFT, draft_config=DRAFT_CONFIG, max_new_tokens=6)
    assert (
        speculative_generate(PARAMS, ROWS, CONFIG, options=options, **draft).tokens
        == speculative_generate(PARAMS, ROWS, CONFIG, **draft, **knobs).tokens
    )
    beams = beam_search(PARAMS, ROWS, CONFIG, 2, max_new_tokens=4, options=options)
    alike = beam_search(
        PARAMS, ROWS, CONFIG, 2, max_new_tokens=4, eos_token_id=5, stop=["q"], tokenizer=Letters()
    )
    assert beams.sequences == alike.sequences
    assert torch.equal(beams.scores, alike.scores)


def test_options_and_a_keyword_together_are_refused_naming_the_keyword():
    with pytest.raises(ValueError, match="seed= was given with options="):
        generate(PARAMS, ROWS, CONFIG, max_new_tokens=2, options=DecodeOptions(seed=1), seed=2)
    with shape_checks(False), pytest.raises(TypeError, match="options must be a DecodeOptions"):
        generate(PARAMS, ROWS, CONFIG, max_new_tokens=2, options={"greedy": True})


def test_a_decoder_refuses_the_options_it_cannot_honour():
    with pytest.raises(ValueError, match="beam_search runs eagerly"):
        beam_search(PARAMS, ROWS, CONFIG, 2, max_new_tokens=2, options=DecodeOptions(compile=True))
    with pytest.raises(ValueError, match="speculative_generate takes no hooks"):
        speculative_generate(
            PARAMS, ROWS, CONFIG, draft_params=DRAFT, draft_config=DRAFT_CONFIG, max_new_tokens=2,
            options=DecodeOptions(greedy=True, hooks={"ln_f": abs}),
        )  # fmt: skip


@pytest.mark.parametrize(
    "decoder",
    [sampling.generate, sampling.generate_stream, sampling.beam_search, speculative_generate],
)
def test_a_decoder_shows_every_parameter_in_its_signature(decoder):
    parameters = inspect.signature(decoder).parameters.values()
    assert not [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    assert "options" in inspect.signature(decoder).parameters
