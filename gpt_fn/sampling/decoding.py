"""Autoregressive decoding: prefill, decode steps over a preallocated KV cache, generate.

    state = prefill(params, prompts, config)                  # one forward over the prompts
    state = decode_step(params, state, next_tokens, config)   # one token per row (pure)
    state = decode_step_(params, state, next_tokens, config)  # the same, written in place
    tokens = generate(params, prompts, config, max_new_tokens=50, transform=top_k(40), seed=0)

Prompts are a `(batch, seq)` tensor, left-padded with an `attention_mask` (1 = a real token)
when their lengths differ, or token lists of any lengths, which gpt_fn pads on the left.
Each row's positions count only its real tokens and no query attends to padding, so every
row of a ragged batch decodes what its prompt decodes alone.

`DecodeState` is the whole state of a decode: tokens so far (left-padded with `PAD`, -1), the
KV cache (`gpt_fn.model.KVCache`: per layer one preallocated key and value buffer, no copy
of the past per step) or `None` when decoding without one, and the next-token logits. A step
attends over the slots filled so far (a slice of the buffers), so its cost follows the tokens
written, not the capacity. A cache out of room grows to the next bucket (a power of two, at
least 64 slots, at most `block_size`; the past copied once); `generate` starts each cache at
its prompt's bucket. A compiled step attends the filled slots too (their count a dynamic size),
so it compiles at most twice per batch size (the slots as part of the buffers, and as all of
them), whatever the lengths and capacities.
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

Stop strings end a row at the first token whose bytes complete one in the row's generated
text (`StopStrings`); where a tokenizer is in use, ids past its vocabulary are never generated
(`ban_padding_ids`, the one policy of every decoder, the CLI and the harness).

Sampling randomness comes from one generator per row seeded from `(seed, row)` (numpy's
`SeedSequence` spawning), so a row's samples depend on its own logits and the seed, never on
its neighbours or the batch size.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt_fn.checks import (
    check_bool,
    check_int,
    check_token_id,
    check_token_ids,
    check_token_tensor,
    is_traced,
)
from gpt_fn.config import GPTConfig
from gpt_fn.memory import check_sampling_fits, generate_bytes
from gpt_fn.model import (
    KVCache,
    TokenRows,
    attended_slots,
    check_attention_mask,
    check_params,
    check_tokens,
    empty_cache,
    lm_head,
    transformer,
)
from gpt_fn.nn import AttentionKernel
from gpt_fn.nn.padding import pad
from gpt_fn.sampling import samplers
from gpt_fn.sampling.head import LMHead, decoding_head
from gpt_fn.sampling.transforms import PAD, Transform, apply_transform, ban_tokens, chain
from gpt_fn.shapes import Params
from gpt_fn.sites import Hooks, apply_hook, check_hooks


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
    _check_step(params, state, next_tokens, config, hooks)
    return advance_state(
        params,
        state,
        next_tokens,
        config,
        attention=attention,
        hooks=hooks,
        head=decoding_head(params, rows=state.tokens.shape[0]),
        write="copy",
    )


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
    _check_step(params, state, next_tokens, config, hooks)
    return advance_state(
        params,
        state,
        next_tokens,
        config,
        attention=attention,
        hooks=hooks,
        head=decoding_head(params, rows=state.tokens.shape[0]),
        write="in_place",
    )


def fan_out(state: DecodeState, n: int) -> DecodeState:
    """Each row repeated `n` times in a row (`[r0, r0, r1, r1]` for n=2): prefill once, sample n."""
    check_int("num_samples", n, at_least=1)
    if n == 1:
        return state
    rows = torch.arange(state.tokens.shape[0], device=state.tokens.device).repeat_interleave(n)
    return state.select(rows)


def generate_stream(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    **options: Any,
) -> Iterator[Int[Tensor, " rows"]]:
    """Yield each new token (one per row) as soon as it is chosen; the options are `generate`'s.

    Arguments are validated when this is called, not at the first token.
    """
    return _Generation(params, prompt, config, max_new_tokens=max_new_tokens, **options).stream()


def generate(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    **options: Any,
) -> Int[Tensor, "rows total"] | list[list[int]]:
    """The prompts followed by up to `max_new_tokens` generated tokens per row.

    - `prompt`: a `(batch, seq)` tensor (left-padded, with `attention_mask`, when ragged) or
      token lists. A tensor comes back as one: the prompts as given, then the new tokens; token
      lists come back as lists, each row its prompt and its new tokens up to where it stopped.
    - Each step applies `transform(logits, tokens_so_far)` (the context is left-padded with
      `PAD`, -1, which transforms ignore) and then picks the argmax (`greedy=True`) or samples
      (`seed` required: sampling randomness is an argument).
    - A row stops after producing `eos_token_id`, or at the first token that completes one of
      the `stop` strings in its generated text (`StopStrings`: UTF-8 bytes of `tokenizer`'s
      tokens, default GPT-2's, across token boundaries; text in the prompt does not count); it
      is then padded with `pad_token_id` (default: `eos_token_id`, else 0), and generation
      ends early once every row has stopped.
    - With a tokenizer in use (`tokenizer` given, or GPT-2's for `stop`), ids past its
      vocabulary (a vocabulary padded for speed) are banned before `transform`
      (`ban_padding_ids`): every generated id then has text. Without one, every id of the
      model's vocabulary may come out.
    - `num_samples=N` runs each prompt once and samples N continuations of it (rows
      `[p0, p0, ..., p1, ...]`), the same tokens as a batch holding each prompt N times.
    - `use_cache=False` recomputes the (cropped) context each step: slower, same tokens.
      `hooks` intervene at every step (see the module docstring). `compile=True` runs the
      cached decode step through `torch.compile` (at most two compilations per batch size,
      shared by later calls with the same options; it attends the filled slots, as eager
      decoding does).
    """
    generation = _Generation(params, prompt, config, max_new_tokens=max_new_tokens, **options)
    return generation.assemble(list(generation.stream()))


def row_generators(seed: int, batch: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per row; row `i`'s depends only on `(seed, i)`.

    `SeedSequence` spawning gives well-separated streams: with `seed + i`, seed 0's row 1 would
    replay seed 1's row 0.
    """
    return [
        torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence(seed, spawn_key=(row,)).generate_state(1, np.uint64)[0])
        )
        for row in range(batch)
    ]


