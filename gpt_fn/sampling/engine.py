"""The decoding engine: a KV cache, prefill and one step forward over an explicit state.

    state = prefill(params, prompts, config)                  # one forward over the prompts
    state = decode_step(params, state, next_tokens, config)   # one token per row (pure)
    state = decode_step_(params, state, next_tokens, config)  # the same, written in place

Every decoder (`generate`, `beam_search`, `speculative_generate`) runs on these names:
`prompt_tokens` (prompts as one left-padded tensor, checked), `prefill_state` and
`advance_state` (`prefill`/`decode_step` without their argument checks, for decoders that check
once per call), `cached_step` (the blocks over a cache with room: what `generate(compile=True)`
compiles), `next_logits` (the LM head, `decoding_head`, at each row's last position),
`pick_tokens` (transform, check, argmax or draw) and `in_prompt_kind` (the result in the
prompt's kind).

Prompts are a `(batch, seq)` tensor, left-padded with an `attention_mask` (1 = a real token)
when their lengths differ, or token lists of any lengths, which gpt_fn pads on the left.
Each row's positions count only its real tokens and no query attends to padding, so every
row of a ragged batch decodes what its prompt decodes alone.

`DecodeState` is the whole state of a decode: tokens so far (left-padded with `PAD`, -1), the
KV cache (`KVCache`, from `gpt_fn.nn.kv_cache`: per layer one preallocated key and value
buffer, no copy of the past per step) or `None` when decoding without one, and the next-token
logits. A step attends over the slots filled so far (a slice of the buffers), so its cost
follows the tokens written, not the capacity. A cache out of room grows to the next bucket
(`cache_bucket`: a power of two, at least 64 slots, at most `block_size`; the past copied
once); `generate` starts each cache at its prompt's bucket. A compiled step attends the
filled slots too (their count a dynamic size), so it compiles at most twice per batch size
(the slots as part of the buffers, and as all of them), whatever the lengths and capacities.
`decode_step` returns a new state and leaves the old one valid (it copies the cache buffers,
as growing them with `torch.cat` did); `decode_step_` writes the new keys/values into the
buffers the old state shares, so only the new state may be stepped on.

Context longer than `block_size`. The model has `block_size` positions. When a row outgrows
them, the model sees only its last `block_size` tokens (nanoGPT's crop,
`idx[:, -block_size:]`): once the longest row is full, every step re-prefills each row's last
`block_size` tokens (one full forward per step), so cached decoding stays exactly equal to
uncached decoding of the cropped context. Transforms still see the whole sequence.

Hooks (`hooks={site: fn}`, `gpt_fn.sites`) see the activations of the positions computed in
each call: the prompt's at prefill, one token per row at each decode step. So steering that
adds a vector at every position gives the same tokens cached and uncached.
"""

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt_fn.checks import check_bool, check_int, check_token_ids, check_token_tensor, is_traced
from gpt_fn.config import GPTConfig
from gpt_fn.model import (
    TokenRows,
    check_params,
    check_tokens,
    lm_head,
    transformer,
)
from gpt_fn.nn import AttentionKernel
from gpt_fn.nn.kv_cache import KVCache, empty_cache
from gpt_fn.nn.padding import as_batch
from gpt_fn.sampling import samplers
from gpt_fn.sampling.head import LMHead, decoding_head
from gpt_fn.sampling.transforms import PAD, Transform, apply_transform
from gpt_fn.shapes import Params
from gpt_fn.sites import Hooks, apply_hook, check_hooks

__all__ = [
    "DecodeState",
    "KVCache",
    "LMHead",
    "advance_state",
    "cache_bucket",
    "cached_step",
    "decode_step",
    "decode_step_",
    "decoding_head",
    "empty_cache",
    "fan_out",
    "in_prompt_kind",
    "next_logits",
    "pick_tokens",
    "prefill",
    "prefill_state",
    "prompt_tokens",
]


