"""gpt_fn.inspect: the head-score masks, attention_mass (against TransformerLens's head
detector), inspect_prompt's numbers against the analysis readouts it reports, and the report
folder."""

import json

import pytest
import torch
from jaxtyping import TypeCheckError
from transformer_lens import head_detector

from gpt_fn import GPTConfig, direct_logit_attribution, forward, init_params, logit_lens
from gpt_fn import inspect as inspection
from gpt_fn.model import run_with_cache
from gpt_fn.shapes import shape_checks
from gpt_fn.tokenizer import gpt2, single_token

PROMPT = "When Mary and John went to the store, John gave a drink to"
# Token ids: A B C A B D, with A B repeated (induction) and no token twice in a row.
REPEATS = torch.tensor([[5, 7, 9, 5, 7, 2]])
CHECKED = (ValueError, TypeCheckError)
CONFIG = GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model():
    return init_params(CONFIG, seed=0), CONFIG


@pytest.fixture(scope="module")
def ioi(model):
    params, config = model
    tokens = torch.tensor(gpt2().encode_ordinary(PROMPT))
    found = inspection.inspect_prompt(
        params, tokens, config, answer=single_token(" Mary"), wrong=single_token(" John")
    )
    return tokens, found


# --- key masks and attention_mass -----------------------------------------------------------


def keys_of(mask: torch.Tensor) -> list[list[int]]:
    """Per query position of the first row, the key positions the mask marks."""
    return [row.nonzero().flatten().tolist() for row in mask[0]]


def test_previous_token_keys_mark_the_position_before():
    assert keys_of(inspection.previous_token_keys(REPEATS)) == [[], [0], [1], [2], [3], [4]]


def test_duplicate_token_keys_mark_earlier_copies_of_the_query_token():
    assert keys_of(inspection.duplicate_token_keys(REPEATS)) == [[], [], [], [0], [1], []]


def test_induction_keys_mark_the_token_after_an_earlier_copy():
    assert keys_of(inspection.induction_keys(REPEATS)) == [[], [], [], [1], [2], []]
    # "A A": the token after the earlier A is the query itself, which is not a key.
    assert keys_of(inspection.induction_keys(torch.tensor([[4, 4, 4]]))) == [[], [], [1]]


def test_attention_mass_is_the_mass_on_the_keys_averaged_over_queries_with_keys():
    seq = REPEATS.shape[1]
    pattern = torch.rand(1, 2, seq, seq).tril().softmax(-1)
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
    keys = inspection.duplicate_token_keys(REPEATS)
    scores = inspection.attention_mass({"h.0.attn.pattern": pattern}, keys, config)
    expected = (pattern[0, :, 3, 0] + pattern[0, :, 4, 1]) / 2  # queries 3 and 4 have a key
    torch.testing.assert_close(scores[0], expected, rtol=0, atol=1e-7)


def test_a_perfect_previous_token_head_scores_one():
    seq = REPEATS.shape[1]
    shifted = torch.eye(seq).roll(-1, 1).tril()
    shifted[0, 0] = 1.0  # the first query has only itself to attend to
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    keys = inspection.previous_token_keys(REPEATS)
    scores = inspection.attention_mass({"h.0.attn.pattern": shifted[None, None]}, keys, config)
    assert scores.tolist() == [[1.0]]


@pytest.mark.parametrize(
    ("kind", "detector"),
    [
        ("previous_token", head_detector.get_previous_token_head_detection_pattern),
        ("duplicate_token", head_detector.get_duplicate_token_head_detection_pattern),
        ("induction", head_detector.get_induction_head_detection_pattern),
    ],
)
def test_head_scores_equal_transformer_lens_head_detector_rescaled(model, kind, detector):
    """TransformerLens's "mul" score averages the mass over every query, ours over the queries
    that have a key: ours x (queries with a key) / seq is TL's. (TL's induction mask also
    marks the query itself after a repeated token; REPEATS has none.) Both are sums of a few
    fp32 probabilities: 1e-6."""
    params, config = model
    _, cache = run_with_cache(params, REPEATS, config, names=lambda s: s.endswith("pattern"))
    keys = inspection.KEY_MASKS[kind](REPEATS)
    ours = inspection.attention_mass(cache, keys, config)
    seq = REPEATS.shape[1]
    detection = detector(REPEATS[0])
    assert torch.equal(detection.bool(), keys[0])
    theirs = torch.tensor(
        [
            [
                head_detector.compute_head_attention_similarity_score(
                    cache[f"h.{layer}.attn.pattern"][0, head],
                    detection,
                    exclude_bos=False,
                    exclude_current_token=False,
                    error_measure="mul",
                )
                for head in range(config.n_head)
            ]
            for layer in range(config.n_layer)
        ]
    )
    with_keys = int(keys[0].any(-1).sum())
    torch.testing.assert_close(ours * with_keys / seq, theirs, rtol=0, atol=1e-6)