def prefill_state(
    params: Params,
    tokens: Tensor,
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
    return DecodeState(tokens, cache, _next_logits(params, hidden, head, hooks), longest)


def advance_state(
    params: Params,
    state: DecodeState,
    next_tokens: Tensor,
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
        cache = cache.grown(_cache_bucket(tokens.shape[1], config.block_size))
    if step is None:
        hidden, cache = _cached_step(
            params, cache, next_tokens, config=config, attention=attention, hooks=hooks,
            write=write,
        )  # fmt: skip
    else:
        hidden, cache = step(params, cache, next_tokens)
    return DecodeState(tokens, cache, _next_logits(params, hidden, head, hooks), longest)


def _cached_step(
    params: Params,
    cache: KVCache,
    next_tokens: Tensor,
    *,
    config: GPTConfig,
    attention: AttentionKernel,
    hooks: Hooks | None,
    write: str,
) -> tuple[Tensor, KVCache]:
    """One token per row through the blocks over a cache with room: compilable (traced, it
    attends over the whole capacity: `_compiled_step` gives it the attended slots only).

    The LM head stays outside (`_next_logits`): its packed CPU kernel is not inductor's."""
    return transformer(
        params, next_tokens[:, None], config, attention=attention, cache=cache, write=write,
        hooks=hooks,
    )  # fmt: skip


def _next_logits(params: Params, hidden: Tensor, head: LMHead, hooks: Hooks | None) -> Tensor:
    """The logits after each row's last position (a `logits` hook sees this call's positions)."""
    if hooks and "logits" in hooks:
        return apply_hook("logits", hooks["logits"], lm_head(params, hidden))[:, -1]
    return head(hidden[:, -1])


class _Generation:
    """One `generate` call: its checked arguments, the decoding loop, and the result's shape."""

    def __init__(
        self,
        params: Params,
        prompt: Tensor | TokenRows,
        config: GPTConfig,
        *,
        max_new_tokens: int,
        attention_mask: Tensor | None = None,
        transform: Transform | None = None,
        greedy: bool = False,
        seed: int | None = None,
        eos_token_id: int | None = None,
        stop: Sequence[str] | None = None,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
        num_samples: int = 1,
        use_cache: bool = True,
        attention: AttentionKernel = "sdpa",
        hooks: Hooks | None = None,
        compile: bool = False,
    ) -> None:
        check_params(params, config)
        self.params, self.config, self.prompt = params, config, prompt
        self.tokens = prompt_tokens(prompt, attention_mask, config, params, cropped=False)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, at_least=0)
        self.num_samples = check_int("num_samples", num_samples, at_least=1)
        rows = self.tokens.shape[0] * self.num_samples
        self.use_cache = check_bool("use_cache", use_cache)
        # Before anything grows with the rows (their generators, the cache, the logits).
        batch, width = self.tokens.shape
        need = generate_bytes(
            config, batch=batch, prompt=width, max_new_tokens=self.max_new_tokens,
            num_samples=self.num_samples, dtype=params["wte.weight"].dtype,
            use_cache=self.use_cache,
        )  # fmt: skip
        check_sampling_fits(need, self.tokens.device, f"generate ({rows} rows)")
        choices = sampling_choices(
            config, rows=rows, device=self.tokens.device, transform=transform, greedy=greedy,
            seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop=stop,
            tokenizer=tokenizer,
        )  # fmt: skip
        self.transform, self.generators = choices.transform, choices.generators
        self.eos_token_id, self.pad_token_id = choices.eos_token_id, choices.pad_token_id
        self.stops = choices.stops
        self.attention = attention
        if hooks is not None:
            check_hooks(hooks, config)
        self.hooks = hooks
        self.step = (
            _compiled_step(config, attention, hooks) if check_bool("compile", compile) else None
        )
        if self.step is not None and not use_cache:
            raise ValueError("compile=True compiles the cached decode step: it needs use_cache")
        self.finished_at: list[int | None] = [None] * rows

    def stream(self) -> Iterator[Tensor]:
        if self.max_new_tokens == 0:
            return
        config, params = self.config, self.params
        # no_grad per block, never around a `yield`: grad mode would leak into the caller's loop.
        with torch.no_grad():
            head = decoding_head(params, rows=self.tokens.shape[0] * self.num_samples)
            prompt_width = min(self.tokens.shape[1], config.block_size)
            state = prefill_state(
                params, self.tokens, config, capacity=_cache_bucket(prompt_width, config.block_size),
                use_cache=self.use_cache, attention=self.attention, hooks=self.hooks, head=head,
            )  # fmt: skip
            state = fan_out(state, self.num_samples)
        finished = torch.zeros(state.tokens.shape[0], dtype=torch.bool, device=state.tokens.device)
        for step in range(self.max_new_tokens):
            with torch.no_grad():
                token = pick_tokens(state.logits, state.tokens, self.transform, self.generators)
                token = token.masked_fill(finished, self.pad_token_id)
                stopped = finished.clone()
                if self.eos_token_id is not None:
                    stopped |= token == self.eos_token_id
                if self.stops is not None:
                    stopped |= self.stops.update(token, finished)
                for row in (stopped & ~finished).nonzero().flatten().tolist():
                    self.finished_at[row] = step
                finished = stopped
            yield token
            if step + 1 == self.max_new_tokens or bool(finished.all()):
                return
            with torch.no_grad():
                state = advance_state(
                    params, state, token, config, attention=self.attention, hooks=self.hooks,
                    head=head, write="in_place", step=self.step,
                )  # fmt: skip

    def assemble(self, new_tokens: list[Tensor]) -> Tensor | list[list[int]]:
        """The result in the prompt's kind: a tensor, or lists cut where each row stopped."""
        prompt = self.prompt
        if isinstance(prompt, Tensor):
            prompt = prompt.long().repeat_interleave(self.num_samples, dim=0)
            if not new_tokens:
                return prompt.clone()
            return torch.cat([prompt, torch.stack(new_tokens, dim=1)], dim=1)
        columns = (
            torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[]] * len(self.finished_at)
        )
        rows = [list(row) for row in prompt for _ in range(self.num_samples)]
        return [
            row + generated[: None if end is None else end + 1]
            for row, generated, end in zip(rows, columns, self.finished_at, strict=True)
        ]


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
        return samplers._greedy(logits)
    return samplers._categorical(logits, generators)


