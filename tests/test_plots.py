"""gpt_fn.plots: what each figure shows, read back from its Axes, and the PNG it writes."""

import math

import matplotlib.image
import pytest
import torch
from jaxtyping import TypeCheckError

from gpt_fn import plots
from gpt_fn.model import init_params, run_with_cache
from gpt_fn.shapes import shape_checks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def texts(axes):
    return [text.get_text() for text in axes.texts]


def ticks(labels):
    return [label.get_text() for label in labels]


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


# --- head_heatmap ---------------------------------------------------------------------------


def test_head_heatmap_shows_each_value_on_a_scale_centred_at_zero(tmp_path):
    values = torch.tensor([[0.5, -2.0, 0.0], [1.25, float("nan"), -0.1]])
    figure = plots.head_heatmap(
        values, title="logit difference", label="recovered", path=tmp_path / "heads.png"
    )
    axes, colorbar = figure.axes
    image = axes.images[0]
    assert image.get_array().tolist()[0] == [0.5, -2.0, 0.0]
    assert math.isnan(image.get_array().data[1, 1])
    assert image.get_clim() == (-2.0, 2.0)  # symmetric around 0: sign is the point
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == (
        "head",
        "layer",
        "logit difference",
    )
    assert colorbar.get_ylabel() == "recovered"
    assert ticks(axes.get_xticklabels()) == ["0", "1", "2"]
    assert ticks(axes.get_yticklabels()) == ["0", "1"]
    # Every finite value is written in its cell; the NaN cell is blank.
    assert texts(axes) == ["0.5", "-2", "0", "1.2", "-0.1"]
    assert [(t.get_position()) for t in axes.texts][:2] == [(0, 0), (1, 0)]
    assert_png(tmp_path / "heads.png")


def test_head_heatmap_takes_any_grid_with_its_own_axis_names():
    values = torch.zeros(2, 30)  # (layer, position): all zero still gets a scale
    labels = [f"tok{i}" for i in range(30)]
    figure = plots.head_heatmap(values, columns="position", column_labels=labels)
    axes = figure.axes[0]
    assert axes.get_xlabel() == "position" and ticks(axes.get_xticklabels()) == labels
    assert axes.images[0].get_clim() == (-1.0, 1.0)
    assert len(axes.texts) == 60
    assert not plots.head_heatmap(values, annotate=False).axes[0].texts


def test_head_heatmap_names_a_bad_shape_or_labels():
    with pytest.raises(TypeCheckError):  # the annotation: (n_layer, n_head)
        plots.head_heatmap(torch.zeros(4))
    wrong = r"values must be a non-empty \(n_layer, n_head\) tensor, got \(4,\)"
    with shape_checks(False), pytest.raises(ValueError, match=wrong):
        plots.head_heatmap(torch.zeros(4))
    with pytest.raises(ValueError, match="row_labels: 3 strings for 2 layers"):
        plots.head_heatmap(torch.zeros(2, 3), row_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="values must be a non-empty"):
        plots.head_heatmap(torch.zeros(0, 3))


# --- logit_lens_table -----------------------------------------------------------------------

VOCAB = [f"w{i}" for i in range(20)]
VOCAB[3], VOCAB[4], VOCAB[5] = "$", "\n\n", "$x^2$"


def test_logit_lens_table_shows_the_top_tokens_shaded_by_probability(tmp_path):
    logits = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(0))
    logits[1, 2, 3] = logits[0, 0, 4] = logits[2, 3, 5] = 9.0  # "$", "\n\n", "$x^2$" on top
    prompt = ["The", " $", " cat", "\n"]
    figure = plots.logit_lens_table(
        logits, decode=VOCAB, tokens=prompt, k=2, title="lens", path=tmp_path / "lens.png"
    )
    axes = figure.axes[0]
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(torch.tensor(axes.images[0].get_array()), top.values[..., 0])
    expected = [
        "\n".join(VOCAB[t].replace("\n", "\\n") for t in top.indices[i, j].tolist())
        for i in range(3)
        for j in range(4)
    ]
    assert texts(axes) == expected
    assert texts(axes)[0].startswith("\\n\\n\n")  # a newline token is shown escaped
    assert ticks(axes.get_xticklabels()) == ["The", " $", " cat", "\\n"]
    assert ticks(axes.get_yticklabels()) == ["0", "1", "2"]
    # "$" in a token is text, not mathtext (which would fail to draw an unmatched "$").
    assert not any(t.get_parse_math() for t in [*axes.texts, *axes.get_xticklabels()])
    assert_png(tmp_path / "lens.png")


def test_tokens_the_font_lacks_are_drawn_without_a_warning(tmp_path, recwarn):
    ids = torch.tensor([[[0]]])
    plots.logit_lens_table(ids, decode=["\u306e\U0001f600"], path=tmp_path / "lens.png")
    assert not [w for w in recwarn if "missing from font" in str(w.message)]