def test_attention_mass_refuses_a_mask_without_keys_and_a_cache_without_patterns(model):
    params, config = model
    distinct = torch.tensor([[1, 2, 3]])
    _, cache = run_with_cache(params, distinct, config, names=lambda s: s.endswith("pattern"))
    with pytest.raises(ValueError, match="no query position has a key"):
        inspection.attention_mass(cache, inspection.duplicate_token_keys(distinct), config)
    with pytest.raises(ValueError, match="lacks"):
        inspection.attention_mass({}, inspection.previous_token_keys(distinct), config)
    with pytest.raises(ValueError, match="keys has shape"):
        inspection.attention_mass(cache, inspection.previous_token_keys(REPEATS), config)


# --- inspect_prompt -------------------------------------------------------------------------


def test_inspection_numbers_are_the_analysis_readouts(model, ioi):
    params, config = model
    tokens, found = ioi
    _, cache = run_with_cache(params, tokens[None], config)  # every site: an independent run
    mary, john = torch.tensor([single_token(" Mary")]), torch.tensor([single_token(" John")])
    # The same functions on the same cache, recorded differently: equal to fp32 rounding of
    # a matmul that may sum in another order (1e-6 on values of order 0.01-1).
    for by, values in (("head", found.dla_by_head), ("component", found.dla_by_component)):
        expected, labels = direct_logit_attribution(
            params, cache, mary, config, by=by, incorrect=john
        )
        torch.testing.assert_close(values, expected[:, 0], rtol=0, atol=1e-6)
    assert found.dla_head_labels[:3] == ["L0H0", "L0H1", "L1H0"]
    lens, labels = logit_lens(params, cache, config, ln="recompute")
    torch.testing.assert_close(found.lens, lens[:, 0], rtol=0, atol=1e-5)
    assert found.lens_labels == labels and found.lens_positions == list(range(len(tokens)))
    for kind in inspection.HEAD_KINDS:
        keys = inspection.KEY_MASKS[kind](tokens[None])
        torch.testing.assert_close(
            found.head_scores[kind], inspection.attention_mass(cache, keys, config)
        )


def test_dla_rows_sum_to_the_logit_difference_of_the_forward(model, ioi):
    params, config = model
    tokens, found = ioi
    logits = forward(params, tokens[None], config)[0, -1]
    difference = logits[single_token(" Mary")] - logits[single_token(" John")]
    # A sum of ~8 fp32 terms of order 0.01-0.1 against one logit difference: 1e-5.
    assert found.dla_by_head.sum().item() == pytest.approx(difference.item(), abs=1e-5)
    assert found.logit_difference == pytest.approx(difference.item(), abs=1e-5)
    assert found.dla_heads(config).shape == (config.n_layer, config.n_head)


def test_without_an_answer_the_prediction_is_attributed(model):
    params, config = model
    tokens = torch.tensor(gpt2().encode_ordinary("one two three"))
    found = inspection.inspect_prompt(params, tokens, config, ln="frozen")
    logits = forward(params, tokens[None], config)[0, -1]
    assert found.answer == int(logits.argmax()) and not found.answer_given
    assert found.wrong is None
    assert found.logit_difference == pytest.approx(logits.max().item(), abs=1e-5)
    # No token repeats: no duplicate-token or induction key, so no score.
    assert found.head_scores["duplicate_token"] is None and found.head_scores["induction"] is None
    assert found.head_scores["previous_token"] is not None
    # With ln="frozen", the lens's last row is the model's own logits.
    torch.testing.assert_close(found.lens[-1, -1], logits, rtol=0, atol=1e-5)


def test_when_the_prediction_is_the_wrong_token_the_runner_up_is_attributed(model):
    params, config = model
    tokens = torch.tensor(gpt2().encode_ordinary("one two three"))
    logits = forward(params, tokens[None], config)[0, -1]
    first, second = logits.topk(2).indices.tolist()
    found = inspection.inspect_prompt(params, tokens, config, wrong=first)
    assert (found.answer, found.wrong) == (second, first)
    assert found.logit_difference == pytest.approx(
        (logits[second] - logits[first]).item(), abs=1e-5
    )


