"""A first look at one prompt: the logit lens, direct logit attribution per head, and the
heads that attend to the previous token, to earlier copies of the current token or to the
token after such a copy; written as one report folder (PNG figures, `report.md`,
`results.json`). `gpt-fn inspect` is this module on a loaded model.

    inspection = inspect_prompt(params, tokens, config, answer=mary, wrong=john)
    write_report(inspection, "report", config)    # report.md, results.json, PNGs

Head scores (Olsson et al. 2022, "In-context Learning and Induction Heads"; TransformerLens's
`head_detector`): a key mask says which keys each query position should attend to; a head's
score is its attention mass on those keys, averaged over the queries that have any.
`previous_token_keys`, `duplicate_token_keys` and `induction_keys` make the three classic
masks from the tokens; `attention_mass` scores every head of a cache against any mask.

The readouts are `gpt_fn.analysis`'s (`logit_lens`, `direct_logit_attribution`) and the
figures `gpt_fn.plots`'s, on one `run_with_cache` of the prompt.
"""

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt_fn import plots
from gpt_fn.analysis import (
    LN_MODES,
    LayerNormMode,
    cached,
    direct_logit_attribution,
    logit_lens,
)
from gpt_fn.checks import check_choice, check_int, check_token_id
from gpt_fn.config import GPTConfig
from gpt_fn.files import write_atomic
from gpt_fn.model import check_tokens, run_with_cache
from gpt_fn.nn import AttentionKernel
from gpt_fn.shapes import Params
from gpt_fn.tokenizer import GPT2_VOCAB_SIZE, gpt2

HEAD_KINDS = ("previous_token", "duplicate_token", "induction")
"""The head scores a report holds, each from its key mask (`KEY_MASKS`)."""
LENS_POSITIONS = 16
"""The logit lens covers the prompt's last positions, at most this many (a readable table)."""


