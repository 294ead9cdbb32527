"""Logit transforms: pure functions `(logits, context) -> logits` that compose with `chain`.

A transform takes next-token logits `(batch, vocab)` and the tokens seen so far `(batch, seq)`
(prompt included, as HF does for decoder-only models) and returns new logits. In a ragged
batch the context rows are left-padded with `PAD` (-1), which every transform ignores: a
row's penalties and n-grams are its own tokens'. Every transform

- never changes its input in place and returns fp32 (fp16/bf16 logits are upcast first, so the
  arithmetic is fp32);
- keeps the logits it keeps bit-for-bit (filters only write −inf; penalties touch only the
  tokens they name);
- is built by a constructor that validates its arguments at once (`ValueError` naming the
  argument), so `top_p(1.5)` fails where it is written, not at the 300th token;
- shows the call that built it: `repr(chain(temperature(0.8), top_k(200)))` is
  `"chain(temperature(0.8), top_k(200))"`.

The constructors share one wrapper (`_transform`): it upcasts to fp32, carries the shape-typed
signature and the repr, so each constructor writes only its arithmetic.

Semantics follow the references users know:

- `temperature`, `top_k`, `top_p`, `min_p`, `typical_p`, `repetition_penalty`,
  `no_repeat_ngram`: HF `transformers` `generation/logits_process.py` (`TemperatureLogitsWarper`,
  `TopKLogitsWarper`, ...), with `min_tokens_to_keep=1`; tests hold them equal.
- `frequency_penalty`, `presence_penalty`, `logit_bias`: the OpenAI completions API
  (`logits - a * count`, `logits - a * [count > 0]`, `logits + bias`).
- `chain`: optax's `chain`, a left-to-right fold.

Ties are broken by token id (the lower id counts as the more probable) wherever a rule must pick
among equal logits, matching `greedy`; `top_k` keeps all ties at its boundary by default (HF,
nanoGPT) and that policy is an argument.
"""

import inspect
from collections.abc import Callable, Iterable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gpt_fn.checks import (
    check_bool,
    check_int,
    check_number,
    check_token_id,
    check_token_ids,
    check_token_tensor,
)

Transform = Callable[[Float[Tensor, "batch vocab"], Int[Tensor, "batch seq"]], Tensor]
"""`(logits, context) -> logits`, both `(batch, ...)`; see the module docstring for the contract."""

_NEG_INF = float("-inf")
PAD = -1
"""Padding in a context row (decoding left-pads ragged batches): not a token, never counted."""

MIN_TEMPERATURE = 1e-30
"""The smallest positive temperature: `logits / t` stays finite in fp32 for every |logit| up to
3.4e8 (fp32's max times `t`), far beyond what a model produces. Below it fp32 overflows to inf
(and softmax then gives NaN) for ever smaller logits, for every nonzero logit once `t` is under
fp32's smallest normal number (1.2e-38); `t = 1e-30` is already greedy in effect."""