class SamplingChoices(NamedTuple):
    """How a decoder picks and stops: the checked options `generate` and its siblings share."""

    transform: Transform | None  # with `ban_padding_ids` first when a tokenizer is in use
    generators: list[torch.Generator] | None  # one per row; None: greedy
    eos_token_id: int | None
    pad_token_id: int  # what a stopped row emits
    stops: "RowStops | None"


def sampling_choices(
    config: GPTConfig,
    *,
    rows: int,
    device: torch.device,
    transform: Transform | None,
    greedy: bool,
    seed: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    stop: Sequence[str] | None,
    tokenizer: Any,
) -> SamplingChoices:
    """The decoding options checked once (`ValueError` naming the bad one), for `rows` rows."""
    generators = None
    if not check_bool("greedy", greedy):
        if seed is None:
            raise ValueError(
                "seed must be an int >= 0 when sampling (greedy=False), got None: "
                "randomness is an argument"
            )
        check_int("seed", seed, at_least=0)
        generators = row_generators(seed, rows, device)
    if eos_token_id is not None:
        check_token_id("eos_token_id", eos_token_id, vocab_size=config.vocab_size)
    if pad_token_id is None:
        pad_token_id = 0 if eos_token_id is None else eos_token_id
    pad_token_id = check_token_id("pad_token_id", pad_token_id, vocab_size=config.vocab_size)
    transform, stops = text_choices(config, transform=transform, stop=stop, tokenizer=tokenizer)
    return SamplingChoices(
        transform,
        generators,
        eos_token_id,
        pad_token_id,
        None if stops is None else RowStops(stops, rows),
    )