def test_control_characters_in_tokens_are_shown_escaped():
    """Bytes no font draws (GPT-2 has tokens for \\x00 ... \\x1f) appear as escapes."""
    ids = torch.tensor([[[0]]])
    figure = plots.logit_lens_table(ids, decode=["\x00\x1b\u00e9"], tokens=["a\x07"])
    assert texts(figure.axes[0]) == ["\\x00\\x1b\u00e9"]  # printable text (é) kept
    assert ticks(figure.axes[0].get_xticklabels()) == ["a\\x07"]


def test_logit_lens_table_from_ranked_ids_and_a_decode_function():
    ids = torch.tensor([[[1, 2]], [[7, 0]]])  # (layers, seq, k)
    figure = plots.logit_lens_table(ids, decode=lambda t: f"<{t}>", layer_labels=["embed", "h.0"])
    axes = figure.axes
    assert len(axes) == 1  # no shading, so no colour bar
    assert texts(axes[0]) == ["<1>\n<2>", "<7>\n<0>"]
    assert ticks(axes[0].get_yticklabels()) == ["embed", "h.0"]


def test_logit_lens_table_names_bad_inputs():
    logits = torch.zeros(2, 3, 20)
    with shape_checks(False), pytest.raises(ValueError, match=r"got shape \(3, 20\)"):
        plots.logit_lens_table(logits[0], decode=VOCAB)
    with pytest.raises(ValueError, match="tokens: 2 strings for 3 positions"):
        plots.logit_lens_table(logits, decode=VOCAB, tokens=["a", "b"])
    with pytest.raises(ValueError, match="decode holds 10 token strings; the logits have 20"):
        plots.logit_lens_table(logits, decode=VOCAB[:10])
    with pytest.raises(ValueError, match="k=21 is more than the logits' vocab of 20"):
        plots.logit_lens_table(logits, decode=VOCAB, k=21)
    with pytest.raises(ValueError, match="token id 30 is outside decode's 20 strings"):
        plots.logit_lens_table(torch.tensor([[[30]]]), decode=VOCAB)


# --- attention_patterns ---------------------------------------------------------------------


def test_attention_patterns_draw_the_chosen_heads_of_a_cache_row(tiny_config, tmp_path):
    params = init_params(tiny_config, seed=0)
    tokens = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    _, cache = run_with_cache(params, tokens, tiny_config, names=["h.1.attn.pattern"])
    pattern = cache["h.1.attn.pattern"]  # (batch, n_head, seq, seq)
    words = ["A", "$", "b", "c", "d"]
    figure = plots.attention_patterns(
        pattern, words, heads=[2, 0], layer=1, example=1, path=tmp_path / "attn.png"
    )
    *panels, colorbar = figure.axes
    assert [p.get_title() for p in panels] == ["h.1 head 2", "h.1 head 0"]
    for panel, head in zip(panels, [2, 0], strict=True):
        assert torch.equal(torch.tensor(panel.images[0].get_array()), pattern[1, head])
        assert panel.images[0].get_clim() == (0, 1)
        assert ticks(panel.get_xticklabels()) == words == ticks(panel.get_yticklabels())
    assert (panels[0].get_ylabel(), panels[0].get_xlabel()) == ("query", "key")
    assert colorbar.get_ylabel() == "attention weight"
    assert_png(tmp_path / "attn.png")
    every = plots.attention_patterns(pattern[0], words)  # (n_head, seq, seq): every head
    assert [p.get_title() for p in every.axes[:-1]] == ["head 0", "head 1", "head 2"]
    named = plots.attention_patterns(pattern[0], words, heads=[1, 2], titles=["L1H1", "L0H2"])
    assert [p.get_title() for p in named.axes[:-1]] == ["L1H1", "L0H2"]


def test_attention_patterns_name_bad_inputs():
    pattern = torch.full((2, 3, 3), 1 / 3)
    words = ["a", "b", "c"]
    with pytest.raises(ValueError, match="head 2 is outside the pattern's 2 heads"):
        plots.attention_patterns(pattern, words, heads=[0, 2])
    with pytest.raises(ValueError, match="tokens: 2 strings for 3 positions"):
        plots.attention_patterns(pattern, words[:2])
    with pytest.raises(ValueError, match="example 1 is outside the pattern's 1 rows"):
        plots.attention_patterns(pattern[None], words, example=1)
    with pytest.raises(ValueError, match="must be square over the positions"):
        plots.attention_patterns(torch.full((2, 1, 3), 1 / 3), words)
    with pytest.raises(ValueError, match="heads is empty"):
        plots.attention_patterns(pattern, words, heads=[])
    with pytest.raises(ValueError, match="titles: 1 strings for 2 chosen heads"):
        plots.attention_patterns(pattern, words, titles=["L0H0"])
    with shape_checks(False), pytest.raises(ValueError, match=r"got shape \(3, 3\)"):
        plots.attention_patterns(pattern[0], words)