class _Built:
    """A transform made by one of the constructors below: `fn` applied to the logits upcast to
    fp32, shown as the call that built it (`repr(top_k(200))` is `"top_k(200)"`)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], call: str) -> None:
        self._fn, self._call = fn, call

    def __call__(
        self, logits: Float[Tensor, "batch vocab"], context: Int[Tensor, "batch seq"]
    ) -> Float[Tensor, "batch vocab"]:
        return self._fn(logits.float(), context)

    def __repr__(self) -> str:
        return self._call


def _transform(
    constructor: Callable[..., Transform], *args: object, **kwargs: object
) -> Callable[[Callable[[Tensor, Tensor], Tensor]], Transform]:
    """Decorate a constructor's inner `(fp32 logits, context) -> logits` into its transform.

    `args`/`kwargs`: the constructor's validated arguments, for the repr; keywords left at
    their defaults are not shown.
    """
    parameters = inspect.signature(constructor).parameters
    shown = [repr(value) for value in args]
    shown += [f"{k}={v!r}" for k, v in kwargs.items() if v != parameters[k].default]
    call = f"{constructor.__name__}({', '.join(shown)})"
    return lambda fn: _Built(fn, call)


def temperature(t: float | int) -> Transform:
    """Divide logits by `t`; `t == 0` is greedy: only the argmax survives (lowest id on ties).

    `t` is 0 or at least `MIN_TEMPERATURE` (1e-30): a smaller positive `t` overflows fp32
    (`logits / t` = ±inf, then NaN in softmax), so it is refused here rather than at the first
    sample; use `temperature(0)` for greedy.
    """
    t = check_number("temperature", t, at_least=0.0)
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {t!r}: "
            "logits / t would overflow fp32 to inf"
        )

    @_transform(temperature, t)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        if t > 0:
            return logits / t
        # The limit t -> 0 of softmax(logits / t) puts all mass on the argmax; dividing by 0
        # would give NaN (0/0) and ±inf instead.
        return _keep(logits, _scatter_mask(logits.argmax(dim=-1, keepdim=True), logits))

    return apply


def top_k(k: int, *, keep_ties: bool = True) -> Transform:
    """Keep the `k` largest logits per row (all of them when `k >= vocab`).

    `keep_ties=True` (HF `TopKLogitsWarper`, nanoGPT): every logit equal to the k-th largest is
    kept too, so more than `k` may survive. `keep_ties=False`: exactly `min(k, vocab)` survive,
    ties at the boundary going to the lower token ids.
    """
    k = check_int("top_k", k, at_least=1)
    keep_ties = check_bool("keep_ties", keep_ties)

    @_transform(top_k, k, keep_ties=keep_ties)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        kept = min(k, logits.shape[-1])
        if keep_ties:
            kth_largest = torch.topk(logits, kept, dim=-1).values[:, -1:]
            return _keep(logits, logits >= kth_largest)
        order = _sort_descending(logits).indices
        return _keep(logits, _scatter_mask(order[:, :kept], logits))

    return apply


def top_p(p: float | int) -> Transform:
    """Nucleus sampling (Holtzman et al. 2020) with HF's rule, `p` in (0, 1].

    Keep the smallest set of most probable tokens whose probability mass is at least `p`; the
    most probable token always survives. As in HF, the rule runs from the least probable end
    (drop tokens while the mass dropped so far is <= 1 - p): the same set up to rounding, and
    HF's exactly (bit-for-bit on tie-free logits, tested). So `p = 1` drops only tokens whose
    fp32 probability is 0, as HF does.
    """
    p = check_number("top_p", p, above=0.0, at_most=1.0)

    @_transform(top_p, p)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        ascending = _sort_descending(logits).indices.flip(-1)  # lowest-id argmax comes last
        ascending_logits = logits.gather(-1, ascending)
        mass_below = ascending_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = mass_below <= 1 - p
        drop[:, -1] = False  # the argmax survives even when p is tiny
        return _keep(logits, ~_scatter_values(ascending, drop))

    return apply


def min_p(p: float | int) -> Transform:
    """Keep tokens whose probability is at least `p` times the top probability (HF `MinPLogitsWarper`).

    `p` in [0, 1]: 0 keeps everything, 1 keeps only the argmax (and its ties).
    """
    p = check_number("min_p", p, at_least=0.0, at_most=1.0)

    @_transform(min_p, p)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        probs = logits.softmax(dim=-1)
        return _keep(logits, probs >= p * probs.amax(dim=-1, keepdim=True))

    return apply


def typical_p(mass: float | int) -> Transform:
    """Locally typical sampling (Meister et al. 2023) with HF's rule, `mass` in (0, 1).

    Sort tokens by how far their surprisal `-log p` lies from the entropy; keep the closest ones
    until their probability mass reaches `mass`. The most probable token may be dropped; the
    most typical one never is.
    """
    mass = check_number("typical_p", mass, above=0.0, below=1.0)

    @_transform(typical_p, mass)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        log_probs = logits.log_softmax(dim=-1)
        # nansum: a -inf logit contributes 0 * -inf = nan, whose true limit is 0.
        entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)
        atypicality = (-log_probs - entropy).abs()
        by_typicality, order = torch.sort(atypicality, dim=-1, stable=True)
        mass_so_far = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (mass_so_far < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        # The most typical token is never above the boundary, so at least one survives.
        drop = by_typicality > by_typicality.gather(-1, last)
        return _keep(logits, ~_scatter_values(order, drop))

    return apply


def repetition_penalty(penalty: float | int) -> Transform:
    """CTRL's repetition penalty (Keskar et al. 2019) as in HF: for tokens present in the context,
    a negative logit is multiplied by `penalty`, a non-negative one divided by it.

    `penalty > 1` discourages repeats (never raises a seen token's logit), `< 1` encourages them,
    `1` changes nothing. Applied once per token however often it occurs.
    """
    penalty = check_number("repetition_penalty", penalty, above=0.0)

    @_transform(repetition_penalty, penalty)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        seen = _token_counts(context, logits) > 0
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(seen, penalised, logits)

    return apply


def frequency_penalty(a: float | int) -> Transform:
    """Subtract `a` times the number of times each token occurs in the context (OpenAI API)."""
    a = check_number("frequency_penalty", a)

    @_transform(frequency_penalty, a)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        counts = _token_counts(context, logits)
        return torch.where(counts > 0, logits - a * counts, logits)

    return apply


def presence_penalty(a: float | int) -> Transform:
    """Subtract `a` from the logit of every token that occurs in the context (OpenAI API)."""
    a = check_number("presence_penalty", a)

    @_transform(presence_penalty, a)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        return torch.where(_token_counts(context, logits) > 0, logits - a, logits)

    return apply


def logit_bias(bias: Mapping[int, float | int]) -> Transform:
    """Add `bias[id]` to the logit of each token `id` (OpenAI's `logit_bias`); others unchanged."""
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping {{token_id: bias}}, got {bias!r}")
    ids = [check_int("logit_bias token id", token, at_least=0) for token in bias]
    values = [check_number(f"logit_bias[{token}]", bias[token]) for token in bias]

    @_transform(logit_bias, dict(zip(ids, values, strict=True)))
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        _check_ids_in_vocab("logit_bias", ids, logits)
        if not ids:
            return logits
        index = torch.tensor(ids, device=logits.device)
        added = torch.tensor(values, device=logits.device).expand(logits.shape[0], -1)
        return logits.index_add(-1, index, added)  # touches only the named ids

    return apply


def ban_tokens(ids: Iterable[int]) -> Transform:
    """Set the logits of the given token ids to −inf, so they are never sampled."""
    banned = [check_int("ban_tokens id", token, at_least=0) for token in ids]

    @_transform(ban_tokens, banned)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        _check_ids_in_vocab("ban_tokens", banned, logits)
        if not banned:
            return logits
        index = torch.tensor(banned, device=logits.device)
        return logits.index_fill(-1, index, _NEG_INF)

    return apply


def no_repeat_ngram(n: int) -> Transform:
    """Ban every token that would complete an `n`-gram already present in the context (HF).

    With the last `n - 1` context tokens as prefix, each earlier occurrence of that prefix bans
    the token that followed it; `n = 1` bans every token seen.
    """
    n = check_int("no_repeat_ngram", n, at_least=1)

    @_transform(no_repeat_ngram, n)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        if context.shape[1] < n:  # no complete n-gram yet
            return logits
        _check_context(context, logits)
        windows = context.long().unfold(dimension=1, size=n, step=1)  # (batch, window, n)
        prefix = context[:, context.shape[1] - (n - 1) :].long()
        # An n-gram that reaches into a row's padding is no n-gram of the row's.
        matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1) & (windows >= 0).all(-1)
        following = windows[..., -1].clamp(min=0)
        banned = torch.zeros_like(logits).scatter_add(-1, following, matches.float()) > 0
        return logits.masked_fill(banned, _NEG_INF)

    return apply


def chain(*transforms: Transform) -> Transform:
    """Apply `transforms` left to right; `chain()` only upcasts to fp32."""
    for position, transform in enumerate(transforms):
        if not callable(transform):
            raise ValueError(f"chain argument {position} is not a transform: {transform!r}")

    @_transform(chain, *transforms)
    def apply(logits: Tensor, context: Tensor) -> Tensor:
        for transform in transforms:
            logits = transform(logits, context)
        return logits

    return apply


def apply_transform(
    transform: Transform, logits: Float[Tensor, "batch vocab"], context: Int[Tensor, "batch seq"]
) -> Float[Tensor, "batch vocab"]:
    """`transform(logits, context)`, checked: a floating tensor of the logits' shape, else an
    error naming the transform (a wider row would make ids past the vocabulary)."""
    out = transform(logits, context)
    if not isinstance(out, Tensor) or not out.dtype.is_floating_point:
        kind = f"dtype {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"transform {_name(transform)} returned {kind}, not floating-point logits")
    if out.shape != logits.shape:
        raise ValueError(
            f"transform {_name(transform)} returned logits of shape {tuple(out.shape)}, not "
            f"{tuple(logits.shape)} (batch, vocab) like the logits it was given"
        )
    return out


def _name(transform: Transform) -> str:
    """How an error names a transform: the call that built it, or a function's name."""
    if isinstance(transform, _Built):
        return repr(transform)
    return getattr(transform, "__qualname__", None) or repr(transform)


def make_transform(
    *,
    temperature: float | int | None = None,
    top_k: int | None = None,
    top_p: float | int | None = None,
    min_p: float | int | None = None,
    typical_p: float | int | None = None,
    repetition_penalty: float | int | None = None,
    frequency_penalty: float | int | None = None,
    presence_penalty: float | int | None = None,
    no_repeat_ngram: int | None = None,
    logit_bias: Mapping[int, float | int] | None = None,
    ban_tokens: Iterable[int] | None = None,
) -> Transform:
    """One transform from sampling options, `None` meaning "off" (what a CLI's flags map to).

    HF's order: token-level rules first (`logit_bias`, `ban_tokens`, `repetition_penalty`,
    `frequency_penalty`, `presence_penalty`, `no_repeat_ngram`), then `temperature`, then the
    truncations `top_k`, `top_p`, `min_p`, `typical_p`. With every option off it is `chain()`.
    Its repr is the chain it built.
    """
    options = locals()  # the keyword names are the constructors' names (tested)
    return chain(
        *(
            constructor(options[constructor.__name__])
            for constructor in _MAKE_TRANSFORM_ORDER
            if options[constructor.__name__] is not None
        )
    )


_MAKE_TRANSFORM_ORDER: tuple[Callable[..., Transform], ...] = (
    logit_bias,
    ban_tokens,
    repetition_penalty,
    frequency_penalty,
    presence_penalty,
    no_repeat_ngram,
    temperature,
    top_k,
    top_p,
    min_p,
    typical_p,
)
"""The constructors `make_transform` calls, in the order their transforms apply (HF's)."""


def _keep(logits: Tensor, keep: Tensor) -> Tensor:
    return logits.masked_fill(~keep, _NEG_INF)


def _sort_descending(logits: Tensor) -> torch.return_types.sort:
    # stable: equal logits stay in id order, so the lower id counts as more probable.
    return torch.sort(logits, dim=-1, descending=True, stable=True)


def _scatter_mask(index: Tensor, like: Tensor) -> Tensor:
    """A `like`-shaped bool mask, True at `index` (per row)."""
    return torch.zeros_like(like, dtype=torch.bool).scatter(-1, index, True)


def _scatter_values(index: Tensor, values: Tensor) -> Tensor:
    """Undo a sort: put `values[:, j]` at `index[:, j]`."""
    return torch.empty_like(values).scatter(-1, index, values)


def _token_counts(context: Tensor, logits: Tensor) -> Tensor:
    """How often each vocab id occurs in each row of `context`, as fp32 `(batch, vocab)`."""
    _check_context(context, logits)
    real = context != PAD
    counts = torch.zeros_like(logits)
    return counts.scatter_add(-1, context.long().clamp(min=0), real.to(logits.dtype))


def _check_context(context: Tensor, logits: Tensor) -> None:
    """Context ids must index the vocabulary; their values are not read under vmap/compile."""
    check_token_tensor("context", context)
    if context.shape[0] != logits.shape[0]:
        raise ValueError(f"context has {context.shape[0]} rows but logits have {logits.shape[0]}")
    check_token_ids(
        "context token id", context.masked_fill(context == PAD, 0), vocab_size=logits.shape[-1]
    )


def _check_ids_in_vocab(name: str, ids: list[int], logits: Tensor) -> None:
    for token in ids:
        check_token_id(f"{name}: token id", token, vocab_size=logits.shape[-1])