def text_choices(
    config: GPTConfig, *, transform: Transform | None, stop: Sequence[str] | None, tokenizer: Any
) -> "tuple[Transform | None, StopStrings | None]":
    """The transform and stop strings of a decode, checked: with a tokenizer in use (`tokenizer`
    given, or GPT-2's when `stop` is), `ban_padding_ids` comes before `transform`."""
    if transform is not None and not callable(transform):
        raise ValueError(
            f"transform must be a function (logits, context) -> logits, got {transform!r}"
        )
    if stop is not None and (
        isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)
    ):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    if tokenizer is None and stop:
        from gpt_fn.tokenizer import gpt2

        tokenizer = gpt2()
    if tokenizer is None:
        return transform, None
    banned = ban_padding_ids(config.vocab_size, tokenizer)
    if banned is not None:
        transform = banned if transform is None else chain(banned, transform)
    return transform, (StopStrings(stop, tokenizer) if stop else None)


def ban_padding_ids(vocab_size: int, tokenizer: Any) -> Transform | None:
    """`ban_tokens` of the ids a model of `vocab_size` has past `tokenizer`'s vocabulary (the
    padding ids of a vocabulary rounded up for speed, 50257..50303 for GPT-2's at 50304); None
    when it has none.

    The one policy for every decoder, the CLI and the harness: where a tokenizer is in use,
    ids that have no text are never generated.
    """
    check_int("vocab_size", vocab_size, at_least=1)
    n_vocab = _check_tokenizer(tokenizer).n_vocab
    if vocab_size <= n_vocab:
        return None
    return ban_tokens(range(n_vocab, vocab_size))


def _check_tokenizer(tokenizer: Any) -> Any:
    """`tokenizer` if it reads like a tiktoken `Encoding` (`decode_single_token_bytes`, `n_vocab`);
    else `TypeError`."""
    if not callable(getattr(tokenizer, "decode_single_token_bytes", None)) or not isinstance(
        getattr(tokenizer, "n_vocab", None), int
    ):
        raise TypeError(
            "tokenizer must be a tiktoken Encoding (decode_single_token_bytes and n_vocab), got "
            f"{type(tokenizer).__name__}"
        )
    return tokenizer


class StopStrings:
    """Stop strings matched on the bytes of the generated tokens, across token boundaries.

    A text stops at the first token whose bytes complete a stop string: the string lies in the
    text and ends within that token (HF's `StopStringCriteria` on the generated ids). Only
    generated text counts: a stop string that begins in the prompt is not one. Matching is on
    UTF-8 bytes, so a character split over several tokens matches once its last byte arrives.
    """

    def __init__(self, stop: Sequence[str], tokenizer: Any) -> None:
        self.tokenizer = _check_tokenizer(tokenizer)
        self.stops = [s.encode("utf-8") for s in stop]
        self.keep = max(len(s) for s in self.stops) - 1  # bytes a stop may have begun in

    def step(self, tail: bytes, token: int) -> tuple[bool, bytes]:
        """Whether `token`, after a text ending in `tail`, completes a stop string; the new tail
        (the text's last bytes, as many as a stop string can have begun in)."""
        text = tail + self._bytes(token)
        return any(s in text for s in self.stops), (text[-self.keep :] if self.keep else b"")

    def _bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_single_token_bytes(token)
        except KeyError:
            raise ValueError(
                f"stop strings: token id {token} has no text in the tokenizer "
                f"(n_vocab {self.tokenizer.n_vocab})"
            ) from None