class DecodeState(NamedTuple):
    """Everything a decode step needs besides the parameters."""

    tokens: Int[Tensor, "batch seq"]
    """The prompts and every token generated so far (not cropped), left-padded with `PAD`."""
    cache: KVCache | None
    """Keys/values of each row's window (its last `<= block_size` tokens); `None`: uncached."""
    logits: Float[Tensor, "batch vocab"]
    """Next-token logits after `tokens`."""
    longest: int
    """The most real tokens any row holds."""

    @property
    def mask(self) -> Bool[Tensor, "batch seq"]:
        """Which of `tokens` are real (not padding)."""
        return self.tokens != PAD

    def select(self, rows: Int[Tensor, " rows"]) -> "DecodeState":
        """The state of `rows` (in that order, repeats allowed): fan-out, beam reordering,
        dropping finished rows. The cache buffers are copied, so both states stay valid."""
        tokens = self.tokens.index_select(0, rows)
        return DecodeState(
            tokens,
            None if self.cache is None else self.cache.select(rows),
            self.logits.index_select(0, rows),
            int((tokens != PAD).sum(dim=1).max()) if len(rows) else 0,
        )


def prefill(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    capacity: int | None = None,
    use_cache: bool = True,
    attention: AttentionKernel = "sdpa",
    hooks: Hooks | None = None,
) -> DecodeState:
    """Run the prompts (each row's last `block_size` tokens) through the model once.

    `capacity`: cache slots per row (default `block_size`: room until the longest row is
    full); a prompt needs at most that many after cropping.
    """
    check_params(params, config)
    tokens = prompt_tokens(prompt, attention_mask, config, params)
    check_bool("use_cache", use_cache)
    if capacity is not None:
        check_int("capacity", capacity, at_least=1)
    if hooks is not None:
        check_hooks(hooks, config)
    return prefill_state(
        params,
        tokens,
        config,
        capacity=capacity,
        use_cache=use_cache,
        attention=attention,
        hooks=hooks,
        head=decoding_head(params, rows=tokens.shape[0]),
    )


def decode_step(
    params: Params,
    state: DecodeState,
    next_tokens: Int[Tensor, " batch"],
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    hooks: Hooks | None = None,
) -> DecodeState:
    """Append one token per row and compute the logits after it; `state` stays valid.

    With a cache, only the new tokens go through the model (a cache out of room grows first).
    Without one, or once the longest row is full, each row's last `block_size` tokens run
    through it (see the module docstring); a cached state stays cached.
    """
    return _checked_step(params, state, next_tokens, config, attention, hooks, write="copy")


def decode_step_(
    params: Params,
    state: DecodeState,
    next_tokens: Int[Tensor, " batch"],
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    hooks: Hooks | None = None,
) -> DecodeState:
    """`decode_step` writing into the cache buffers `state` holds: no copy, `state` is used up."""
    return _checked_step(params, state, next_tokens, config, attention, hooks, write="in_place")


def fan_out(state: DecodeState, n: int) -> DecodeState:
    """Each row repeated `n` times in a row (`[r0, r0, r1, r1]` for n=2): prefill once, sample n."""
    check_int("num_samples", n, at_least=1)
    if n == 1:
        return state
    rows = torch.arange(state.tokens.shape[0], device=state.tokens.device).repeat_interleave(n)
    return state.select(rows)


def prefill_state(
    params: Params,
    tokens: Int[Tensor, "batch seq"],
    config: GPTConfig,
    *,
    capacity: int | None,
    use_cache: bool,
    attention: AttentionKernel,
    hooks: Hooks | None,
    head: LMHead,
) -> DecodeState:
    """A state for `tokens` (left-padded with PAD, as `prompt_tokens` makes them): each row's
    last <= block_size tokens run. `prefill` without its argument checks, for the decoders
    (`generate`, `beam_search`, `speculative_generate`) that check once up front."""
    real = tokens != PAD
    longest = int(real.sum(dim=1).max())
    window = tokens[:, -min(longest, config.block_size) :]  # rows are right-aligned
    window_mask = window != PAD
    model_tokens = window.clamp(min=0)
    if use_cache:
        capacity = config.block_size if capacity is None else capacity
        if capacity < window.shape[1]:
            raise ValueError(
                f"the prompts need {window.shape[1]} cache slots per row, more than "
                f"capacity={capacity}"
            )
        starts = (~window_mask).sum(dim=1)
        cache = empty_cache(
            config,
            batch=tokens.shape[0],
            capacity=capacity,
            starts=starts,
            dtype=params["wte.weight"].dtype,
            device=tokens.device,
        )
        hidden, cache = transformer(
            params, model_tokens, config, attention=attention, cache=cache, write="in_place",
            hooks=hooks,
        )  # fmt: skip
    else:
        mask = None if bool(window_mask.all()) else window_mask
        hidden, cache = transformer(
            params, model_tokens, config, attention=attention, attention_mask=mask, hooks=hooks
        )
    return DecodeState(tokens, cache, next_logits(params, hidden, head, hooks), longest)


