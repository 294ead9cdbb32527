"""Beam search: sequences and scores equal HF `generate(num_beams=k, do_sample=False)` on the same
weights (fixed lengths, and with eos, length penalties and every early-stopping rule), scores
equal their definition, ragged batches equal prompts alone, and bad arguments are named."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gpt_fn
from gpt_fn import hf
from gpt_fn.nn.padding import pad
from gpt_fn.sampling import beam_search, generate, repetition_penalty
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.usefixtures("one_thread")

# Our log-probs and HF's come from the same weights through different kernels: a few fp32
# ulps of logits of order 1-10, summed over up to 12 steps.
SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # HF initialises from the global generator
    config = GPT2Config(
        vocab_size=101, n_positions=16, n_layer=2, n_head=3, n_embd=24,
        initializer_range=0.3,  # spread logits: beams far from ties
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def converted(model):
    config = hf.config_from_hf(model.config)
    return hf.from_hf_state_dict(model.state_dict(), config), config


def _prompt(batch=3, seq=4, seed=1):
    return torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf(model, prompt, mask=None, **options):
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt) if mask is None else mask.long(),
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **options,
        )


@pytest.mark.parametrize(
    ("num_beams", "returned", "length_penalty"),
    [(4, 1, 1.0), (4, 3, 1.0), (3, 2, 2.0), (2, 2, 0.0)],
)
def test_fixed_length_beams_and_scores_equal_hf_generate(
    model, converted, num_beams, returned, length_penalty
):
    params, config = converted
    prompt, new = _prompt(), 12
    ours = beam_search(
        params, prompt, config, num_beams, max_new_tokens=new, min_new_tokens=new,
        num_return_sequences=returned, length_penalty=length_penalty,
    )  # fmt: skip
    theirs = _hf(
        model, prompt, num_beams=num_beams, max_new_tokens=new, min_new_tokens=new,
        num_return_sequences=returned, length_penalty=length_penalty, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, atol=SCORE_ATOL, rtol=0)
    assert len(set(ours.sequences[:, 4:].flatten().tolist())) > 6  # a real search, not a repeat
    # Beam search finds what greedy misses: some prompt's best beam is not its greedy path.
    greedy = generate(params, prompt, config, max_new_tokens=new, greedy=True)
    assert not torch.equal(ours.sequences[::returned], greedy)


@pytest.mark.parametrize(
    ("early_stopping", "length_penalty"),
    [(False, 1.0), (True, 0.5), ("never", 2.0), (False, -1.0)],
)
def test_beams_that_end_with_eos_equal_hf_generate(
    model, converted, early_stopping, length_penalty
):
    params, config = converted
    prompt, new = _prompt(), 12
    free = beam_search(params, prompt, config, 4, max_new_tokens=new)
    eos = int(free.sequences[0, 4 + 3])  # on the best path: hypotheses end at different steps
    options = dict(max_new_tokens=new, length_penalty=length_penalty, early_stopping=early_stopping)
    # HF pads with `pad_token_id or eos_token_id`: 0 counts as unset there, so pad with eos.
    ours = beam_search(
        params, prompt, config, 4, num_return_sequences=2, eos_token_id=eos, **options
    )
    theirs = _hf(
        model, prompt, num_beams=4, num_return_sequences=2, eos_token_id=eos, pad_token_id=eos,
        **options,
    )  # fmt: skip
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, atol=SCORE_ATOL, rtol=0)
    assert (ours.sequences[:, 4:] == eos).any()  # hypotheses ended with eos, not only by length


def test_left_padded_prompts_equal_hf_generate_with_an_attention_mask(model, converted):
    params, config = converted
    tokens, mask = pad([[5, 6, 7, 8, 9], [11, 12], [40, 41, 42]], side="left")
    new = config.block_size - tokens.shape[1]
    ours = beam_search(
        params, tokens, config, 3, attention_mask=mask, max_new_tokens=new, min_new_tokens=new
    )
    theirs = _hf(
        model, tokens, mask, num_beams=3, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
    )
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, atol=SCORE_ATOL, rtol=0)


def test_each_prompt_of_a_ragged_batch_gets_the_beams_it_gets_alone(converted):
    params, config = converted
    rows = [[5, 6, 7, 8, 9], [11], [40, 41, 42]]
    batched = beam_search(params, rows, config, 3, max_new_tokens=6, num_return_sequences=2)
    for i, row in enumerate(rows):
        alone = beam_search(params, [row], config, 3, max_new_tokens=6, num_return_sequences=2)
        assert batched.sequences[2 * i : 2 * i + 2] == alone.sequences
        torch.testing.assert_close(
            batched.scores[2 * i : 2 * i + 2], alone.scores, atol=1e-5, rtol=0
        )


def test_a_score_is_the_summed_log_probability_over_length_to_the_penalty_also_past_block_size(
    converted,
):
    params, config = converted
    rows, new, penalty = [[3, 4, 5], [9]], config.block_size + 6, 0.7
    out = beam_search(
        params, rows, config, 3, max_new_tokens=new, length_penalty=penalty, num_return_sequences=3
    )
    for index, sequence in enumerate(out.sequences):
        start = len(rows[index // 3])
        total = 0.0
        for position in range(start, len(sequence)):
            window = torch.tensor([sequence[max(0, position - config.block_size) : position]])
            log_probs = gpt_fn.forward(params, window, config)[0, -1].log_softmax(-1)
            total += float(log_probs[sequence[position]])
        assert len(sequence) - start == new
        assert float(out.scores[index]) == pytest.approx(total / new**penalty, abs=1e-4)
    assert all(a >= b for a, b in zip(out.scores[:3], out.scores[1:3], strict=False))


def test_one_beam_is_greedy_and_a_transform_sees_the_log_probs(converted):
    params, config = converted
    prompt = _prompt()
    one = beam_search(params, prompt, config, 1, max_new_tokens=10)
    assert torch.equal(
        one.sequences, generate(params, prompt, config, max_new_tokens=10, greedy=True)
    )
    penalised = beam_search(
        params, prompt, config, 1, max_new_tokens=10, transform=repetition_penalty(50.0)
    )
    # Log-probs are negative, so the penalty multiplies them: seen tokens are avoided.
    for row in penalised.sequences[:, 4:].tolist():
        assert len(set(row)) == len(row)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_beams=0), "num_beams must be a positive int"),
        (dict(num_return_sequences=5), r"num_return_sequences \(5\) must be <= num_beams \(4\)"),
        (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        (dict(min_new_tokens=9), r"min_new_tokens \(9\) must be <= max_new_tokens \(8\)"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(eos_token_id=101), r"eos_token_id 101 is outside \[0, vocab_size=101\)"),
        (dict(prompt=[[1], []]), "row 1 has no tokens"),
        (dict(prompt=torch.zeros(1, 17, dtype=torch.long)), "longer than block_size=16"),
        (dict(attention_mask=torch.ones(3, 2)), r"attention_mask has shape \(3, 2\), the tokens"),
        (
            dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])),
            "attention_mask row 1 has no real token",
        ),
    ],
)
def test_bad_arguments_are_named(converted, change, message):
    params, config = converted
    arguments = dict(prompt=_prompt(), num_beams=4, max_new_tokens=8) | change
    # Our own checks, as a user without the test-time shape checker meets them.
    with shape_checks(False), pytest.raises(ValueError, match=message):
        beam_search(
            params, arguments.pop("prompt"), config, arguments.pop("num_beams"), **arguments
        )