class RowStops:
    """`StopStrings` over the rows of a batch: each row's tail of generated text."""

    def __init__(self, stops: StopStrings, rows: int) -> None:
        self.stops = stops
        self.tails = [b""] * rows

    def update(self, token: Tensor, finished: Tensor) -> Tensor:
        """Which unfinished rows `token` (one per row) makes complete a stop string."""
        hit = torch.zeros_like(finished)
        for row, (t, done) in enumerate(zip(token.tolist(), finished.tolist(), strict=True)):
            if not done:
                hit[row], self.tails[row] = self.stops.step(self.tails[row], t)
        return hit


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to and including the first of the `stop` strings it contains (whole if none)."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


_SMALLEST_BUCKET = 64
"""Cache slots a generation starts with at least: GPT-2's 1024 positions then need 5 buckets
(4 copies of the past as the cache grows), not 11."""


def _cache_bucket(slots: int, block_size: int) -> int:
    """Capacity for `slots` (<= block_size) filled slots: the power of two at or above it, at
    least `_SMALLEST_BUCKET`, at most `block_size`."""
    return min(max(_SMALLEST_BUCKET, 1 << (slots - 1).bit_length()), block_size)


_COMPILED_SHAPES_LIMIT = 64
"""Compiled decode steps a process keeps (all `generate(compile=True)` calls share them: up to
two per batch size, config and hooks): dynamo's default, 8, does not hold five batch sizes,
and past the limit `fullgraph=True` fails."""


def _compiled_step(
    config: GPTConfig, attention: AttentionKernel, hooks: Hooks | None
) -> Callable[..., tuple[Tensor, KVCache]]:
    """The cached step through `torch.compile`, over the slots it attends only.

    It is given views of the slots up to the longest row's new one (as eager attention reads),
    their count marked dynamic: one compilation serves every length and cache capacity (and
    inductor one more for views that cover whole buffers, contiguous), and a step costs what
    the filled slots cost, not the capacity. It writes through the views into the cache's
    buffers, which the returned cache holds."""

    def step(params: Params, cache: KVCache, next_tokens: Tensor):
        return _cached_step(
            params, cache, next_tokens, config=config, attention=attention, hooks=hooks,
            write="in_place",
        )  # fmt: skip

    compiled = torch.compile(
        step, fullgraph=True, dynamic=False, recompile_limit=_COMPILED_SHAPES_LIMIT
    )

    def filled_step(params: Params, cache: KVCache, next_tokens: Tensor):
        attended = attended_slots(cache, 1)
        window = KVCache(
            tuple(k[:, :, :attended] for k in cache.keys),
            tuple(v[:, :, :attended] for v in cache.values),
            cache.starts,
            cache.lengths,
        )
        for buffer in window.keys + window.values:
            torch._dynamo.mark_dynamic(buffer, 2)
        hidden, stepped = compiled(params, window, next_tokens)
        return hidden, cache._replace(lengths=stepped.lengths)

    return filled_step


def prompt_tokens(
    prompt: Tensor | TokenRows,
    attention_mask: Tensor | None,
    config: GPTConfig,
    params: Params,
    *,
    cropped: bool = True,
) -> Tensor:
    """Prompts as one int64 tensor left-padded with PAD, checked; lists are padded here."""
    if isinstance(prompt, Tensor):
        check_tokens(prompt, config, cropped=cropped, name="prompt")
        tokens = prompt.long()
        if attention_mask is not None:
            mask = check_attention_mask(attention_mask, prompt)
            real = mask.long().sum(dim=1, keepdim=True)
            left = torch.arange(prompt.shape[1], device=mask.device) >= prompt.shape[1] - real
            if not is_traced(mask) and not torch.equal(mask, left):
                raise ValueError(
                    "attention_mask must pad on the left (zeros before each row's tokens) for "
                    "generation, as HF's generate does; or pass token lists"
                )
            tokens = tokens.masked_fill(~mask, PAD)
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a prompt tensor; token lists make their own")
        if not isinstance(prompt, Sequence) or isinstance(prompt, str):
            raise TypeError(
                f"prompt must be a (batch, seq) tensor or a list of token lists, got "
                f"{type(prompt).__name__}"
            )
        tokens, mask = pad(prompt, side="left", device=params["wte.weight"].device)
        check_tokens(tokens, config, cropped=True, name="prompt")
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


def _check_step(
    params: Params, state: DecodeState, next_tokens: Tensor, config: GPTConfig, hooks: Hooks | None
) -> None:
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