def advance_state(
    params: Params,
    state: DecodeState,
    next_tokens: Int[Tensor, " batch"],
    config: GPTConfig,
    *,
    attention: AttentionKernel,
    hooks: Hooks | None,
    head: LMHead,
    write: str,
    step: Callable[..., tuple[Tensor, KVCache]] | None = None,
) -> DecodeState:
    """The state after `next_tokens` (one per row); `step` (the cached step, maybe compiled)
    does the work. The decoders' one step forward over a `DecodeState`."""
    tokens = torch.cat([state.tokens, next_tokens[:, None].to(state.tokens.dtype)], dim=1)
    longest = state.longest + 1
    cache = state.cache
    if (
        cache is None
        or longest > config.block_size
        or tokens.shape[1] > max(cache.capacity, config.block_size)
    ):
        return prefill_state(
            params,
            tokens,
            config,
            capacity=None,
            use_cache=cache is not None,
            attention=attention,
            hooks=hooks,
            head=head,
        )
    if tokens.shape[1] > cache.capacity:  # out of room: the next bucket, the past copied in
        cache = cache.grown(cache_bucket(tokens.shape[1], config.block_size))
    if step is None:
        hidden, cache = cached_step(
            params, cache, next_tokens, config=config, attention=attention, hooks=hooks,
            write=write,
        )  # fmt: skip
    else:
        hidden, cache = step(params, cache, next_tokens)
    return DecodeState(tokens, cache, next_logits(params, hidden, head, hooks), longest)


def cached_step(
    params: Params,
    cache: KVCache,
    next_tokens: Int[Tensor, " batch"],
    *,
    config: GPTConfig,
    attention: AttentionKernel,
    hooks: Hooks | None,
    write: Literal["copy", "in_place"],
) -> tuple[Float[Tensor, "batch 1 d_model"], KVCache]:
    """One token per row through the blocks over a cache with room: compilable (traced, it
    attends over the whole capacity: `generate`'s compiled step gives it the attended slots only).

    The LM head stays outside (`next_logits`): its packed CPU kernel is not inductor's."""
    return transformer(
        params, next_tokens[:, None], config, attention=attention, cache=cache, write=write,
        hooks=hooks,
    )  # fmt: skip


def next_logits(
    params: Params, hidden: Float[Tensor, "batch seq d_model"], head: LMHead, hooks: Hooks | None
) -> Float[Tensor, "batch vocab"]:
    """The logits after each row's last position (a `logits` hook sees this call's positions)."""
    if hooks and "logits" in hooks:
        return apply_hook("logits", hooks["logits"], lm_head(params, hidden))[:, -1]
    return head(hidden[:, -1])


def pick_tokens(
    model_logits: Float[Tensor, "batch vocab"],
    context: Int[Tensor, "batch seq"],
    transform: Transform | None,
    generators: list[torch.Generator] | None,
) -> Int[Tensor, " batch"]:
    """One token per row: `transform`, then the argmax (no generators) or a draw per row.

    One host sync checks the model's logits and the transforms' output together; a NaN/+inf
    row of the model's is reported as the model's (a filter such as top_k would hide it
    behind -inf). Transforms are pure: running them first changes nothing.
    """
    if transform is None and generators is None:  # plain greedy: one pass for both
        maxima, tokens = model_logits.max(dim=-1)
        samplers.check_logits(model_logits, model_logits=model_logits, maxima=maxima)
        return tokens
    logits = (
        model_logits if transform is None else apply_transform(transform, model_logits, context)
    )
    samplers.check_logits(logits, model_logits=model_logits)
    if generators is None:
        return samplers.greedy_unchecked(logits)
    return samplers.categorical_unchecked(logits, generators)


_SMALLEST_BUCKET = 64
"""Cache slots a generation starts with at least: GPT-2's 1024 positions then need 5 buckets
(4 copies of the past as the cache grows), not 11."""


def cache_bucket(slots: int, block_size: int) -> int:
    """Capacity for `slots` (<= block_size) filled slots: the power of two at or above it, at
    least `_SMALLEST_BUCKET`, at most `block_size`."""
    return min(max(_SMALLEST_BUCKET, 1 << (slots - 1).bit_length()), block_size)


