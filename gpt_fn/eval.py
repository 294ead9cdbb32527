"""Evaluation as pure functions: per-token log-probs, perplexity, bits per byte, multiple choice.

    scores = token_scores(params, tokens, config)           # log p(next token) and is-argmax
    result = perplexity(params, text, config, stride=64)    # sliding windows over a long text
    result = multiple_choice(params, read_choices("hellaswag_val.jsonl"), config)

- Log-probs come from the fused LM head (`gpt_fn.nn.linear_log_probs`): the `(tokens, vocab)`
  logits are computed a chunk of rows at a time and only for positions that are scored.
- `perplexity` is the sliding-window evaluation of Hugging Face's guide "Perplexity of
  fixed-length models": windows of `block_size` tokens starting every `stride` tokens, each
  scoring only the tokens no earlier window scored, so every scored token sees at least
  `block_size - stride` tokens of context. As in that guide, the first token of the text is
  never scored (nothing predicts it), and with `stride == block_size` neither is the first
  token of any window.
- Bits per byte (nanochat's tokenizer-independent metric) is the summed nats of the scored
  tokens over the summed UTF-8 bytes of those tokens, divided by ln 2. `<|endoftext|>` has no
  bytes but its nats count (predicting a document's end is part of modelling the text;
  nanochat leaves special tokens out of both sums; in the Shakespeare val split they are 4 of
  145,460 tokens).
- `multiple_choice` scores each ending as lm-evaluation-harness's `loglikelihood` does
  (`encode_pair`: context and `" " + ending`, the context's trailing spaces moved to the
  ending, left-truncated to the model's window) and reports its `acc` (argmax of the summed
  log-prob), `acc_norm` (divided by the ending's length in characters, lm-eval's definition)
  and `acc_bytes` (by its UTF-8 bytes, lm-eval's `acc_bytes`).

Log-probs are normalised over the model's whole vocabulary, like the training loss; pass
`vocab_size=50257` to normalise over GPT-2's tokenizer ids only (what a checkpoint exported
with `--vocab-size 50257` computes; `gpt_fn.harness` does this).

Every function that runs the model takes `hooks={site: hook}` (`gpt_fn.sites`,
`gpt_fn.hooks`) and applies them at every forward it makes: the scores of a model under an
intervention (ablated heads, a steering vector, an SAE spliced in). `perplexity`,
`score_continuations` and `multiple_choice` batch rows padded on the right, so position `p` of
a hook's activation is token `p` of each row (of each window, for `perplexity`); which rows
share a batch is the evaluation's choice, so a hook should treat every row alike. A `logits`
hook gets the `(batch, seq, vocab)` logits over the model's whole vocabulary, which are then
materialised for the whole batch (lower `batch_size` if they do not fit); without one the
fused LM head never builds them, and `hooks=None` runs exactly the unhooked code.

References: HF transformers docs, `perplexity.md`; karpathy/nanochat `nanochat/loss_eval.py`
(`evaluate_bpb`); EleutherAI lm-evaluation-harness `api/model.py` (`TemplateLM`), `api/task.py`
(multiple-choice metrics); Zellers et al. 2019 (HellaSwag).
"""

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Integer
from torch import Tensor

from gpt_fn.checks import check_bool, check_int, check_token_ids
from gpt_fn.config import GPTConfig
from gpt_fn.model import (
    TokenRows,
    check_params,
    check_tokens,
    empty_cache,
    lm_head,
    transformer,
)
from gpt_fn.nn import AttentionKernel, TokenLogProbs, linear_log_probs
from gpt_fn.nn.cross_entropy import DEFAULT_CHUNK_SIZE
from gpt_fn.nn.padding import as_batch, pad
from gpt_fn.shapes import Params
from gpt_fn.sites import Hook, Hooks, apply_hook, check_hooks
from gpt_fn.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2

Progress = Callable[[int], object]
"""Called with how many windows / continuations a batch finished (`tqdm.update` fits)."""
DEFAULT_BATCH_SIZE = 8