def test_the_lens_covers_the_last_positions_of_a_long_prompt(model):
    params, config = model
    tokens = torch.arange(100, 100 + inspection.LENS_POSITIONS + 4)
    found = inspection.inspect_prompt(params, tokens, config)
    assert found.lens.shape == (config.n_layer + 1, inspection.LENS_POSITIONS, config.vocab_size)
    assert found.lens_positions == list(range(4, inspection.LENS_POSITIONS + 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        # A wrong shape or type: jaxtyping's error under pytest, ours without checks.
        ({"tokens": torch.tensor([[1, 2]])}, CHECKED, r"one non-empty prompt|seq"),
        ({"tokens": [1, 2]}, CHECKED, "got list|tokens"),
        ({"tokens": torch.tensor([], dtype=torch.long)}, ValueError, "non-empty"),
        ({"answer": 50257}, ValueError, "answer 50257 is outside"),
        ({"answer": 3, "wrong": 3}, ValueError, "same token"),
        ({"ln": "none"}, CHECKED, "unknown ln|ln"),
        ({"tokens": torch.arange(40)}, ValueError, "block_size"),
    ],
)
def test_bad_arguments_are_one_clear_error(model, kwargs, error, pattern):
    params, config = model
    arguments = {"tokens": torch.tensor([1, 2, 3]), **kwargs}
    tokens = arguments.pop("tokens")
    with pytest.raises(error, match=pattern):
        inspection.inspect_prompt(params, tokens, config, **arguments)
    with shape_checks(False), pytest.raises(ValueError, match=pattern):  # our own check
        inspection.inspect_prompt(params, tokens, config, **arguments)


def test_top_heads_are_ranked_best_first():
    scores = torch.tensor([[0.1, 0.7], [0.9, 0.2]])
    assert inspection.top_heads(scores, 3) == [
        (1, 0, pytest.approx(0.9)),
        (0, 1, pytest.approx(0.7)),
        (1, 1, pytest.approx(0.2)),
    ]


def test_token_text_decodes_gpt2_ids_and_names_padding():
    assert inspection.token_text(single_token(" Mary")) == " Mary"
    assert inspection.token_text(50300) == "<pad:50300>"


# --- write_report ---------------------------------------------------------------------------


def test_write_report_writes_the_figures_report_and_results(model, ioi, tmp_path):
    params, config = model
    tokens, found = ioi
    drawn: list[int] = []
    written = inspection.write_report(
        found, tmp_path / "report", config, title="IOI", k=3, progress=drawn.append
    )
    folder = tmp_path / "report"
    saved = json.loads((folder / "results.json").read_text())
    assert saved == json.loads(json.dumps(written))
    assert saved == {
        "title": "IOI",
        **json.loads(json.dumps(inspection.results(found, config, k=3))),
        "figures": saved["figures"],
    }
    assert set(saved["figures"]) == {"logit_lens", "dla_heads", "top_heads"} | {
        f"{kind}_scores" for kind in inspection.HEAD_KINDS
    }
    for name in saved["figures"].values():
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert drawn == [1] * len(saved["figures"])
    assert saved["dla"]["heads"] == found.dla_heads(config).tolist()
    assert saved["answer"] == {"token": single_token(" Mary"), "text": " Mary", "given": True}
    assert saved["token_text"] == [gpt2().decode([t]) for t in tokens.tolist()]
    lens = saved["logit_lens"]
    top = found.lens.softmax(-1).topk(3, dim=-1)
    assert lens["top_tokens"] == top.indices.tolist()
    assert len(saved["head_scores"]["previous_token"]["top"]) == 3
    report = (folder / "report.md").read_text()
    assert "# IOI" in report and "' Mary' - ' John'" in report
    for name in saved["figures"].values():
        assert f"({name})" in report


def test_the_report_escapes_every_control_character_in_token_text(model, ioi, tmp_path):
    _, config = model
    _, found = ioi
    inspection.write_report(found, tmp_path, config, decode=lambda t: f"\t\x00\r`{t}`\n")
    report = (tmp_path / "report.md").read_text()
    assert "`\\t\\x00\\r'" in report and "'\\n`" in report
    assert not {"\t", "\x00", "\r"} & set(report)
