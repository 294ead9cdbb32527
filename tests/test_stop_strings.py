"""Stop strings and the padding-id policy of decoding: stops that arrive in short tokens or in
byte fragments of a character, every decoder (generate, its stream, speculative decoding,
beam search), ids past the tokenizer, and agreement with HF's `StopStringCriteria`."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.stopping_criteria import StopStringCriteria

import gpt_fn
from gpt_fn import hf
from gpt_fn.sampling import (
    PAD,
    ban_padding_ids,
    beam_search,
    generate,
    generate_stream,
    speculative_generate,
)
from gpt_fn.tokenizer import GPT2_VOCAB_SIZE, gpt2, write_tokenizer_files

pytestmark = pytest.mark.usefixtures("one_thread")

# GPT-2's vocabulary padded to a multiple of 64, as `cpu-tiny` and nanoGPT's runs pad it.
CONFIG = gpt_fn.GPTConfig(vocab_size=50304, block_size=64, n_layer=1, n_head=2, n_embd=16)
PARAMS = gpt_fn.init_params(CONFIG, seed=0)
PROMPT = [[464, 3290]]


def forcing(tokens: list[int], prompt_length: int):
    """A transform that makes the model say `tokens`, one per step (then the last one again)."""

    def apply(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        steps = ((context != PAD).sum(dim=1) - prompt_length).clamp(max=len(tokens) - 1)
        forced = torch.full_like(logits, -torch.inf)
        forced[torch.arange(len(steps)), torch.tensor(tokens)[steps]] = 0.0
        return forced

    return apply


def token_bytes(tokens: list[int]) -> bytes:
    """The text of `tokens`: padding ids past the tokenizer have none."""
    return b"".join(gpt2().decode_single_token_bytes(t) for t in tokens if t < GPT2_VOCAB_SIZE)


def first_stop(tokens: list[int], stops: list[str]) -> int:
    """How many of `tokens` a decoder keeps: up to the first whose bytes complete a stop."""
    for end in range(1, len(tokens) + 1):
        if any(s.encode() in token_bytes(tokens[:end]) for s in stops):
            return end
    return len(tokens)


def forced_generation(decoder: str, tokens: list[int], stop: list[str]) -> list[int]:
    """The new tokens `decoder` returns when the model is made to say `tokens`."""
    options = dict(
        max_new_tokens=len(tokens), greedy=True, stop=stop,
        transform=forcing(tokens, len(PROMPT[0])),
    )  # fmt: skip
    if decoder == "generate":
        row = generate(PARAMS, PROMPT, CONFIG, **options)[0]
    elif decoder == "generate_stream":
        row = PROMPT[0] + [int(t) for t in generate_stream(PARAMS, PROMPT, CONFIG, **options)]
    else:
        draft = dict(draft_params=PARAMS, draft_config=CONFIG)
        row = speculative_generate(PARAMS, PROMPT, CONFIG, **draft, **options).tokens[0]
    return row[len(PROMPT[0]) :]


@pytest.mark.parametrize("decoder", ["generate", "generate_stream", "speculative_generate"])
@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("</s> more text", "</s>"),  # '</', 's', '>': the text is shorter than the stop
        ("<|im_end|> more text", "<|im_end|>"),  # seven short tokens
        ("작업 완료. 다음", "완료"),  # the two characters come as six byte fragments
    ],
)
def test_a_stop_string_made_of_short_tokens_or_byte_fragments_stops_the_row(decoder, text, stop):
    tokens = gpt2().encode_ordinary(text)
    end = first_stop(tokens, [stop])
    assert end < len(tokens)
    generated = forced_generation(decoder, tokens, [stop])
    assert generated == tokens[:end]
    assert token_bytes(generated).decode().endswith(stop)


# ------------------------------------------------------------------ ids past the tokenizer


def test_ban_padding_ids_bans_exactly_the_ids_past_the_tokenizer():
    logits = torch.randn(2, CONFIG.vocab_size)
    banned = ban_padding_ids(CONFIG.vocab_size, gpt2())(logits, torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(banned[:, :GPT2_VOCAB_SIZE], logits[:, :GPT2_VOCAB_SIZE])
    assert (banned[:, GPT2_VOCAB_SIZE:] == -torch.inf).all()
    assert ban_padding_ids(GPT2_VOCAB_SIZE, gpt2()) is None  # nothing past it
    with pytest.raises(TypeError, match="tokenizer must be a tiktoken Encoding"):
        ban_padding_ids(CONFIG.vocab_size, "gpt2")


# A model whose padding ids carry all the logit: the real ids' embeddings are zero.
PADDING_HEAVY = {
    **PARAMS,
    "wte.weight": PARAMS["wte.weight"]
    * (torch.arange(CONFIG.vocab_size) >= GPT2_VOCAB_SIZE)[:, None]
    * 50,
}


@pytest.mark.parametrize("text", [dict(stop=["\n\n"]), dict(tokenizer=gpt2())])
def test_with_a_tokenizer_in_use_ids_past_it_are_never_generated(text):
    free = generate(PADDING_HEAVY, PROMPT, CONFIG, max_new_tokens=8, seed=5)
    assert max(free[0][len(PROMPT[0]) :]) >= GPT2_VOCAB_SIZE  # the model's favourites
    for options in (dict(seed=5), dict(greedy=True)):
        row = generate(PADDING_HEAVY, PROMPT, CONFIG, max_new_tokens=8, **options, **text)[0]
        assert max(row) < GPT2_VOCAB_SIZE
    draft = dict(draft_params=PADDING_HEAVY, draft_config=CONFIG)
    out = speculative_generate(
        PADDING_HEAVY, PROMPT, CONFIG, max_new_tokens=8, seed=5, **draft, **text
    )
    assert max(out.tokens[0]) < GPT2_VOCAB_SIZE
    beams = beam_search(PADDING_HEAVY, PROMPT, CONFIG, 2, max_new_tokens=4, **text)
    assert max(beams.sequences[0]) < GPT2_VOCAB_SIZE


def test_a_transform_that_picks_an_id_with_no_text_is_named_not_a_key_error():
    padding_id = GPT2_VOCAB_SIZE + 5
    with pytest.raises(ValueError, match=f"token id {padding_id} has no text in the tokenizer"):
        generate(
            PARAMS, PROMPT, CONFIG, max_new_tokens=3, greedy=True, stop=["\n\n"],
            transform=forcing([padding_id], len(PROMPT[0])),
        )  # fmt: skip


# ------------------------------------------------------------------ against HF


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """HF's GPT-2 tokenizer from the same release files as `gpt2()`, built offline."""
    from transformers import GPT2Tokenizer

    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    write_tokenizer_files(folder)
    return GPT2Tokenizer.from_pretrained(folder)