class TokenScores(NamedTuple):
    """What the model says about each next token of a batch."""

    logprobs: Float[Tensor, "batch next"]
    """`log p(tokens[:, t + 1] | tokens[:, : t + 1])`; 0 where that token is not scored."""
    greedy: Bool[Tensor, "batch next"]
    """Whether `tokens[:, t + 1]` is the model's argmax there; False where not scored."""
    scored: Bool[Tensor, "batch next"]
    """Which positions are scored: the token and the one before it are both real."""


def token_scores(
    params: Params,
    tokens: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    positions: Bool[Tensor, "batch next"] | None = None,
    vocab_size: int | None = None,
    attention: AttentionKernel = "sdpa",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    hooks: Hooks | None = None,
) -> TokenScores:
    """Log-prob of every next token of `tokens` (`(batch, seq - 1)`), and whether it is the argmax.

    `tokens`: a `(batch, seq)` tensor (padded on either side, with `attention_mask`, 1 = real)
    or token lists of any lengths (padded on the right). A row may hold `block_size + 1`
    tokens: the model reads the first `seq - 1` and scores the last `seq - 1`. A position is
    scored when the token and its predecessor are real (and, with `positions`, where it is
    True: the LM head then runs only there); elsewhere the log-prob is 0, so
    `.logprobs.sum(1)` is each row's total. `vocab_size`: normalise over the first
    `vocab_size` ids only (default: the model's whole vocabulary). `hooks`: `{site: hook}`
    applied in the forward over `tokens[:, :-1]` (see the module docstring). Runs without
    gradients.
    """
    check_params(params, config)
    if hooks is not None:
        check_hooks(hooks, config)
    wte = params["wte.weight"]
    tokens, mask = as_batch(tokens, attention_mask, side="right", device=wte.device)
    if tokens.ndim == 2 and tokens.shape[1] > config.block_size + 1:
        raise ValueError(
            f"rows of {tokens.shape[1]} tokens are longer than block_size + 1 = "
            f"{config.block_size + 1}; use perplexity() for long texts"
        )
    check_tokens(tokens, config, cropped=True)
    head = _head(wte, config, vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if mask is None:
        scored = torch.ones_like(targets, dtype=torch.bool)
    else:
        scored = mask[:, :-1] & mask[:, 1:]
    if positions is not None:
        if positions.dtype != torch.bool or positions.shape != targets.shape:
            raise ValueError(
                f"positions must be a bool tensor of shape {tuple(targets.shape)} (batch, seq - 1), "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        scored = scored & positions.to(scored.device)
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=wte.device)
    greedy = torch.zeros(targets.shape, dtype=torch.bool, device=wte.device)
    if inputs.shape[1] == 0 or not bool(scored.any()):
        return TokenScores(logprobs, greedy, scored)
    with torch.no_grad():
        input_mask = None if mask is None else mask[:, :-1]
        if input_mask is not None and bool(input_mask.all()):
            input_mask = None
        if input_mask is not None:
            # A row whose inputs are all padding scores nothing; give it one real token so
            # the mask stays valid (its outputs are discarded).
            input_mask = input_mask.clone()
            input_mask[~input_mask.any(1), -1] = True
        hidden, _ = transformer(
            params, inputs, config, attention=attention, attention_mask=input_mask, hooks=hooks
        )
        if hooks and "logits" in hooks:
            logits = lm_head(params, hidden)
            rows = _log_probs(logits, hooks["logits"], scored, targets, len(head))
        else:
            rows = linear_log_probs(hidden[scored], head, targets[scored], chunk_size=chunk_size)
        logprobs = logprobs.to(rows.logprobs.dtype).masked_scatter(scored, rows.logprobs)
        greedy = greedy.masked_scatter(scored, rows.greedy)
    return TokenScores(logprobs, greedy, scored)


def token_logprobs(
    params: Params,
    tokens: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    vocab_size: int | None = None,
    attention: AttentionKernel = "sdpa",
    hooks: Hooks | None = None,
) -> Float[Tensor, "batch next"]:
    """`log p` of every next token, `(batch, seq - 1)`: `token_scores(...).logprobs`."""
    scores = token_scores(
        params, tokens, config, attention_mask=attention_mask, vocab_size=vocab_size,
        attention=attention, hooks=hooks,
    )  # fmt: skip
    return scores.logprobs


def _log_probs(
    logits: Tensor, hook: Hook, scored: Tensor, targets: Tensor, vocab_size: int
) -> TokenLogProbs:
    """`linear_log_probs`'s answer from the `logits` hook's output at the scored positions."""
    chosen = targets[scored][:, None]
    check_token_ids("target", chosen, vocab_size=vocab_size)
    hooked = apply_hook("logits", hook, logits)[scored][:, :vocab_size]
    wide = hooked.to(torch.promote_types(hooked.dtype, torch.float32))
    logprobs = (wide.gather(1, chosen) - torch.logsumexp(wide, 1, keepdim=True))[:, 0]
    return TokenLogProbs(logprobs, wide.argmax(1) == chosen[:, 0])


def _head(wte: Tensor, config: GPTConfig, vocab_size: int | None) -> Tensor:
    if vocab_size is None:
        return wte
    check_int("vocab_size", vocab_size, at_least=1)
    if vocab_size > config.vocab_size:
        raise ValueError(
            f"vocab_size must be at most the model's vocab_size={config.vocab_size}, got "
            f"{vocab_size}"
        )
    return wte[:vocab_size]


# ---------------------------------------------------------------------------------------------
# Bytes


@functools.cache
def _gpt2_token_bytes() -> np.ndarray:
    encoding = gpt2()
    lengths = np.array(
        [len(encoding.decode_single_token_bytes(t)) for t in range(GPT2_VOCAB_SIZE)],
        dtype=np.int64,
    )
    lengths[EOT_TOKEN] = 0  # a marker between documents, not text
    lengths.setflags(write=False)
    return lengths


def token_bytes(
    vocab_size: int = GPT2_VOCAB_SIZE, *, device: torch.device | str | None = None
) -> Int[Tensor, " vocab"]:
    """UTF-8 bytes of each GPT-2 token id: 0 for `<|endoftext|>` and for ids past the
    tokenizer's 50257 (a model's padded vocabulary rows)."""
    check_int("vocab_size", vocab_size, at_least=1)
    lengths = np.zeros(vocab_size, dtype=np.int64)
    known = min(vocab_size, GPT2_VOCAB_SIZE)
    lengths[:known] = _gpt2_token_bytes()[:known]
    return torch.from_numpy(lengths).to(device)


def count_bytes(tokens: Integer[Tensor, "*shape"] | Integer[np.ndarray, "*shape"]) -> int:
    """UTF-8 bytes the GPT-2 token ids `tokens` decode to (`<|endoftext|>` counts 0)."""
    ids = tokens.detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    ids = ids.astype(np.int64, copy=False).ravel()
    if ids.size and (ids.min() < 0):
        raise ValueError(f"token id {int(ids.min())} is negative")
    lengths = _gpt2_token_bytes()
    inside = ids < len(lengths)
    return int(lengths[ids[inside]].sum())


def bits_per_byte(
    loss: float | Float[Tensor, ""],
    targets: Integer[Tensor, "*shape"] | Integer[np.ndarray, "*shape"],
) -> float:
    """Bits per byte of a mean next-token loss (nats) over `targets`, GPT-2 token ids:
    `loss * targets.size / (ln 2 * bytes of targets)`.

    For a training loop's val loss: `bits_per_byte(val_loss, y)` with `y` the targets it was
    averaged over (all eval batches' `y` together when they are the same size). Equal to
    `perplexity(...).bits_per_byte` when `loss` is the mean over exactly its scored tokens.
    """
    loss = float(loss)
    if not math.isfinite(loss):
        raise ValueError(f"loss must be finite, got {loss}")
    count = int(np.prod(targets.shape))
    if count == 0:
        raise ValueError("targets is empty: bits per byte over no tokens is undefined")
    n_bytes = count_bytes(targets)
    if n_bytes == 0:
        raise ValueError("targets decode to no bytes: bits per byte is undefined")
    return loss * count / (math.log(2) * n_bytes)


# ---------------------------------------------------------------------------------------------
# Perplexity of a long text


class Window(NamedTuple):
    """Tokens `begin:end` go through the model; targets `first:end` are scored."""

    begin: int
    end: int
    first: int


def sliding_windows(n_tokens: int, *, block_size: int, stride: int) -> list[Window]:
    """The windows of HF's "Perplexity of fixed-length models" loop over `n_tokens` tokens.

    Windows of up to `block_size` tokens start every `stride` tokens until one reaches the
    end; each scores the targets after the previous window's end (the first window: from
    token 1). Windows that would score nothing are left out.
    """
    check_int("n_tokens", n_tokens, at_least=0)
    check_int("block_size", block_size, at_least=1)
    check_int("stride", stride, at_least=1)
    if stride > block_size:
        raise ValueError(
            f"stride must be at most block_size={block_size} (windows would skip tokens), "
            f"got {stride}"
        )
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        first = max(previous_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        previous_end = end
        if end == n_tokens:
            break
    return windows


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """The sliding-window evaluation of one text."""

    tokens: int
    """Tokens scored (the text's tokens less the first, and with `stride == block_size` less
    each window's first)."""
    bytes: int
    """UTF-8 bytes of the scored tokens."""
    nats: float
    """Summed negative log-likelihood of the scored tokens."""
    windows: int
    block_size: int
    stride: int

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        """nats / (ln 2 * bytes); NaN when the scored tokens have no bytes."""
        return self.nats / (math.log(2) * self.bytes) if self.bytes else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "nats_per_token": self.nats_per_token,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def encode_text(text: str) -> list[int]:
    """A plain text's GPT-2 tokens (`<|endoftext|>` written in it is text, as `gpt-fn prepare`
    reads corpora)."""
    return gpt2().encode_ordinary(text)


def perplexity(
    params: Params,
    text_or_tokens: str | Sequence[int] | Integer[Tensor, " n"] | Integer[np.ndarray, " n"],
    config: GPTConfig,
    *,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vocab_size: int | None = None,
    attention: AttentionKernel = "sdpa",
    progress: Progress | None = None,
    hooks: Hooks | None = None,
) -> Perplexity:
    """Nats per token, perplexity and bits per byte of a long text, window by window.

    `text_or_tokens`: a string (GPT-2 tokens via `encode_text`) or GPT-2 token ids (a list, a
    1-D tensor, a uint16 memmap such as a prepared `val.bin`). `stride` (default
    `block_size // 2`, the guide's choice): how far each window starts after the last.
    `batch_size` windows go through the model together. `progress(n)` after each batch.
    `hooks`: `{site: hook}` applied in every window's forward (position `p` is the window's
    token `p`).
    """
    check_params(params, config)
    if hooks is not None:
        check_hooks(hooks, config)
    if stride is None:
        stride = max(1, config.block_size // 2)
    check_int("batch_size", batch_size, at_least=1)
    if isinstance(text_or_tokens, str):
        ids = np.asarray(encode_text(text_or_tokens), dtype=np.int64)
    else:
        if isinstance(text_or_tokens, Tensor):
            text_or_tokens = text_or_tokens.detach().cpu().numpy()
        ids = np.asarray(text_or_tokens)
        if ids.size and ids.dtype.kind not in "iu":  # a float or a bool is no token id
            raise ValueError(f"tokens must be integer ids, got {ids.dtype} values")
        ids = ids.astype(np.int64)
    if ids.ndim != 1:
        raise ValueError(f"tokens must be one sequence (1-D), got shape {ids.shape}")
    if len(ids) < 2:
        raise ValueError(
            f"the text has {len(ids)} token(s); perplexity needs at least 2 (the first token "
            "is context only)"
        )
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise ValueError(f"token id {bad} is outside [0, vocab_size={config.vocab_size})")
    windows = sliding_windows(len(ids), block_size=config.block_size, stride=stride)
    lengths = _gpt2_token_bytes()
    device = params["wte.weight"].device
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        rows = [ids[w.begin : w.end].tolist() for w in batch]
        # Output column j predicts token begin + 1 + j: score the ones from `first` on.
        columns = torch.arange(max(w.end - w.begin for w in batch) - 1, device=device)
        offsets = torch.tensor([w.first - w.begin - 1 for w in batch], device=device)
        keep = columns >= offsets[:, None]
        scores = token_scores(
            params,
            rows,
            config,
            positions=keep,
            vocab_size=vocab_size,
            attention=attention,
            hooks=hooks,
        )
        nats -= float(scores.logprobs[scores.scored].double().sum())
        for w in batch:
            targets = ids[w.first : w.end]
            n_tokens += len(targets)
            n_bytes += int(lengths[targets[targets < len(lengths)]].sum())
        if progress is not None:
            progress(len(batch))
    return Perplexity(
        tokens=n_tokens,
        bytes=n_bytes,
        nats=nats,
        windows=len(windows),
        block_size=config.block_size,
        stride=stride,
    )


# ---------------------------------------------------------------------------------------------
# Continuations and multiple choice


class ContinuationScore(NamedTuple):
    """lm-evaluation-harness's answer to a `loglikelihood` request."""

    logprob: float
    """Summed log-prob of the continuation's tokens given the context."""
    greedy: bool
    """Whether greedy decoding from the context would produce exactly the continuation."""


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """GPT-2 tokens of a context and its continuation, split as lm-evaluation-harness does.

    The context's trailing whitespace moves to the continuation, `context + continuation` is
    encoded whole and the continuation is what follows the context's own tokens (so a word is
    tokenized as it is in running text). An empty context becomes `<|endoftext|>`, the token
    GPT-2 saw before every document. `<|endoftext|>` written in either string is that token,
    as Hugging Face's tokenizer reads it.
    """
    encoding = gpt2()

    def encode(text: str) -> list[int]:
        return encoding.encode(text, allowed_special="all")

    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    if context == "":
        cont = encode(continuation)
        if cont and cont[0] == EOT_TOKEN:
            return cont[:1], cont[1:]
        return [EOT_TOKEN], cont
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx) :]


def score_continuations(
    params: Params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    config: GPTConfig,
    *,
    max_length: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vocab_size: int | None = None,
    attention: AttentionKernel = "sdpa",
    progress: Progress | None = None,
    hooks: Hooks | None = None,
) -> list[ContinuationScore]:
    """For each `(context tokens, continuation tokens)`, the continuation's summed log-prob
    given the context and whether it is the greedy continuation, in the order given.

    As lm-evaluation-harness's `HFLM._loglikelihood_tokens`: the model reads the last
    `max_length` (default `block_size`) tokens before each continuation token, so a long
    context is cut on the left; requests run longest first, `batch_size` at a time. `hooks`:
    `{site: hook}` applied in every forward (position `p` is the row's token `p`, after the cut).
    """
    check_params(params, config)
    if hooks is not None:
        check_hooks(hooks, config)
    check_int("batch_size", batch_size, at_least=1)
    max_length = config.block_size if max_length is None else max_length
    check_int("max_length", max_length, at_least=1)
    if max_length > config.block_size:
        raise ValueError(
            f"max_length must be at most block_size={config.block_size}, got {max_length}"
        )
    rows: list[list[int]] = []
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(
                f"request {index}: context and continuation need at least one token each "
                f"(got {len(context)} and {len(continuation)})"
            )
        if len(continuation) > max_length:
            raise ValueError(
                f"request {index}: the continuation has {len(continuation)} tokens, more than "
                f"the model's window of {max_length}"
            )
        rows.append([*context, *continuation][-(max_length + 1) :])
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i]))
    results: list[ContinuationScore | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # Only the continuation's positions (the last ones of each row) need the LM head.
        spans = [slice(len(rows[i]) - 1 - len(requests[i][1]), len(rows[i]) - 1) for i in chunk]
        keep = torch.zeros(len(chunk), len(rows[chunk[0]]) - 1, dtype=torch.bool)
        for row, span in enumerate(spans):
            keep[row, span] = True
        scores = token_scores(
            params,
            [rows[i] for i in chunk],
            config,
            positions=keep.to(params["wte.weight"].device),
            vocab_size=vocab_size,
            attention=attention,
            hooks=hooks,
        )
        logprobs, greedy = scores.logprobs.double().cpu(), scores.greedy.cpu()
        for row, (i, span) in enumerate(zip(chunk, spans, strict=True)):
            results[i] = ContinuationScore(
                float(logprobs[row, span].sum()), bool(greedy[row, span].all())
            )
        if progress is not None:
            progress(len(chunk))
    return results  # type: ignore[return-value]


def score_endings(
    params: Params,
    items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    config: GPTConfig,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vocab_size: int | None = None,
    attention: AttentionKernel = "sdpa",
    progress: Progress | None = None,
) -> list[list[float]]:
    """For each `(context tokens, [ending tokens, ...])`, each ending's summed log-prob given
    the context: `score_continuations` over `(context, ending)` pairs, with each context run
    once and its endings scored from its KV cache.

    `batch_size` items run at a time, longest contexts first: their contexts as one
    left-padded batch, then their endings over the contexts' caches (a context's cache
    repeated once per ending), longest first, as many to a call as the batch has items; one
    LM head pass, without the argmax, scores every ending token of the batch. An item whose
    context plus longest ending does not fit in `block_size + 1` tokens is scored by
    `score_continuations`, which cuts the context on the left as lm-eval does. `progress(n)`
    counts endings. Runs without gradients.
    """
    check_params(params, config)
    check_int("batch_size", batch_size, at_least=1)
    head = _head(params["wte.weight"], config, vocab_size)
    for index, (context, endings) in enumerate(items):
        if not context or not endings or not all(endings):
            raise ValueError(f"item {index}: the context and every ending need at least one token")
    fits = [
        len(context) + max(len(e) for e in endings) <= config.block_size + 1
        for context, endings in items
    ]
    results: list[list[float]] = [[] for _ in items]
    long = [i for i, fit in enumerate(fits) if not fit]
    if long:
        pairs = [(items[i][0], ending) for i in long for ending in items[i][1]]
        scores = iter(
            score_continuations(
                params,
                pairs,
                config,
                batch_size=batch_size,
                vocab_size=vocab_size,
                attention=attention,
                progress=progress,
            )
        )
        for i in long:
            results[i] = [next(scores).logprob for _ in items[i][1]]
    # Contexts of similar lengths share a batch: little of its left padding is computed.
    fitting = sorted((i for i, fit in enumerate(fits) if fit), key=lambda i: -len(items[i][0]))
    for chunk in _fitting_batches(items, fitting, config, batch_size):
        sums = _shared_context_sums(params, [items[i] for i in chunk], config, head, attention)
        for i, item_sums in zip(chunk, sums, strict=True):
            results[i] = item_sums
        if progress is not None:
            progress(sum(len(items[i][1]) for i in chunk))
    return results


def _fitting_batches(
    items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    indices: list[int],
    config: GPTConfig,
    batch_size: int,
) -> list[list[int]]:
    """`indices` in order, cut into batches of at most `batch_size` items whose longest context
    plus longest ending fits in `block_size + 1` tokens: every padded slot of the endings'
    batch then has a position the model knows."""
    batches: list[list[int]] = []
    longest_context = longest_ending = 0
    for i in indices:
        context = len(items[i][0])
        ending = max(len(e) for e in items[i][1])
        widest = max(longest_context, context) + max(longest_ending, ending)
        if not batches or len(batches[-1]) == batch_size or widest > config.block_size + 1:
            batches.append([])
            longest_context = longest_ending = 0
        batches[-1].append(i)
        longest_context, longest_ending = max(longest_context, context), max(longest_ending, ending)
    return batches


def _shared_context_sums(
    params: Params,
    items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    config: GPTConfig,
    head: Tensor,
    attention: AttentionKernel,
) -> list[list[float]]:
    """`score_endings` for items that fit in the model's window: their contexts as one batch,
    then their endings in groups of similar lengths, one LM head pass over every scored row."""
    device = params["wte.weight"].device
    context_tokens, context_mask = pad([list(c) for c, _ in items], side="left", device=device)
    check_tokens(context_tokens, config)
    endings = [list(ending) for _, item_endings in items for ending in item_endings]
    owner = [i for i, (_, item_endings) in enumerate(items) for _ in item_endings]
    with torch.no_grad():
        cache = empty_cache(
            config,
            batch=len(items),
            capacity=context_tokens.shape[1] + max(len(e) for e in endings) - 1,
            starts=(~context_mask).sum(1),
            dtype=params["wte.weight"].dtype,
            device=device,
        )
        context_hidden, cache = transformer(
            params, context_tokens, config, attention=attention, cache=cache, write="in_place"
        )
        # Ending token j is predicted by the context's last position (j = 0) or by ending
        # position j - 1: each ending's first token is scored from its item's last context
        # row, the rest from the ending run without its last token after its context's cache.
        hidden = [context_hidden[torch.tensor(owner, device=device), -1]]
        targets = [torch.tensor([e[0] for e in endings], device=device)]
        ending_of_row = [torch.arange(len(endings), device=device)]
        # Endings run longest first, one item's count to a call, so few of their slots are
        # padding (a batch's endings padded to its longest would be ~40% padding on
        # HellaSwag-like lengths).
        longest_first = sorted(
            (j for j, e in enumerate(endings) if len(e) > 1), key=lambda j: -len(endings[j])
        )
        for start in range(0, len(longest_first), len(items)):
            group = longest_first[start : start + len(items)]
            tokens, mask = pad([endings[j] for j in group], side="right", device=device)
            check_tokens(tokens, config)
            rows = torch.tensor([owner[j] for j in group], device=device)
            group_hidden, _ = transformer(
                params,
                tokens[:, :-1],
                config,
                attention=attention,
                cache=cache.select(rows),  # a copy: written in place
                write="in_place",
            )
            scored = mask[:, 1:]
            hidden.append(group_hidden[scored])
            targets.append(tokens[:, 1:][scored])
            group_index = torch.tensor(group, device=device)
            ending_of_row.append(group_index[:, None].expand_as(scored)[scored])
        rows = linear_log_probs(torch.cat(hidden), head, torch.cat(targets), greedy=False)
    sums = (
        torch.zeros(len(endings), dtype=torch.float64, device=device)
        .index_add_(0, torch.cat(ending_of_row), rows.logprobs.double())
        .cpu()
        .tolist()
    )
    out, position = [], 0
    for _, item_endings in items:
        out.append(sums[position : position + len(item_endings)])
        position += len(item_endings)
    return out


class Choice(NamedTuple):
    """A multiple-choice item: a context, its candidate endings, the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


def parse_choice(item: object, *, where: str = "item") -> Choice:
    """A `Choice` from HellaSwag's layout: `{"ctx": str, "endings": [str, ...], "label": int}`.

    `label` may be a digit string (the Hugging Face dataset's). `ValueError` names `where`.
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in item]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    context, endings, label = item["ctx"], item["endings"], item["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'ctx' must be a string, got {type(context).__name__}")
    if (
        not isinstance(endings, list | tuple)
        or len(endings) < 2
        or not all(isinstance(e, str) and e for e in endings)
    ):
        raise ValueError(f"{where}: 'endings' must be a list of at least 2 non-empty strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: 'label' must be an integer, got {label!r}")
    if not 0 <= label < len(endings):
        raise ValueError(
            f"{where}: label {label} is out of range for {len(endings)} endings "
            f"(0 to {len(endings) - 1})"
        )
    return Choice(context, tuple(endings), label)


def read_choices(path: str | Path) -> list[Choice]:
    """The items of a HellaSwag-style jsonl file (one JSON object a line; blank lines skipped).

    Errors name the file and the line: a missing file (`FileNotFoundError`), a line that is not
    JSON, lacks a field or has a label outside its endings (`ValueError`), no items at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                item = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            items.append(parse_choice(item, where=where))
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


@dataclasses.dataclass(frozen=True)
class ChoiceResults:
    """Accuracy over multiple-choice items, and each ending's summed log-prob."""

    items: int
    acc: float
    """Share of items whose right ending has the highest summed log-prob."""
    acc_norm: float
    """The same with each sum divided by its ending's length in characters (lm-eval)."""
    acc_bytes: float
    """The same with each sum divided by its ending's UTF-8 bytes (lm-eval's `acc_bytes`)."""
    logprobs: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def multiple_choice(
    params: Params,
    items: Sequence[Choice | Mapping[str, Any]],
    config: GPTConfig,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vocab_size: int | None = None,
    attention: AttentionKernel = "sdpa",
    progress: Progress | None = None,
    hooks: Hooks | None = None,
    share_context: bool = False,
) -> ChoiceResults:
    """`acc`, `acc_norm` and `acc_bytes` of the model on `items` (`Choice`s, or mappings in
    HellaSwag's layout), scoring `" " + ending` after each context as lm-eval does.

    Ties go to the first ending (numpy's argmax, as lm-eval). `progress(n)` counts endings.
    `hooks`: `{site: hook}` applied in every forward (`score_continuations`).
    `share_context=True` runs each item's context once and scores its endings from that
    context's KV cache (`score_endings`): the same log-probs to rounding (≤ 1e-5 in fp32), for
    a fraction of the compute when contexts are longer than endings. It takes no `hooks`: the
    context and the endings run as two calls, so a hook would see other positions.
    """
    if not items:
        raise ValueError("items is empty: accuracy over no items is undefined")
    check_bool("share_context", share_context)
    if share_context and hooks is not None:
        raise ValueError(
            "share_context=True runs contexts and endings in separate calls, where hooks would "
            "see other positions; score with hooks using share_context=False"
        )
    choices = [
        item if isinstance(item, Choice) else parse_choice(item, where=f"item {index}")
        for index, item in enumerate(items)
    ]
    groups = [[encode_pair(c.context, " " + ending) for ending in c.endings] for c in choices]
    if share_context:
        item_sums = score_endings(
            params,
            [(group[0][0], [ending for _, ending in group]) for group in groups],
            config,
            batch_size=batch_size,
            vocab_size=vocab_size,
            attention=attention,
            progress=progress,
        )
    else:
        scores = score_continuations(
            params,
            [request for group in groups for request in group],
            config,
            batch_size=batch_size,
            vocab_size=vocab_size,
            attention=attention,
            progress=progress,
            hooks=hooks,
        )
        item_sums, position = [], 0
        for choice in choices:
            count = len(choice.endings)
            item_sums.append([score.logprob for score in scores[position : position + count]])
            position += count
    logprobs = []
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for choice, sums in zip(choices, item_sums, strict=True):
        logprobs.append(tuple(sums))
        chars = [len(e) for e in choice.endings]
        n_bytes = [len(e.encode("utf-8")) for e in choice.endings]
        for name, values in (
            ("acc", sums),
            ("acc_norm", [s / n for s, n in zip(sums, chars, strict=True)]),
            ("acc_bytes", [s / n for s, n in zip(sums, n_bytes, strict=True)]),
        ):
            hits[name] += int(values.index(max(values)) == choice.label)
    n = len(choices)
    return ChoiceResults(
        items=n,
        acc=hits["acc"] / n,
        acc_norm=hits["acc_norm"] / n,
        acc_bytes=hits["acc_bytes"] / n,
        logprobs=tuple(logprobs),
    )
