"""Figures for the researcher's eye: per-head heatmaps, logit-lens tables, attention patterns.

    fig = head_heatmap(results, title="logit difference recovered", path="patching.png")
    fig = logit_lens_table(lens_logits, decode=vocabulary, tokens=prompt_strings, k=2)
    fig = attention_patterns(cache["h.5.attn.pattern"], prompt_strings, heads=[1, 5], layer=5)

Each function takes plain tensors (whatever computed them: `gpt_fn.patching`, the readouts of
`gpt_fn.analysis`, a cache), returns a matplotlib `Figure` on the Agg canvas (no window, no
pyplot state) and, given `path`, writes it as a PNG. A tensor of the wrong shape, or labels
that do not match it, is one `ValueError` naming both.

Token strings are shown as text: newlines, tabs and other control characters escaped, `$`
never read as mathtext.
References: nostalgebraist, "interpreting GPT: the logit lens" (2020), for the table's layout;
TransformerLens's demos (`imshow` of `(layer, head)` results, CircuitsVis attention patterns).
"""

import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from gpt_fn.checks import check_int
from gpt_fn.files import write_atomic

PNG_DPI = 110
Decode = Callable[[int], str] | Sequence[str]
"""A token id's text: a function (`lambda i: gpt2().decode([i])`) or a list indexed by id."""