# Our log-probs and HF's come from the same weights through different kernels: a few fp32
# ulps of logits of order 1-10, summed over up to 10 steps (as in test_beam).
SCORE_ATOL = 1e-5


def test_beams_end_at_a_stop_string_as_in_hf_generate_with_stop_strings(hf_tokenizer):
    torch.manual_seed(0)  # HF initialises from the global generator
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=101, n_positions=32, n_layer=2, n_head=3, n_embd=24,
                   initializer_range=0.3)  # spread logits: beams far from ties
    ).eval()  # fmt: skip
    config = hf.config_from_hf(model.config)
    params = hf.from_hf_state_dict(model.state_dict(), config)
    # Ids below 94 are GPT-2's printable ASCII characters, one byte each.
    prompt = torch.randint(0, 94, (2, 4), generator=torch.Generator().manual_seed(1))
    new = 10
    free = beam_search(params, prompt, config, 4, max_new_tokens=new)
    text = token_bytes(free.sequences[0, 4:].tolist()).decode("latin-1")
    stop = [text[3:5], text[6:7] + "!"]  # the first spans a token boundary of the best beam
    ours = beam_search(
        params, prompt, config, 4, max_new_tokens=new, num_return_sequences=3, stop=stop
    )
    with torch.no_grad():
        theirs = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=4,
            num_return_sequences=3, max_new_tokens=new, pad_token_id=0, stop_strings=stop,
            tokenizer=hf_tokenizer, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    # HF pads with `pad_token_id or eos_token_id` (0 counts as unset): its config's 50256.
    assert torch.equal(ours.sequences, theirs.sequences.masked_fill(theirs.sequences == 50256, 0))
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, atol=SCORE_ATOL, rtol=0)
    # The best beam is the free search's, cut after the token that completes the stop string.
    assert torch.equal(ours.sequences[0, 4 : 4 + 5], free.sequences[0, 4 : 4 + 5])
    assert (ours.sequences[0, 4 + 5 :] == 0).all()


# Tokens a stop string is hard to find in: one-byte tokens and the byte fragments that GPT-2
# splits Korean, Japanese and emoji into, beside any id of the vocabulary.
SHORT_TOKENS = sorted(
    set(gpt2().encode_ordinary("</s> <|im_end|> 작업 완료. 日本語のテキスト 🎉👍 a\n\nb"))
)


@st.composite
def tokens_and_stops(draw):
    """Token ids (maybe one padding id past the tokenizer among them) and one or two stop
    strings cut out of their text (maybe not in it: a cut through a character drops bytes)."""
    token = st.one_of(st.integers(0, GPT2_VOCAB_SIZE - 1), st.sampled_from(SHORT_TOKENS))
    tokens = draw(st.lists(token, min_size=1, max_size=10))
    if draw(st.booleans()):
        padding = draw(st.integers(GPT2_VOCAB_SIZE, CONFIG.vocab_size - 1))
        tokens[draw(st.integers(0, len(tokens) - 1))] = padding
    text = token_bytes(tokens)
    stops = []
    for _ in range(draw(st.integers(1, 2))):
        start = draw(st.integers(0, max(len(text) - 1, 0)))
        end = draw(st.integers(start + 1, max(min(len(text), start + 12), start + 1)))
        stops.append(text[start:end].decode("utf-8", "ignore") or "\n\n")
    return tokens, stops


@settings(max_examples=10, deadline=None)  # HF builds its tables per stop list (0.5-1 s)
@given(case=tokens_and_stops())
@example(case=(gpt2().encode_ordinary("</s> more"), ["</s>"]))
@example(case=(gpt2().encode_ordinary("작업 완료. 다음"), ["완료", "<|im_end|>"]))
@example(case=([198, GPT2_VOCAB_SIZE + 5, 198, 198], ["\n\n"]))
def test_generate_stops_at_the_first_token_where_hf_stop_string_criteria_says_stop(
    case, hf_tokenizer
):
    """A forced padding id is the transform's choice against the ban: one clear error."""
    tokens, stops = case
    padding = next((i for i, t in enumerate(tokens) if t >= GPT2_VOCAB_SIZE), len(tokens))
    # HF's criteria see the generated ids only: gpt_fn matches stop strings in new text alone.
    criteria = StopStringCriteria(hf_tokenizer, stops)
    says_stop = [
        bool(criteria(torch.tensor([tokens[:end]]), None)) for end in range(1, padding + 1)
    ]
    if True in says_stop or padding == len(tokens):
        expected = says_stop.index(True) + 1 if True in says_stop else len(tokens)
        assert forced_generation("generate", tokens, stops) == tokens[:expected]
    else:
        with pytest.raises(ValueError, match=f"token id {tokens[padding]} has no text"):
            forced_generation("generate", tokens, stops)