def prompt_tokens(
    prompt: Tensor | TokenRows,
    attention_mask: Tensor | None,
    config: GPTConfig,
    params: Params,
    *,
    cropped: bool = True,
) -> Int[Tensor, "batch _"]:
    """Prompts as one int64 tensor left-padded with PAD, checked; lists are padded here."""
    tokens, mask = as_batch(
        prompt, attention_mask, side="left", device=params["wte.weight"].device, name="prompt"
    )
    given = isinstance(prompt, Tensor)
    check_tokens(tokens, config, cropped=cropped or not given, name="prompt")
    tokens = tokens.long()
    if mask is not None:
        if given and not is_traced(mask):  # lists are padded on the left here
            real = mask.long().sum(dim=1, keepdim=True)
            left = torch.arange(tokens.shape[1], device=mask.device) >= tokens.shape[1] - real
            if not torch.equal(mask, left):
                raise ValueError(
                    "attention_mask must pad on the left (zeros before each row's tokens) for "
                    "generation, as HF's generate does; or pass token lists"
                )
        tokens = tokens.masked_fill(~mask, PAD)
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"prompt must hold at least one token per row, got shape {tuple(tokens.shape)}"
        )
    if not cropped:
        longest = int((tokens != PAD).sum(dim=1).max())
        if longest > config.block_size:
            raise ValueError(
                f"a prompt of {longest} tokens is longer than block_size={config.block_size}"
            )
    return tokens


def in_prompt_kind(
    prompt: Tensor | TokenRows,
    new: Int[Tensor, "rows width"],
    lengths: Sequence[int],
    *,
    repeats: int = 1,
) -> Int[Tensor, "rows total"] | list[list[int]]:
    """Each prompt (`repeats` times in a row) followed by its row of `new` tokens, in the
    prompt's kind: a tensor as given, then the new tokens up to the longest of `lengths` (a
    shorter row keeps the padding it has in `new`); token lists each cut at its length.

    The one result assembly of `generate`, `beam_search` and `speculative_generate`.
    """
    if isinstance(prompt, Tensor):
        repeated = prompt.long().repeat_interleave(repeats, dim=0)
        width = max(lengths, default=0)
        return torch.cat([repeated, new[:, :width].to(repeated.device)], dim=1)
    rows = [list(row) for row in prompt for _ in range(repeats)]
    return [
        row + generated[:length]
        for row, generated, length in zip(rows, new.tolist(), lengths, strict=True)
    ]


def _checked_step(
    params: Params,
    state: DecodeState,
    next_tokens: Tensor,
    config: GPTConfig,
    attention: AttentionKernel,
    hooks: Hooks | None,
    *,
    write: str,
) -> DecodeState:
    """`decode_step`/`decode_step_`: the arguments checked, then `advance_state`."""
    check_params(params, config)
    check_token_tensor("next_tokens", next_tokens)
    if next_tokens.ndim != 1:
        raise ValueError(
            f"next_tokens must have shape (batch,), one token per row, got shape "
            f"{tuple(next_tokens.shape)}"
        )
    if next_tokens.shape[0] != state.tokens.shape[0]:
        raise ValueError(
            f"next_tokens has {next_tokens.shape[0]} rows, the state {state.tokens.shape[0]}"
        )
    check_token_ids("next_tokens: token id", next_tokens, vocab_size=config.vocab_size)
    _check_state_config(state, config)
    if hooks is not None:
        check_hooks(hooks, config)
    head = decoding_head(params, rows=state.tokens.shape[0])
    return advance_state(
        params, state, next_tokens, config, attention=attention, hooks=hooks, head=head,
        write=write,
    )  # fmt: skip


def _check_state_config(state: DecodeState, config: GPTConfig) -> None:
    """`ValueError` naming the first size in which `state` (its logits, its cache) was made
    for another config than `config`."""
    sizes = [("vocab_size", state.logits.shape[-1], config.vocab_size)]
    if state.cache is not None:
        keys = state.cache.keys
        sizes += [
            ("n_layer", len(keys), config.n_layer),
            ("n_head", keys[0].shape[1], config.n_head),
            ("head size (n_embd // n_head)", keys[0].shape[3], config.n_embd // config.n_head),
        ]
    for name, made, given in sizes:
        if made != given:
            raise ValueError(
                f"the state was made with another config: its {name} is {made}, the config's "
                f"{given}; decode with the config that prefilled it"
            )