def previous_token_keys(tokens: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq seq"]:
    """Query `t` should attend to key `t - 1`."""
    seq = tokens.shape[-1]
    keys = torch.arange(seq, device=tokens.device)
    return (keys[None, :] == keys[:, None] - 1).expand(tokens.shape[0], seq, seq)


def duplicate_token_keys(tokens: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq seq"]:
    """Query `t` should attend to every earlier key `j < t` holding the same token."""
    seq = tokens.shape[-1]
    earlier = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril(-1)
    return (tokens[:, :, None] == tokens[:, None, :]) & earlier


def induction_keys(tokens: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq seq"]:
    """Query `t` should attend to every key `j < t` whose previous token is the query's token:
    the token that followed an earlier copy of it (what an induction head copies)."""
    duplicates = duplicate_token_keys(tokens)
    # Key j + 1 follows the duplicate at j; j + 1 = t (the query itself) is left out.
    shifted = torch.zeros_like(duplicates)
    shifted[:, :, 1:] = duplicates[:, :, :-1]
    return shifted & duplicates.new_ones(duplicates.shape[-2:]).tril(-1)


KEY_MASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "previous_token": previous_token_keys,
    "duplicate_token": duplicate_token_keys,
    "induction": induction_keys,
}


def attention_mass(
    cache: Mapping[str, Tensor], keys: Bool[Tensor, "batch seq seq"], config: GPTConfig
) -> Float[Tensor, "n_layer n_head"]:
    """Each head's attention (`h.{i}.attn.pattern`) on the keys `keys[b, t]` marks, summed
    over those keys and averaged over the queries `(b, t)` that have at least one.

    A `ValueError` if no query has a key (a duplicate-token score of a prompt whose tokens
    are all different) or if the cache lacks a pattern."""
    queries = keys.any(-1)
    if not bool(queries.any()):
        raise ValueError("no query position has a key in the mask: the score is undefined")
    scores = []
    for layer in range(config.n_layer):
        site = f"h.{layer}.attn.pattern"
        pattern = cached(cache, site, "attention_mass")
        if pattern.shape[-2:] != keys.shape[-2:] or pattern.shape[0] != keys.shape[0]:
            raise ValueError(
                f"keys has shape {tuple(keys.shape)}; {site} is {tuple(pattern.shape)} "
                "(batch n_head seq seq)"
            )
        mass = (pattern * keys[:, None].to(pattern.dtype)).sum(-1)  # batch n_head seq
        scores.append(mass.permute(0, 2, 1)[queries].mean(0))
    return torch.stack(scores)


@dataclass(frozen=True)
class Inspection:
    """What `inspect_prompt` found on one prompt; `results` makes it JSON."""

    tokens: list[int]
    answer: int
    """The token whose logit (minus `wrong`'s) is attributed."""
    wrong: int | None
    answer_given: bool
    """False: `answer` is the model's own prediction."""
    next_logits: Float[Tensor, " vocab"]
    """The model's logits for the token after the prompt."""
    ln: LayerNormMode
    lens: Float[Tensor, "layers lens_seq vocab"]
    """`analysis.logit_lens` of the last `len(lens_positions)` positions."""
    lens_labels: list[str]
    lens_positions: list[int]
    dla_by_head: Float[Tensor, " head_rows"]
    """`analysis.direct_logit_attribution(by="head")` at the last position: every head,
    `remainder`, `ln_f.bias`; the rows sum to `logit_difference`."""
    dla_head_labels: list[str]
    dla_by_component: Float[Tensor, " component_rows"]
    """`by="component"`: the embedding, each block's attention and MLP, `ln_f.bias`."""
    dla_component_labels: list[str]
    head_scores: dict[str, Tensor | None]
    """`(n_layer, n_head)` per kind of `HEAD_KINDS`; None where the prompt has no such key."""
    patterns: Float[Tensor, "n_layer n_head seq seq"]

    @property
    def logit_difference(self) -> float:
        """The answer's logit minus the wrong token's (or the answer's logit, with no wrong)."""
        wrong = 0.0 if self.wrong is None else float(self.next_logits[self.wrong])
        return float(self.next_logits[self.answer]) - wrong

    def dla_heads(self, config: GPTConfig) -> Float[Tensor, "n_layer n_head"]:
        """The per-head rows of `dla_by_head` as a `(n_layer, n_head)` grid."""
        return self.dla_by_head[: config.n_layer * config.n_head].view(
            config.n_layer, config.n_head
        )


def inspect_prompt(
    params: Params,
    tokens: Int[Tensor, " seq"],
    config: GPTConfig,
    *,
    answer: int | None = None,
    wrong: int | None = None,
    ln: LayerNormMode = "recompute",
    attention: AttentionKernel = "sdpa",
) -> Inspection:
    """One prompt read out from one `run_with_cache`: the logit lens (`ln` as in
    `analysis.logit_lens`) over its last `LENS_POSITIONS` positions, direct logit attribution
    of `answer`'s logit minus `wrong`'s at the last position (per head and per component;
    `answer` defaults to the model's most likely next token, `wrong` to none: the logit
    alone), and the `HEAD_KINDS` scores of every head."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 1 or tokens.numel() == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be one non-empty prompt (seq,), got {shape}")
    check_tokens(tokens[None], config)
    check_choice("ln", ln, LN_MODES)
    for name, value in (("answer", answer), ("wrong", wrong)):
        if value is not None:
            check_token_id(name, value, vocab_size=config.vocab_size)
    if answer is not None and answer == wrong:
        raise ValueError(f"answer and wrong are the same token ({answer}): nothing to compare")
    rows = tokens[None]
    names = ["embed", "ln_f.scale", f"h.{config.n_layer - 1}.resid_post"] + [
        f"h.{i}.{site}"
        for i in range(config.n_layer)
        for site in ("resid_pre", "attn.out", "mlp.out", "attn.z", "attn.pattern")
    ]
    with torch.no_grad():
        logits, cache = run_with_cache(params, rows, config, names=names, attention=attention)
        next_logits = logits[0, -1]
        answer_given = answer is not None
        if answer is None:
            answer = int(next_logits.argmax())
            if answer == wrong:  # the prediction is the wrong token: attribute the runner-up
                answer = int(next_logits.topk(2).indices[1])
        answers = torch.tensor([answer], device=tokens.device)
        incorrect = None if wrong is None else torch.tensor([wrong], device=tokens.device)
        first = max(0, tokens.numel() - LENS_POSITIONS)
        lens, lens_labels = logit_lens(params, cache, config, ln=ln, pos=slice(first, None))
        by_head, head_labels = direct_logit_attribution(
            params, cache, answers, config, by="head", incorrect=incorrect
        )
        by_component, component_labels = direct_logit_attribution(
            params, cache, answers, config, by="component", incorrect=incorrect
        )
        scores: dict[str, Tensor | None] = {}
        for kind in HEAD_KINDS:
            keys = KEY_MASKS[kind](rows)
            scores[kind] = attention_mass(cache, keys, config) if bool(keys.any()) else None
        patterns = torch.stack([cache[f"h.{i}.attn.pattern"][0] for i in range(config.n_layer)])
    return Inspection(
        tokens=tokens.tolist(),
        answer=answer,
        wrong=wrong,
        answer_given=answer_given,
        next_logits=next_logits,
        ln=ln,
        lens=lens[:, 0],
        lens_labels=lens_labels,
        lens_positions=list(range(first, tokens.numel())),
        dla_by_head=by_head[:, 0],
        dla_head_labels=head_labels,
        dla_by_component=by_component[:, 0],
        dla_component_labels=component_labels,
        head_scores=scores,
        patterns=patterns,
    )


def token_text(token: int) -> str:
    """A token's GPT-2 text; ids past GPT-2's 50257 (a padded vocabulary) as `<pad:ID>`."""
    return gpt2().decode([token]) if 0 <= token < GPT2_VOCAB_SIZE else f"<pad:{token}>"


def top_heads(scores: Float[Tensor, "n_layer n_head"], k: int) -> list[tuple[int, int, float]]:
    """The `k` highest-scoring heads as `(layer, head, score)`, best first."""
    check_int("k", k, at_least=1)
    values, order = scores.flatten().topk(min(k, scores.numel()))
    n_head = scores.shape[1]
    return [
        (i // n_head, i % n_head, value)
        for i, value in zip(order.tolist(), values.tolist(), strict=True)
    ]


def results(
    inspection: Inspection,
    config: GPTConfig,
    *,
    decode: Callable[[int], str] = token_text,
    k: int = 5,
) -> dict[str, Any]:
    """The inspection as JSON-ready numbers: the top `k` tokens of every logit-lens cell, each
    DLA row by label, each head score grid with its `k` best heads."""
    check_int("k", k, at_least=1)
    k = min(k, config.vocab_size)
    probs = inspection.lens.float().softmax(-1)
    lens_probs, lens_ids = probs.topk(k, dim=-1)
    answer_logits = inspection.lens[..., -1, inspection.answer]
    if inspection.wrong is not None:
        answer_logits = answer_logits - inspection.lens[..., -1, inspection.wrong]
    next_probs, next_ids = inspection.next_logits.float().softmax(-1).topk(k)
    return {
        "tokens": inspection.tokens,
        "token_text": [decode(t) for t in inspection.tokens],
        "prediction": [
            {"token": t, "text": decode(t), "prob": p}
            for t, p in zip(next_ids.tolist(), next_probs.tolist(), strict=True)
        ],
        "answer": {
            "token": inspection.answer,
            "text": decode(inspection.answer),
            "given": inspection.answer_given,
        },  # fmt: skip
        "wrong": None
        if inspection.wrong is None
        else {"token": inspection.wrong, "text": decode(inspection.wrong)},
        "logit_difference": inspection.logit_difference,
        "logit_lens": {
            "ln": inspection.ln,
            "layers": inspection.lens_labels,
            "positions": inspection.lens_positions,
            "top_tokens": lens_ids.tolist(),
            "top_text": [[[decode(t) for t in cell] for cell in row] for row in lens_ids.tolist()],
            "top_probs": lens_probs.tolist(),
            "last_position_logit_difference": answer_logits.tolist(),
        },
        "dla": {
            "by_head": dict(
                zip(inspection.dla_head_labels, inspection.dla_by_head.tolist(), strict=True)
            ),
            "by_component": dict(
                zip(
                    inspection.dla_component_labels,
                    inspection.dla_by_component.tolist(),
                    strict=True,
                )
            ),
            "heads": inspection.dla_heads(config).tolist(),
        },
        "head_scores": {
            kind: None
            if scores is None
            else {"scores": scores.tolist(), "top": [list(h) for h in top_heads(scores, k)]}
            for kind, scores in inspection.head_scores.items()
        },
    }


def write_report(
    inspection: Inspection,
    out: str | os.PathLike[str],
    config: GPTConfig,
    *,
    decode: Callable[[int], str] = token_text,
    title: str = "",
    about: Mapping[str, Any] | None = None,
    k: int = 5,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """The report folder `out`: `logit_lens.png`, `dla_heads.png`, per head kind
    `{kind}_scores.png`, the best head of each kind's pattern in `top_heads.png`, `results.json`
    (`title`, `about`'s entries, `results`'s numbers, the figures' names) and `report.md`
    (the same, to read). `about`: what produced the report (JSON values: the model's source,
    the prompt). `progress(1)` after each figure (`tqdm.update` fits). Returns what
    `results.json` holds."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    words = [decode(t) for t in inspection.tokens]
    found = results(inspection, config, decode=decode, k=k)
    drawings: dict[str, Callable[[Path], object]] = {
        "logit_lens": lambda path: plots.logit_lens_table(
            inspection.lens,
            decode=decode,
            tokens=[words[i] for i in inspection.lens_positions],
            layer_labels=inspection.lens_labels,
            k=2,
            title=f"logit lens (ln={inspection.ln}): top 2 tokens",
            path=path,
        ),
        "dla_heads": lambda path: plots.head_heatmap(
            inspection.dla_heads(config),
            title=f"direct logit attribution: {attributed(found)}",
            label="logit (difference)",
            path=path,
        ),
    }
    best: list[tuple[str, int, int]] = []
    for kind, scores in inspection.head_scores.items():
        if scores is not None:
            drawings[f"{kind}_scores"] = lambda path, kind=kind, scores=scores: plots.head_heatmap(
                scores,
                title=f"{kind.replace('_', '-')} score (attention mass)",
                label="attention",
                path=path,
            )
            layer, head, _ = top_heads(scores, 1)[0]
            best.append((kind, layer, head))
    if best:
        drawings["top_heads"] = lambda path: plots.attention_patterns(
            torch.stack([inspection.patterns[layer, head] for _, layer, head in best]),
            words,
            titles=[f"{kind.replace('_', '-')}: L{layer}H{head}" for kind, layer, head in best],
            path=path,
        )
    figures = {}
    for name, draw in drawings.items():
        figures[name] = f"{name}.png"
        draw(folder / figures[name])
        if progress is not None:
            progress(1)
    found = {"title": title, **(about or {}), **found, "figures": figures}
    text = json.dumps(found, indent=2) + "\n"
    write_atomic(folder / "results.json", lambda path: Path(path).write_text(text))
    markdown = _markdown(found, k=k)
    write_atomic(folder / "report.md", lambda path: Path(path).write_text(markdown))
    return found


def attributed(found: Mapping[str, Any]) -> str:
    """What a report attributes, from `results`' numbers: `' Mary' - ' John'`, or `' Mary'`."""
    answer = repr(found["answer"]["text"])
    return answer if found["wrong"] is None else f"{answer} - {found['wrong']['text']!r}"


def _markdown(found: Mapping[str, Any], *, k: int) -> str:
    """`report.md`: the numbers of `results.json` as tables, with the figures inline."""
    tokens = " ".join(f"`{_shown(t)}`" for t in found["token_text"])
    given = "" if found["answer"]["given"] else " (the model's prediction)"
    lines = [
        f"# {found['title'] or 'Inspect a prompt'}",
        "",
        f"Prompt, {len(found['tokens'])} tokens: {tokens}",
        "",
        "Next token: "
        + ", ".join(f"`{_shown(p['text'])}` {p['prob']:.3f}" for p in found["prediction"]),
        "",
        f"Attributed: {attributed(found)}{given}, whose logit"
        f"{' difference' if found['wrong'] else ''} is {found['logit_difference']:.4f}.",
        "",
        f"## Logit lens (ln={found['logit_lens']['ln']})",
        "",
        f"![logit lens]({found['figures']['logit_lens']})",
        "",
        f"At the last position, per layer: the top token and {attributed(found)}.",
        "",
        "| layer | top token | prob | logit (difference) |",
        "| --- | --- | ---: | ---: |",
    ]
    lens = found["logit_lens"]
    for label, texts, probs, value in zip(
        lens["layers"],
        (cells[-1] for cells in lens["top_text"]),
        (cells[-1] for cells in lens["top_probs"]),
        lens["last_position_logit_difference"],
        strict=True,
    ):
        lines.append(f"| {label} | `{_shown(texts[0])}` | {probs[0]:.3f} | {value:.4f} |")
    by_head = found["dla"]["by_head"]
    ranked = sorted((h for h in by_head if h.startswith("L")), key=lambda h: -abs(by_head[h]))
    lines += [
        "",
        "## Direct logit attribution (last position, frozen final LayerNorm)",
        "",
        f"![DLA per head]({found['figures']['dla_heads']})",
        "",
        f"The {min(k, len(ranked))} heads with the largest |DLA|; every row of `results.json`'s "
        "`dla.by_head` (heads, `remainder`, `ln_f.bias`) sums to the logit (difference).",
        "",
        "| head | DLA |",
        "| --- | ---: |",
        *(f"| {h} | {by_head[h]:.4f} |" for h in ranked[:k]),
        "",
        "Per component (the embedding, each block's attention and MLP):",
        "",
        "| component | DLA |",
        "| --- | ---: |",
        *(f"| {c} | {v:.4f} |" for c, v in found["dla"]["by_component"].items()),
        "",
        "## Attention heads",
    ]
    meaning = {
        "previous_token": "attention from each position to the one before it",
        "duplicate_token": "attention to earlier copies of the current token",
        "induction": "attention to the token after an earlier copy of the current token",
    }
    for kind, description in meaning.items():
        lines += ["", f"### {kind.replace('_', '-')} heads", "", f"Score: {description}."]
        scored = found["head_scores"][kind]
        if scored is None:
            lines += ["", "No position of this prompt has such a key: no score."]
            continue
        lines += [
            "",
            ", ".join(f"L{layer}H{head} {score:.3f}" for layer, head, score in scored["top"]),
            "",
            f"![{kind} scores]({found['figures'][f'{kind}_scores']})",
        ]
    if "top_heads" in found["figures"]:
        lines += [
            "",
            "The best head of each kind:",
            "",
            f"![patterns]({found['figures']['top_heads']})",
        ]
    return "\n".join(lines) + "\n"


def _shown(text: str) -> str:
    """A token inside a markdown code span: control characters escaped (`plots.shown`), and
    backticks, which would end the span, as quotes."""
    return plots.shown(text).replace("`", "'")
