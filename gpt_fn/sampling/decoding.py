"""Autoregressive generation on the decoding engine: `generate` and `generate_stream`.

    tokens = generate(params, prompts, config, max_new_tokens=50,
                      options=DecodeOptions(transform=top_k(40), seed=0))
    for token in generate_stream(params, prompts, config, max_new_tokens=50,
                                 options=DecodeOptions(greedy=True)):
        ...  # one token per row, as soon as it is chosen

The loop runs on `gpt_fn.sampling.engine` (prefill, then one cached step per token); the
options (`DecodeOptions`: transform, greedy/seed, eos/pad, stop strings, tokenizer, hooks,
compile) are checked once per call (`gpt_fn.sampling.options`).

Stop strings end a row at the first token whose bytes complete one in the row's generated
text (`gpt_fn.sampling.stops`); where a tokenizer is in use, ids past its vocabulary are never
generated (`ban_padding_ids`, the one policy of every decoder, the CLI and the harness).

Sampling randomness comes from one generator per row seeded from `(seed, row)` (numpy's
`SeedSequence` spawning), so a row's samples depend on its own logits and the seed, never on
its neighbours or the batch size.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from gpt_fn.checks import check_bool, check_int
from gpt_fn.config import GPTConfig
from gpt_fn.memory import SAMPLING_ADVICE, check_fits, generate_bytes
from gpt_fn.model import TokenRows, check_params
from gpt_fn.nn import AttentionKernel, attention_kernel
from gpt_fn.nn.kv_cache import KVCache
from gpt_fn.sampling.engine import (
    advance_state,
    cache_bucket,
    cached_step,
    decoding_head,
    fan_out,
    in_prompt_kind,
    pick_tokens,
    prefill_state,
    prompt_tokens,
)
from gpt_fn.sampling.options import DecodeOptions, decode_choices, options_or_keywords
from gpt_fn.sampling.stops import RowStops
from gpt_fn.sampling.transforms import Transform
from gpt_fn.shapes import Params
from gpt_fn.sites import Hooks


def generate_stream(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    options: DecodeOptions | None = None,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    num_samples: int = 1,
    use_cache: bool = True,
    attention: AttentionKernel = "sdpa",
    transform: Transform | None = None,
    greedy: bool = False,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    hooks: Hooks | None = None,
    compile: bool = False,
) -> Iterator[Int[Tensor, " rows"]]:
    """Yield each new token (one per row) as soon as it is chosen; the arguments are
    `generate`'s. They are checked when this is called, not at the first token."""
    keywords = DecodeOptions(
        transform=transform, greedy=greedy, seed=seed, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer, hooks=hooks, compile=compile,
    )  # fmt: skip
    return _Generation(
        params, prompt, config, max_new_tokens=max_new_tokens,
        options=options_or_keywords(options, keywords), attention_mask=attention_mask,
        num_samples=num_samples, use_cache=use_cache, attention=attention,
    ).stream()  # fmt: skip


def generate(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    options: DecodeOptions | None = None,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    num_samples: int = 1,
    use_cache: bool = True,
    attention: AttentionKernel = "sdpa",
    transform: Transform | None = None,
    greedy: bool = False,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    hooks: Hooks | None = None,
    compile: bool = False,
) -> Int[Tensor, "rows total"] | list[list[int]]:
    """The prompts followed by up to `max_new_tokens` generated tokens per row.

    - `prompt`: a `(batch, seq)` tensor (left-padded, with `attention_mask`, when ragged) or
      token lists. A tensor comes back as one: the prompts as given, then the new tokens; token
      lists come back as lists, each row its prompt and its new tokens up to where it stopped.
    - `options` (`DecodeOptions`), or the same knobs as keywords (`transform` ... `compile`,
      never both): each step applies `transform(logits, tokens_so_far)` (the context is
      left-padded with `PAD`, -1, which transforms ignore) and then picks the argmax
      (`greedy=True`) or samples (`seed` required: sampling randomness is an argument).
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
      `hooks` intervene at every step (see `gpt_fn.sampling.engine`). `compile=True` runs the
      cached decode step through `torch.compile` (at most two compilations per batch size,
      shared by later calls with the same options; it attends the filled slots, as eager
      decoding does).
    """
    keywords = DecodeOptions(
        transform=transform, greedy=greedy, seed=seed, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer, hooks=hooks, compile=compile,
    )  # fmt: skip
    generation = _Generation(
        params, prompt, config, max_new_tokens=max_new_tokens,
        options=options_or_keywords(options, keywords), attention_mask=attention_mask,
        num_samples=num_samples, use_cache=use_cache, attention=attention,
    )  # fmt: skip
    return generation.assemble(list(generation.stream()))


class _Generation:
    """One `generate` call: its checked arguments, the decoding loop, and the result's shape."""

    def __init__(
        self,
        params: Params,
        prompt: Tensor | TokenRows,
        config: GPTConfig,
        *,
        max_new_tokens: int,
        options: DecodeOptions,
        attention_mask: Tensor | None,
        num_samples: int,
        use_cache: bool,
        attention: AttentionKernel,
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
        check_fits(need, self.tokens.device, what=f"generate ({rows} rows)", advice=SAMPLING_ADVICE)
        choices = decode_choices(options, config, rows=rows, device=self.tokens.device)
        self.transform, self.generators = choices.transform, choices.generators
        self.eos_token_id, self.pad_token_id = choices.eos_token_id, choices.pad_token_id
        self.stops = None if choices.stops is None else RowStops(choices.stops, rows)
        self.attention = attention_kernel(attention)  # resolved once, not at every step
        self.hooks = options.hooks
        self.step = _compiled_step(config, self.attention, self.hooks) if options.compile else None
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
                params, self.tokens, config, capacity=cache_bucket(prompt_width, config.block_size),
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
        """The result in the prompt's kind (`in_prompt_kind`): rows cut where they stopped."""
        rows = len(self.finished_at)
        new = (
            torch.stack(new_tokens, dim=1)
            if new_tokens
            else torch.zeros(rows, 0, dtype=torch.long, device=self.tokens.device)
        )
        lengths = [new.shape[1] if end is None else end + 1 for end in self.finished_at]
        return in_prompt_kind(self.prompt, new, lengths, repeats=self.num_samples)


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
        return cached_step(
            params, cache, next_tokens, config=config, attention=attention, hooks=hooks,
            write="in_place",
        )  # fmt: skip

    compiled = torch.compile(
        step, fullgraph=True, dynamic=False, recompile_limit=_COMPILED_SHAPES_LIMIT
    )

    def filled_step(params: Params, cache: KVCache, next_tokens: Tensor):
        attended = cache.attended_slots(1)
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