def head_heatmap(
    values: Float[Tensor, "n_layer n_head"],
    *,
    title: str = "",
    label: str = "",
    rows: str = "layer",
    columns: str = "head",
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    annotate: bool | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """A `(n_layer, n_head)` grid of signed values (patching results, direct logit
    attribution) on a diverging colour scale centred at 0, layer 0 at the top.

    `label` names the colour bar's quantity. `rows`/`columns` name the axes and
    `row_labels`/`column_labels` the ticks (default: 0, 1, ...), so any 2-D result
    (layer x position) fits. `annotate` writes each value in its cell (default: up to 400
    cells). NaN cells are left blank.
    """
    if not isinstance(values, Tensor) or values.ndim != 2 or 0 in values.shape:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a non-empty (n_layer, n_head) tensor, got {shape}")
    grid = values.detach().cpu().double()
    n_rows, n_columns = grid.shape
    row_labels = _labels("row_labels", row_labels, n_rows, rows)
    column_labels = _labels("column_labels", column_labels, n_columns, columns)
    finite = grid[torch.isfinite(grid)]
    bound = float(finite.abs().max()) if finite.numel() else 0.0
    bound = bound or 1.0  # an all-zero grid still gets a scale
    figure = _figure(max(4.0, 0.5 * n_columns + 2.5), max(3.0, 0.4 * n_rows + 1.5))
    axes = figure.subplots()
    image = axes.imshow(grid.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    figure.colorbar(image, ax=axes, label=label)
    axes.set(xlabel=columns, ylabel=rows, title=title)
    _ticks(axes, column_labels, row_labels)
    if annotate is None:
        annotate = grid.numel() <= 400
    if annotate:
        for (i, j), value in zip(_cells(n_rows, n_columns), grid.flatten().tolist(), strict=True):
            if math.isfinite(value):
                _write(axes, i, j, f"{value:.2g}", dark=abs(value) > 0.6 * bound)
    return _saved(figure, path)


def logit_lens_table(
    logits_or_ids: Float[Tensor, "layers seq vocab"] | Int[Tensor, "layers seq k"],
    *,
    decode: Decode,
    tokens: Sequence[str] | None = None,
    layer_labels: Sequence[str] | None = None,
    k: int = 1,
    title: str = "",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """The top tokens at each layer (rows) and position (columns) of a logit lens.

    `logits_or_ids`: `(layers, seq, vocab)` logits (each cell shows its `k` most likely tokens,
    shaded by the top one's probability) or `(layers, seq, k)` token ids already ranked (cells
    unshaded). `decode` turns an id into text; `tokens` label the positions (the input
    tokens), `layer_labels` the rows (default: 0, 1, ...).
    """
    if not isinstance(logits_or_ids, Tensor) or logits_or_ids.ndim != 3:
        shape = tuple(logits_or_ids.shape) if isinstance(logits_or_ids, Tensor) else None
        raise ValueError(
            "logits_or_ids must be (layers, seq, vocab) logits or (layers, seq, k) token ids, "
            f"got shape {shape}"
        )
    data = logits_or_ids.detach().cpu()
    if data.dtype.is_floating_point:
        check_int("k", k, at_least=1)
        if k > data.shape[-1]:
            raise ValueError(f"k={k} is more than the logits' vocab of {data.shape[-1]}")
        probs = data.float().softmax(-1)
        top_probs, ids = probs.topk(k, dim=-1)
        shade = top_probs[..., 0]
    else:
        ids, shade = data.long(), None
    n_layers, seq, _ = ids.shape
    tokens = _labels("tokens", tokens, seq, "position")
    layer_labels = _labels("layer_labels", layer_labels, n_layers, "layer")
    text_of = _decoder(decode, vocab=data.shape[-1] if shade is not None else None)
    figure = _figure(max(4.0, 1.1 * seq + 2.0), max(3.0, (0.3 + 0.2 * ids.shape[-1]) * n_layers))
    axes = figure.subplots()
    if shade is None:
        axes.imshow(torch.zeros(n_layers, seq).numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto")
    else:
        image = axes.imshow(shade.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        figure.colorbar(image, ax=axes, label="probability of the top token")
    axes.set(xlabel="position", ylabel="layer", title=title)
    _ticks(axes, tokens, layer_labels)
    for (i, j), cell in zip(_cells(n_layers, seq), ids.flatten(0, 1).tolist(), strict=True):
        dark = shade is not None and float(shade[i, j]) > 0.6
        _write(axes, i, j, "\n".join(shown(text_of(t)) for t in cell), dark=dark)
    return _saved(figure, path)


def attention_patterns(
    pattern: Float[Tensor, "n_head seq_q seq_k"] | Float[Tensor, "batch n_head seq_q seq_k"],
    tokens: Sequence[str],
    *,
    heads: Sequence[int] | None = None,
    layer: int | None = None,
    titles: Sequence[str] | None = None,
    example: int = 0,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Attention weights of the chosen heads over `tokens`: one panel per head, queries down
    the side, keys along the bottom, 0 to 1 on one colour scale.

    `pattern`: `(n_head, seq, seq)`, or a cache's `h.{i}.attn.pattern` `(batch, n_head, seq,
    seq)`, of which row `example` is drawn. `heads`: which (default: all); `layer` titles the
    panels `h.{layer} head {h}`; `titles` names them otherwise, one per chosen head (heads of
    several layers stacked into one `pattern`).
    """
    if not isinstance(pattern, Tensor) or pattern.ndim not in (3, 4):
        shape = tuple(pattern.shape) if isinstance(pattern, Tensor) else None
        raise ValueError(
            "pattern must be (n_head, seq, seq), or a cache's (batch, n_head, seq, seq), got "
            f"shape {shape}"
        )
    if pattern.ndim == 4:
        check_int("example", example, at_least=0)
        if example >= pattern.shape[0]:
            raise ValueError(f"example {example} is outside the pattern's {pattern.shape[0]} rows")
        pattern = pattern[example]
    n_head, seq_q, seq_k = pattern.shape
    if seq_q != seq_k:
        raise ValueError(
            f"pattern must be square over the positions (no KV cache), got {seq_q} x {seq_k}"
        )
    tokens = _labels("tokens", tokens, seq_k, "position")
    chosen = list(range(n_head)) if heads is None else list(heads)
    if not chosen:
        raise ValueError("heads is empty: choose at least one head")
    for head in chosen:
        check_int("head", head, at_least=0)
        if head >= n_head:
            raise ValueError(f"head {head} is outside the pattern's {n_head} heads")
    if titles is None:
        titles = [f"head {h}" if layer is None else f"h.{layer} head {h}" for h in chosen]
    titles = _labels("titles", titles, len(chosen), "chosen head")
    weights = pattern.detach().cpu().float()
    side = max(2.5, 0.3 * seq_k + 1.0)
    figure = _figure(side * len(chosen) + 1.0, side + 0.5)
    panels = figure.subplots(1, len(chosen), squeeze=False)[0]
    for axes, head, title in zip(panels, chosen, titles, strict=True):
        image = axes.imshow(weights[head].numpy(), cmap="Blues", vmin=0, vmax=1)
        axes.set(title=title, xlabel="key")
        _ticks(axes, tokens, tokens)
    panels[0].set_ylabel("query")
    figure.colorbar(image, ax=list(panels), label="attention weight")
    return _saved(figure, path)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # draws and saves without a display backend
    return figure


def _saved(figure: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        with warnings.catch_warnings():
            # Tokens in scripts the font lacks (CJK, emoji) are drawn as boxes, not warned about.
            warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font", UserWarning)
            write_atomic(
                path, lambda temporary: figure.savefig(temporary, format="png", dpi=PNG_DPI)
            )
    return figure


def _labels(name: str, labels: Sequence[str] | None, count: int, unit: str) -> list[str]:
    """Tick labels: `labels` as text (one per `unit`, `count` of them), or 0 .. count - 1."""
    if labels is None:
        return [str(i) for i in range(count)]
    if isinstance(labels, str) or len(labels) != count:
        got = "a string" if isinstance(labels, str) else f"{len(labels)} strings"
        raise ValueError(f"{name}: {got} for {count} {unit}s; give one string per {unit}")
    return [shown(str(label)) for label in labels]


def _ticks(axes: Axes, x_labels: list[str], y_labels: list[str]) -> None:
    upright = max(len(label) for label in x_labels) <= 3  # numbers; tokens turn sideways
    axes.set_xticks(range(len(x_labels)), x_labels, rotation=0 if upright else 90, parse_math=False)
    axes.set_yticks(range(len(y_labels)), y_labels, parse_math=False)


def _write(axes: Axes, row: int, column: int, text: str, *, dark: bool) -> None:
    """`text` centred in a cell, white where the colour scale is dark."""
    color = "white" if dark else "black"
    axes.text(column, row, text, ha="center", va="center", fontsize=7, color=color,
              parse_math=False)  # fmt: skip


def _cells(n_rows: int, n_columns: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n_rows) for j in range(n_columns)]


def _decoder(decode: Decode, *, vocab: int | None) -> Callable[[int], str]:
    if callable(decode):
        return decode
    if isinstance(decode, str) or not isinstance(decode, Sequence):
        raise ValueError(
            f"decode must be a function of a token id or a list of token strings, got "
            f"{type(decode).__name__}"
        )
    if vocab is not None and len(decode) < vocab:
        raise ValueError(f"decode holds {len(decode)} token strings; the logits have {vocab}")
    strings = list(decode)

    def lookup(token: int) -> str:
        if not 0 <= token < len(strings):
            raise ValueError(f"token id {token} is outside decode's {len(strings)} strings")
        return strings[token]

    return lookup


def shown(text: str) -> str:
    """A token as one visible line: newlines, tabs and other control characters escaped
    (`\\n`, `\\t`, `\\x00`), which no font draws."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
