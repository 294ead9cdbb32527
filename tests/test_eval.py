"""gpt_fn.eval against materialised logits, Hugging Face's perplexity guide and lm-eval's rules.

The lm-evaluation-harness comparisons (multiple choice and the adapter against lm-eval's own
`hf` model) are in test_harness.py.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError
from transformers import GPT2Config, GPT2LMHeadModel

from gpt_fn import GPTConfig, forward, init_params
from gpt_fn import eval as evaluation
from gpt_fn.hf import config_to_hf_dict, to_hf_state_dict
from gpt_fn.hooks import add_vector
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32: the chunked LM head and log-sum-exp sum in another order than log_softmax over one
# big matmul; O(1) logits keep the difference near fp32 epsilon times the vocabulary's terms.
FP32 = {"rtol": 1e-5, "atol": 1e-5}
TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun. Café, naïve, Æthelred — ñ.\n\n"
) * 3


def spread_params(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights of std 1/sqrt(n_embd), gains near 1, biases non-zero: predictions depend on the
    context enough that a window with the wrong context, or a misplaced token, shows."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, value in init_params(config, seed=seed).items():
        noise = torch.randn(value.shape, generator=generator)
        if name.endswith(".bias"):
            params[name] = 0.05 * noise
        elif value.ndim == 1:
            params[name] = 1.0 + 0.1 * noise
        else:
            params[name] = noise / math.sqrt(config.n_embd)
    return params


@pytest.fixture(scope="module")
def model():
    config = GPTConfig(vocab_size=50257, block_size=24, n_layer=2, n_head=2, n_embd=16)
    return spread_params(config, seed=3), config


def reference_logprobs(params, tokens, config):
    logits = forward(params, tokens[:, :-1], config).float()
    return logits.log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]


# --- token_scores ---------------------------------------------------------------------------


def test_token_logprobs_equal_log_softmax_of_the_logits(tiny_config, generator):
    params = spread_params(tiny_config, seed=0)
    tokens = torch.randint(0, tiny_config.vocab_size, (3, 11), generator=generator)
    scores = evaluation.token_scores(params, tokens, tiny_config)
    assert scores.logprobs.shape == (3, 10) and bool(scores.scored.all())
    torch.testing.assert_close(
        scores.logprobs, reference_logprobs(params, tokens, tiny_config), **FP32
    )
    greedy = forward(params, tokens[:, :-1], tiny_config).argmax(-1) == tokens[:, 1:]
    assert torch.equal(scores.greedy, greedy)
    torch.testing.assert_close(
        evaluation.token_logprobs(params, tokens, tiny_config), scores.logprobs
    )


def test_a_row_may_hold_block_size_plus_one_tokens_and_no_more(tiny_config, generator):
    params = spread_params(tiny_config, seed=0)
    block = tiny_config.block_size
    tokens = torch.randint(0, tiny_config.vocab_size, (2, block + 1), generator=generator)
    scores = evaluation.token_logprobs(params, tokens, tiny_config)
    torch.testing.assert_close(scores, reference_logprobs(params, tokens, tiny_config), **FP32)
    longer = torch.randint(0, tiny_config.vocab_size, (1, block + 2), generator=generator)
    with pytest.raises(ValueError, match=f"longer than block_size \\+ 1 = {block + 1}"):
        evaluation.token_logprobs(params, longer, tiny_config)


def test_each_row_of_a_ragged_batch_scores_what_it_scores_alone(tiny_config):
    params = spread_params(tiny_config, seed=1)
    rows = [[5, 17, 3, 99, 42, 8], [7, 1], [60], [11, 12, 13, 14]]
    batch = evaluation.token_scores(params, rows, tiny_config)
    assert batch.logprobs.shape == (4, 5)
    for i, row in enumerate(rows):
        alone = evaluation.token_scores(params, [row], tiny_config)
        n = len(row) - 1
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0], **FP32)
        assert torch.equal(batch.greedy[i, :n], alone.greedy[0])
        # Padding is not scored: 0, so a row's sum is its total.
        assert batch.logprobs[i, n:].tolist() == [0.0] * (5 - n)
        assert batch.scored[i].tolist() == [True] * n + [False] * (5 - n)


def test_left_padding_with_a_mask_scores_only_real_pairs(tiny_config):
    params = spread_params(tiny_config, seed=1)
    tokens = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    scores = evaluation.token_scores(params, tokens, tiny_config, attention_mask=mask)
    assert scores.scored[0].tolist() == [False, False, True, True]
    alone = evaluation.token_logprobs(params, [[5, 6, 7]], tiny_config)
    torch.testing.assert_close(scores.logprobs[0, 2:], alone[0], **FP32)
    assert scores.logprobs[0, :2].tolist() == [0.0, 0.0]


def test_positions_limit_what_is_scored_and_change_nothing_else(tiny_config, generator):
    params = spread_params(tiny_config, seed=1)
    rows = [[5, 17, 3, 99, 42, 8], [7, 1, 2]]
    full = evaluation.token_scores(params, rows, tiny_config)
    positions = torch.tensor([[False, True, True, False, True], [True, False, True, True, True]])
    part = evaluation.token_scores(params, rows, tiny_config, positions=positions)
    # Row 1 has 2 real pairs: its positions 2..4 are padding and stay unscored.
    assert torch.equal(part.scored, full.scored & positions)
    torch.testing.assert_close(part.logprobs[part.scored], full.logprobs[part.scored], **FP32)
    assert bool((part.logprobs[~part.scored] == 0).all()) and not part.greedy[~part.scored].any()
    with pytest.raises(ValueError, match=r"positions must be a bool tensor of shape \(2, 5\)"):
        evaluation.token_scores(params, rows, tiny_config, positions=positions[:, :4])


def test_vocab_size_normalises_over_the_first_ids_only(tiny_config, generator):
    params = spread_params(tiny_config, seed=2)
    tokens = torch.randint(0, 50, (2, 9), generator=generator)
    cropped = evaluation.token_logprobs(params, tokens, tiny_config, vocab_size=50)
    logits = forward(params, tokens[:, :-1], tiny_config)[..., :50]
    expected = logits.log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(cropped, expected, **FP32)
    assert bool((cropped > evaluation.token_logprobs(params, tokens, tiny_config)).all())
    with pytest.raises(ValueError, match="vocab_size must be at most the model's vocab_size=101"):
        evaluation.token_logprobs(params, tokens, tiny_config, vocab_size=102)


def test_bad_tokens_are_named(tiny_config):
    params = spread_params(tiny_config, seed=0)
    with pytest.raises(TypeCheckError):  # a 1-D tensor is not (batch, seq)
        evaluation.token_logprobs(params, torch.tensor([1, 2, 3]), tiny_config)
    with pytest.raises(ValueError, match=r"token id 101 is outside \[0, vocab_size=101\)"):
        evaluation.token_logprobs(params, [[1, 101]], tiny_config)
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        evaluation.token_logprobs(params, [[1, 2], []], tiny_config)


# --- bytes ----------------------------------------------------------------------------------


def test_token_bytes_sum_to_the_texts_utf8_bytes():
    ids = gpt2().encode_ordinary(TEXT)
    assert evaluation.count_bytes(np.array(ids, dtype=np.uint16)) == len(TEXT.encode("utf-8"))
    lengths = evaluation.token_bytes(50304)
    assert lengths.shape == (50304,) and int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    # <|endoftext|> and the padded rows are no text.
    assert lengths[EOT_TOKEN] == 0 and int(lengths[50257:].sum()) == 0
    assert evaluation.count_bytes(torch.tensor([EOT_TOKEN, ids[0]])) == len(gpt2().decode(ids[:1]))


def test_bits_per_byte_of_a_mean_loss():
    targets = torch.tensor(gpt2().encode_ordinary("hello world, hello"))
    n_bytes = len(b"hello world, hello")
    expected = 2.5 * len(targets) / (math.log(2) * n_bytes)
    assert evaluation.bits_per_byte(2.5, targets) == pytest.approx(expected, rel=1e-12)
    assert evaluation.bits_per_byte(torch.tensor(2.5), targets.numpy()) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no bytes"):
        evaluation.bits_per_byte(1.0, torch.tensor([EOT_TOKEN]))
    with pytest.raises(ValueError, match="loss must be finite"):
        evaluation.bits_per_byte(math.nan, targets)


# --- perplexity -----------------------------------------------------------------------------


def hf_guide_perplexity(model, ids, *, max_length, stride):
    """Hugging Face's "Perplexity of fixed-length models" loop: its windows and labels, and
    GPT2LMHeadModel's mean loss of each window weighted by the labels that loss averaged.

    The guide counts `num_valid_tokens - batch_size` labels per window ("internal label
    shift"), which is right for the first window only: later windows keep their first label
    past the shift, so it undercounts each by one (with stride 1 it weighs every window after
    the first by 0; transformers#34138). Here the count is what the loss averaged.
    """
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        if num_loss_tokens > 0:  # a window that scores nothing has a NaN mean
            nll_sum += neg_log_likelihood.double().item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [1, 7, 12, 24])
def test_perplexity_equals_hugging_faces_guide_on_the_same_weights(model, stride):
    params, config = model
    hf_model = GPT2LMHeadModel(GPT2Config(**config_to_hf_dict(config))).eval()
    hf_model.load_state_dict(to_hf_state_dict(params, config))
    ids = gpt2().encode_ordinary(TEXT)
    assert len(ids) > 3 * config.block_size
    expected, n_tokens = hf_guide_perplexity(
        hf_model, ids, max_length=config.block_size, stride=stride
    )
    result = evaluation.perplexity(params, TEXT, config, stride=stride, batch_size=5)
    assert result.tokens == n_tokens
    # Both sum fp32 log-probs of the same windows; the models agree to ~1e-6 per token.
    assert result.nats_per_token == pytest.approx(expected, abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-4)


def test_bits_per_byte_is_the_scored_tokens_nats_over_their_bytes(model):
    params, config = model
    ids = gpt2().encode_ordinary(TEXT)
    result = evaluation.perplexity(params, ids, config, stride=8)
    # Every token but the first is scored (stride < block_size).
    assert result.tokens == len(ids) - 1
    assert result.bytes == len(TEXT.encode("utf-8")) - len(gpt2().decode(ids[:1]).encode())
    assert result.bits_per_byte == pytest.approx(result.nats / math.log(2) / result.bytes)
    # The helper for a training loop's mean loss gives the same number.
    assert evaluation.bits_per_byte(result.nats_per_token, np.array(ids[1:])) == pytest.approx(
        result.bits_per_byte, rel=1e-12
    )
    # A text, its token list, a tensor and a uint16 array are the same input.
    for same in (TEXT, torch.tensor(ids), np.array(ids, dtype=np.uint16)):
        again = evaluation.perplexity(params, same, config, stride=8, batch_size=3)
        assert again.nats == pytest.approx(result.nats, rel=1e-6)


def test_the_stride_sets_the_windows_and_so_the_score(model):
    params, config = model
    overlapping = evaluation.perplexity(params, TEXT, config, stride=1)
    disjoint = evaluation.perplexity(params, TEXT, config, stride=config.block_size)
    assert overlapping.windows > disjoint.windows
    assert overlapping.nats_per_token != pytest.approx(disjoint.nats_per_token, abs=1e-3)


def test_perplexity_rejects_what_it_cannot_score(model):
    params, config = model
    with pytest.raises(ValueError, match=r"has 1 token\(s\); perplexity needs at least 2"):
        evaluation.perplexity(params, "Hello", config)
    with pytest.raises(ValueError, match="stride must be at most block_size=24"):
        evaluation.perplexity(params, TEXT, config, stride=25)
    with pytest.raises(ValueError, match=r"token id 50257 is outside"):
        evaluation.perplexity(params, [1, 2, 50257], config)
    with shape_checks(False):  # our own check, as a user without the test-time hook meets it
        for floats in ([1.5, 2.0, 3.0], torch.tensor([1.0, 2.0]), [True, False]):
            with pytest.raises(ValueError, match="tokens must be integer ids, got"):
                evaluation.perplexity(params, floats, config)


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(0, 80), block_size=st.integers(1, 20), data=st.data()
)  # fmt: skip
def test_sliding_windows_score_every_token_once_with_at_least_block_minus_stride_context(
    n_tokens, block_size, data
):
    stride = data.draw(st.integers(1, block_size))
    windows = evaluation.sliding_windows(n_tokens, block_size=block_size, stride=stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= block_size and w.begin < w.first < w.end for w in windows)
    if stride < block_size:
        assert scored == list(range(1, n_tokens))
        for w in windows:  # context of target t: the tokens begin..t-1
            assert all(t - w.begin >= min(t, block_size - stride) for t in range(w.first, w.end))
    else:  # disjoint windows: nothing predicts a window's first token (as in HF's guide)
        assert set(scored) == set(range(1, n_tokens)) - set(range(0, n_tokens, block_size))


# --- continuations and multiple choice ------------------------------------------------------


def test_encode_pair_splits_as_lm_eval_does():
    enc = gpt2()
    context, continuation = evaluation.encode_pair("The cat sat on the ", "mat.")
    # The trailing space moves to the continuation: " mat" is one GPT-2 token.
    assert context == enc.encode("The cat sat on the")
    assert continuation == enc.encode(" mat.")
    assert evaluation.encode_pair("", "Hello") == ([EOT_TOKEN], enc.encode("Hello"))
    assert evaluation.encode_pair("", "<|endoftext|>Hi") == ([EOT_TOKEN], enc.encode("Hi"))


def test_score_continuations_sum_the_continuations_log_probs(model):
    params, config = model
    context, continuation = [11, 22, 33, 44, 55], [66, 77, 88]
    (score,) = evaluation.score_continuations(params, [(context, continuation)], config)
    logprobs = reference_logprobs(params, torch.tensor([context + continuation]), config)
    assert score.logprob == pytest.approx(float(logprobs[0, -3:].sum()), abs=1e-5)
    # A long context is cut on the left to the model's window, like HF's model in lm-eval.
    long_context = list(range(100, 140))
    (cut,) = evaluation.score_continuations(params, [(long_context, continuation)], config)
    window = (long_context + continuation)[-(config.block_size + 1) :]
    expected = reference_logprobs(params, torch.tensor([window]), config)[0, -3:].sum()
    assert cut.logprob == pytest.approx(float(expected), abs=1e-5)


def test_a_continuation_is_greedy_when_the_argmax_produces_it(model):
    params, config = model
    context = [5, 6, 7]
    greedy, tokens = [], list(context)
    for _ in range(3):
        token = int(forward(params, torch.tensor([tokens]), config)[0, -1].argmax())
        greedy.append(token)
        tokens.append(token)
    other = (greedy[-1] + 1) % config.vocab_size
    scores = evaluation.score_continuations(
        params, [(context, greedy), (context, [*greedy[:-1], other])], config, batch_size=1
    )
    assert [s.greedy for s in scores] == [True, False]


def test_score_continuations_keep_the_order_given_across_batches(model):
    params, config = model
    requests = [([1, 2, 3], [4]), ([9] * 10, [8, 7]), ([5], [6, 7, 8, 9]), ([3, 3], [2])]
    one_by_one = [evaluation.score_continuations(params, [r], config)[0] for r in requests]
    batched = evaluation.score_continuations(params, requests, config, batch_size=3)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.greedy == b.greedy
    with pytest.raises(ValueError, match="request 0: context and continuation need"):
        evaluation.score_continuations(params, [([], [1])], config)


def test_multiple_choice_accuracies_follow_lm_evals_definitions(model, monkeypatch):
    params, config = model
    # Sums chosen so that each normalisation picks another ending: raw sum -> ending 0,
    # per character -> ending 1 (long), per byte -> ending 2 ("ééé" has 3 characters, 6 bytes).
    sums = {" a": -2.0, " bbbbbbbbbb": -5.0, " ééé": -2.9}
    encoded = {}

    def fake_scores(params, requests, config, **kwargs):
        return [evaluation.ContinuationScore(sums[encoded[tuple(c)]], False) for _, c in requests]

    def fake_pair(context, continuation):
        ids = gpt2().encode_ordinary(continuation)
        encoded[tuple(ids)] = continuation
        return [1], ids

    monkeypatch.setattr(evaluation, "score_continuations", fake_scores)
    monkeypatch.setattr(evaluation, "encode_pair", fake_pair)
    items = [
        {"ctx": "x", "endings": ["a", "bbbbbbbbbb", "ééé"], "label": label} for label in (0, 1, 2)
    ]
    result = evaluation.multiple_choice(params, items, config)
    assert (result.acc, result.acc_norm, result.acc_bytes) == (1 / 3, 1 / 3, 1 / 3)
    result = evaluation.multiple_choice(params, items[:1], config)
    assert (result.acc, result.acc_norm, result.acc_bytes) == (1.0, 0.0, 0.0)
    assert result.logprobs == ((-2.0, -5.0, -2.9),)


def test_multiple_choice_scores_each_ending_after_its_context(model):
    params, config = model
    item = evaluation.Choice("The cat sat on the", ("mat.", "moon and sang"), 0)
    result = evaluation.multiple_choice(params, [item, item._replace(label=1)], config)
    expected = [
        evaluation.score_continuations(
            params, [evaluation.encode_pair(item.context, " " + e)], config
        )[0].logprob
        for e in item.endings
    ]
    assert result.logprobs[0] == pytest.approx(expected, abs=1e-5)
    assert result.acc == 0.5  # the same scores; one of the two labels is right


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_score_endings_equals_scoring_each_pair_alone(model, data):
    # Invariant: a context's cache continued by an ending gives the log-probs of the whole
    # row run at once. fp32: the cached run adds keys in two chunks and pads rows differently,
    # which moves sums by rounding only (FP32, as the other log-prob comparisons).
    params, config = model
    token = st.integers(0, config.vocab_size - 1)
    items = data.draw(
        st.lists(
            st.tuples(
                st.lists(token, min_size=1, max_size=20),  # with 8: past block + 1 = 25
                st.lists(st.lists(token, min_size=1, max_size=8), min_size=1, max_size=4),
            ),
            min_size=1,
            max_size=5,
        )
    )
    batch_size = data.draw(st.integers(1, 3))
    got = evaluation.score_endings(params, items, config, batch_size=batch_size)
    for (context, endings), sums in zip(items, got, strict=True):
        want = evaluation.score_continuations(params, [(context, e) for e in endings], config)
        assert sums == pytest.approx([w.logprob for w in want], rel=1e-5, abs=1e-5)


def test_score_endings_keeps_the_given_order_whatever_order_it_runs_in(model):
    # score_endings runs longest contexts first and each batch's endings longest first, one
    # item's count to a call, one-token endings in no call at all: the sums must still land
    # on their own item and ending. Tolerance as in the property test above.
    params, config = model
    items = [
        ([5, 6], [[1], [2, 3, 4, 5, 6, 7], [8, 9], [10]]),
        ([11, 12, 13, 14, 15, 16, 17, 18], [[19], [20]]),
        ([21, 22, 23, 24], [[25, 26, 27], [28], [29, 30, 31, 32, 33, 34, 35, 36], [37, 38]]),
        ([40], [[41, 42]]),
    ]
    got = evaluation.score_endings(params, items, config, batch_size=3)
    for (context, endings), sums in zip(items, got, strict=True):
        want = evaluation.score_continuations(params, [(context, e) for e in endings], config)
        assert sums == pytest.approx([w.logprob for w in want], rel=1e-5, abs=1e-5)


def test_multiple_choice_sharing_contexts_gives_the_same_scores(model):
    params, config = model
    items = [
        evaluation.Choice("The cat sat on the", ("mat.", "moon and sang", "rug", "x y z w"), 2),
        evaluation.Choice("A", ("b", "c d e f g h i j k l m n o p q r s t u v w x"), 0),  # > block
        evaluation.Choice("Then the dog said", ("woof", "nothing at all"), 1),
    ]
    counted = []
    plain = evaluation.multiple_choice(params, items, config)
    shared = evaluation.multiple_choice(
        params, items, config, share_context=True, progress=counted.append
    )
    assert sum(counted) == 8  # every ending counted once
    for a, b in zip(plain.logprobs, shared.logprobs, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    assert (shared.acc, shared.acc_norm, shared.acc_bytes) == (
        plain.acc,
        plain.acc_norm,
        plain.acc_bytes,
    )


def test_multiple_choice_sharing_contexts_refuses_hooks(model):
    params, config = model
    item = evaluation.Choice("The cat sat on the", ("mat.", "moon"), 0)
    with pytest.raises(ValueError, match="share_context=True runs contexts and endings"):
        evaluation.multiple_choice(
            params, [item], config, share_context=True, hooks={"embed": lambda x: x}
        )


# --- reading HellaSwag-style jsonl ----------------------------------------------------------


def test_read_choices_reads_hellaswags_layout(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(
        '{"ctx": "A man", "endings": ["runs.", "sits."], "label": 1, "ind": 4}\n'
        "\n"
        '{"ctx": "B", "endings": ["x", "y", "z"], "label": "2"}\n'
    )
    assert evaluation.read_choices(path) == [
        evaluation.Choice("A man", ("runs.", "sits."), 1),
        evaluation.Choice("B", ("x", "y", "z"), 2),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ('{"ctx": "a", "endings": ["b", "c"]}', r"line 2: missing 'label'"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', r"line 2: label 2 is out of range"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": -1}', r"line 2: label -1 is out of range"),
        ('{"ctx": "a", "endings": ["b"], "label": 0}', r"line 2: 'endings' must be a list"),
        ('{"ctx": "a", "endings": ["b", ""], "label": 0}', r"line 2: 'endings' must be a list"),
        ('{"ctx": 3, "endings": ["b", "c"], "label": 0}', r"line 2: 'ctx' must be a string"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0.5}', r"line 2: 'label' must be an int"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
    ],
)
def test_read_choices_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        evaluation.read_choices(path)


def test_read_choices_without_a_file_or_items(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluation.read_choices(tmp_path / "missing.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no items"):
        evaluation.read_choices(tmp_path / "blank.jsonl")


# --- under interventions (hooks=) -----------------------------------------------------------

ROWS = [[5, 17, 3, 99, 42, 8], [7, 1], [11, 12, 13, 14, 300, 4000, 49999]]
ITEMS = [
    evaluation.Choice("The cat sat on the", ("mat.", "moon and sang", "dog"), 0),
    evaluation.Choice("She opened the door and ", ("walked in.", "x"), 1),
]


def identity(activation):
    return activation


def hf_model_adding(params, config, *, layer, vector):
    """GPT2LMHeadModel on `params` with a forward hook adding `vector` to block `layer`'s output."""
    hf_model = GPT2LMHeadModel(GPT2Config(**config_to_hf_dict(config))).eval()
    hf_model.load_state_dict(to_hf_state_dict(params, config))

    def add(module, inputs, output):
        if isinstance(output, tuple):  # transformers 4.x: (hidden_states, present, ...)
            return (output[0] + vector, *output[1:])
        return output + vector

    hf_model.transformer.h[layer].register_forward_hook(add)
    return hf_model


@pytest.mark.parametrize("site", ["embed", "h.0.attn.z", "h.1.resid_post", "ln_f"])
def test_identity_hooks_give_bit_identical_scores(model, site):
    params, config = model
    hooks = {site: identity}
    plain = evaluation.token_scores(params, ROWS, config)
    hooked = evaluation.token_scores(params, ROWS, config, hooks=hooks)
    assert torch.equal(hooked.logprobs, plain.logprobs) and torch.equal(hooked.greedy, plain.greedy)
    assert (
        evaluation.perplexity(params, TEXT, config, hooks=hooks).nats
        == evaluation.perplexity(params, TEXT, config).nats
    )
    assert (
        evaluation.multiple_choice(params, ITEMS, config, hooks=hooks).logprobs
        == evaluation.multiple_choice(params, ITEMS, config).logprobs
    )


def test_an_identity_logits_hook_scores_as_the_fused_head(model):
    params, config = model
    plain = evaluation.token_scores(params, ROWS, config, vocab_size=50000)
    hooked = evaluation.token_scores(
        params, ROWS, config, vocab_size=50000, hooks={"logits": identity}
    )
    # Materialised logits are another matmul shape than the fused head's chunks, which some
    # BLAS kernels round differently; bit-equal on the CPU this was written on.
    torch.testing.assert_close(hooked.logprobs, plain.logprobs, rtol=0, atol=1e-6)
    assert torch.equal(hooked.greedy, plain.greedy)
    with pytest.raises(ValueError, match=r"target 50256 is outside \[0, vocab_size=50000\)"):
        evaluation.token_scores(
            params, [[1, 50256]], config, vocab_size=50000, hooks={"logits": identity}
        )


def test_a_steering_vector_scores_as_hf_gpt2_with_a_forward_hook_adding_it(model):
    params, config = model
    vector = 2.0 * torch.randn(config.n_embd, generator=torch.Generator().manual_seed(5))
    hooks = add_vector("h.1.resid_post", vector)
    hf_model = hf_model_adding(params, config, layer=1, vector=vector)
    steered = evaluation.token_scores(params, ROWS, config, hooks=hooks)
    plain = evaluation.token_scores(params, ROWS, config)
    for i, row in enumerate(ROWS):
        with torch.no_grad():
            logits = hf_model(torch.tensor([row[:-1]])).logits[0]
        expected = logits.log_softmax(-1).gather(1, torch.tensor(row[1:])[:, None])[:, 0]
        n = len(row) - 1
        # fp32 on both sides: the models agree to ~1e-6 per token (measured: 9.5e-7).
        torch.testing.assert_close(steered.logprobs[i, :n], expected, rtol=0, atol=1e-5)
    assert (steered.logprobs - plain.logprobs).abs().max() > 0.1  # the vector matters
    # Every window of the sliding-window evaluation is steered the same way.
    ids = gpt2().encode_ordinary(TEXT)
    expected, n_tokens = hf_guide_perplexity(hf_model, ids, max_length=config.block_size, stride=7)
    result = evaluation.perplexity(params, ids, config, stride=7, batch_size=5, hooks=hooks)
    assert result.tokens == n_tokens
    assert result.nats_per_token == pytest.approx(expected, abs=1e-5)


def test_a_logits_hook_applies_though_the_head_is_fused(model):
    params, config = model
    favourite = 4000

    def boost(logits):
        return logits + 30.0 * (torch.arange(logits.shape[-1]) == favourite)

    hooks = {"logits": boost}
    tokens = torch.tensor(ROWS[0] + [favourite, 9])[None]
    scores = evaluation.token_scores(params, tokens, config, vocab_size=50000, hooks=hooks)
    logits = forward(params, tokens[:, :-1], config, hooks=hooks)[..., :50000]
    expected = logits.log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(scores.logprobs, expected, **FP32)
    assert torch.equal(scores.greedy, logits.argmax(-1) == tokens[:, 1:])
    assert scores.greedy[0, -2] and scores.logprobs[0, -2] > -1e-3  # the boosted token wins
    (score,) = evaluation.score_continuations(
        params, [([1, 2, 3], [favourite])], config, hooks=hooks
    )
    assert score.greedy


def test_hooks_run_at_every_forward_of_an_evaluation(model):
    params, config = model
    seen = []

    def count(activation):
        seen.append(activation.shape[0])
        return activation

    hooks = {"h.0.resid_mid": count}
    result = evaluation.perplexity(params, TEXT, config, stride=7, batch_size=5, hooks=hooks)
    assert sum(seen) == result.windows and len(seen) == math.ceil(result.windows / 5)
    seen.clear()
    evaluation.multiple_choice(params, ITEMS, config, batch_size=2, hooks=hooks)
    assert sum(seen) == 5 and len(seen) == 3  # 5 endings, 2 a batch


def test_bad_hooks_are_named(model):
    params, config = model
    with pytest.raises(ValueError, match=r"unknown activation site 'h\.2\.resid_post'"):
        evaluation.perplexity(params, TEXT, config, hooks={"h.2.resid_post": identity})
    with pytest.raises(ValueError, match=r"unknown activation site 'h\.0\.attn\.zz'"):
        evaluation.multiple_choice(params, ITEMS, config, hooks={"h.0.attn.zz": identity})
    with pytest.raises(ValueError, match=r"the hook at 'logits' returned shape \(3, 6\)"):
        evaluation.token_scores(params, ROWS, config, hooks={"logits": lambda x: x[..., 0]})
