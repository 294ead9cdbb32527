"""Autoregressive decoding: prefill, a pure decode step over an explicit KV cache, generate.

    state = prefill(params, prompt, config)                  # one forward over the prompt
    state = decode_step(params, state, next_tokens, config)  # one token per row, cache reused
    tokens = generate(params, prompt, config, max_new_tokens=50, transform=top_k(40), seed=0)

`DecodeState` is the whole state of a decode: tokens so far, the KV cache (or `None` when
decoding without one) and the next-token logits. `decode_step` returns a new state and never
changes the old one, so a state can be kept, branched or replayed (the cache tensors are
immutable; `gpt_fn.nn.attention` grows them with `torch.cat`).

Context longer than `block_size`. The model has `block_size` positions. When a sequence
outgrows them, the model sees only its last `block_size` tokens (nanoGPT's crop,
`idx[:, -block_size:]`): the cached path re-prefills on that window whenever its cache is full,
so every step past `block_size` costs one full forward and cached decoding stays exactly equal
to uncached decoding of the cropped context. Transforms still see the whole sequence (a
repetition penalty remembers tokens that scrolled out of the model's window).

Prompts in a batch share one length (no padding). Sampling randomness comes from one
generator per row seeded from `(seed, row)` (numpy's `SeedSequence` spawning), so a row's
samples depend on its own logits and the seed, never on its neighbours or the batch size.
"""

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from gpt_fn.checks import check_bool, check_int, check_token_id, check_token_ids, check_token_tensor
from gpt_fn.config import GPTConfig
from gpt_fn.model import KVCache, check_params, check_tokens, transformer
from gpt_fn.nn import AttentionKernel
from gpt_fn.sampling import samplers
from gpt_fn.sampling.transforms import Transform
from gpt_fn.shapes import Params


class DecodeState(NamedTuple):
    """Everything a decode step needs besides the parameters."""

    tokens: Int[Tensor, "batch seq"]
    """The prompt and every token generated so far (not cropped)."""
    cache: KVCache | None
    """Keys/values of the model's window (the last `<= block_size` tokens); `None`: uncached."""
    logits: Float[Tensor, "batch vocab"]
    """Next-token logits after `tokens`."""


def lm_head_matrix(params: Params) -> Float[Tensor, "d_model vocab"]:
    """The tied LM head as a contiguous `(d_model, vocab)` copy of `wte`, made once per decode.

    One decode step multiplies a single hidden vector per row by the LM head; on CPU that
    matrix-vector product runs ~3x faster against a contiguous `(d_model, vocab)` matrix than
    against `wte`'s `(vocab, d_model)` layout (which `F.linear` would read).
    """
    return params["wte.weight"].t().contiguous()


def prefill(
    params: Params,
    prompt: Int[Tensor, "batch seq"],
    config: GPTConfig,
    *,
    use_cache: bool = True,
    attention: AttentionKernel = "sdpa",
    head: Float[Tensor, "d_model vocab"] | None = None,
) -> DecodeState:
    """Run the prompt (its last `block_size` tokens) through the model once.

    `head`: `lm_head_matrix(params)`, when the caller has made it already.
    """
    _check_prompt(params, prompt, config, cropped=True)
    check_bool("use_cache", use_cache)
    return _window_forward(
        params, prompt, config, use_cache=use_cache, attention=attention, head=head
    )


def decode_step(
    params: Params,
    state: DecodeState,
    next_tokens: Int[Tensor, " batch"],
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    head: Float[Tensor, "d_model vocab"] | None = None,
) -> DecodeState:
    """Append one token per row and compute the logits after it.

    With a cache that has room, only the new token goes through the model. Without a cache, or
    with a full one (`block_size` positions), the model runs over the last `block_size` tokens
    (see the module docstring); a cached state stays cached.
    """
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
    return _decode_step(params, state, next_tokens, config, attention=attention, head=head)


def _decode_step(
    params: Params,
    state: DecodeState,
    next_tokens: Tensor,
    config: GPTConfig,
    *,
    attention: AttentionKernel,
    head: Tensor | None,
) -> DecodeState:
    """`decode_step` on arguments already checked (the decoding loop's own tokens)."""
    tokens = torch.cat([state.tokens, next_tokens[:, None].to(state.tokens.dtype)], dim=1)
    cache = state.cache
    if cache is None or cache[0].k.shape[2] >= config.block_size:
        return _window_forward(
            params,
            tokens,
            config,
            use_cache=cache is not None,
            attention=attention,
            head=head,
        )
    hidden, cache = transformer(
        params, next_tokens[:, None], config, attention=attention, cache=cache
    )
    return DecodeState(tokens, cache, _next_token_logits(params, hidden, head))


def generate_stream(
    params: Params,
    prompt: Int[Tensor, "batch prompt_seq"],
    config: GPTConfig,
    *,
    max_new_tokens: int,
    transform: Transform | None = None,
    greedy: bool = False,
    seed: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    attention: AttentionKernel = "sdpa",
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield each new token (one per row) as soon as it is chosen; arguments as `generate`.

    Arguments are validated when this is called, not when the first token is asked for.
    """
    _check_generate_arguments(
        params, prompt, config, max_new_tokens, transform, greedy, seed, eos_token_id, use_cache
    )
    return _stream(
        params,
        prompt.long(),
        config,
        max_new_tokens=max_new_tokens,
        transform=transform,
        generators=None if greedy else row_generators(seed, prompt.shape[0], prompt.device),
        eos_token_id=eos_token_id,
        use_cache=use_cache,
        attention=attention,
    )


def generate(
    params: Params,
    prompt: Int[Tensor, "batch prompt_seq"],
    config: GPTConfig,
    *,
    max_new_tokens: int,
    transform: Transform | None = None,
    greedy: bool = False,
    seed: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    attention: AttentionKernel = "sdpa",
) -> Int[Tensor, "batch seq"]:
    """The prompt followed by up to `max_new_tokens` generated tokens per row.

    Each step applies `transform(logits, tokens_so_far)` and then picks the argmax
    (`greedy=True`) or samples (`seed` required: sampling randomness is an argument).
    With `eos_token_id`, a row that produced it is finished and padded with it afterwards, and
    generation stops early once every row is finished. `use_cache=False` recomputes the
    (cropped) context each step: slower, same tokens.
    """
    new_tokens = list(
        generate_stream(
            params,
            prompt,
            config,
            max_new_tokens=max_new_tokens,
            transform=transform,
            greedy=greedy,
            seed=seed,
            eos_token_id=eos_token_id,
            use_cache=use_cache,
            attention=attention,
        )
    )
    prompt = prompt.long()
    if not new_tokens:
        return prompt.clone()
    return torch.cat([prompt, torch.stack(new_tokens, dim=1)], dim=1)


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


def _stream(
    params: Params,
    prompt: Tensor,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    transform: Transform | None,
    generators: list[torch.Generator] | None,
    eos_token_id: int | None,
    use_cache: bool,
    attention: AttentionKernel,
) -> Iterator[Tensor]:
    if max_new_tokens == 0:
        return
    # Inputs were checked by generate_stream; the loop's own tokens need no check.
    # no_grad per block, never around a `yield`: grad mode would leak into the caller's loop.
    with torch.no_grad():
        head = lm_head_matrix(params)
        state = _window_forward(
            params, prompt, config, use_cache=use_cache, attention=attention, head=head
        )
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        with torch.no_grad():
            logits = state.logits if transform is None else transform(state.logits, state.tokens)
            # One host sync checks the model's logits and the transforms' output together; a
            # NaN/+inf row of the model's is reported as the model's (a filter such as top_k
            # would hide it behind -inf). Transforms are pure: running them first changes nothing.
            samplers.check_logits(logits, model_logits=state.logits)
            if generators is None:
                token = samplers._greedy(logits)
            else:
                token = samplers._categorical(logits, generators)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished = finished | (token == eos_token_id)
        yield token
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            return
        with torch.no_grad():
            state = _decode_step(params, state, token, config, attention=attention, head=head)


def _window_forward(
    params: Params,
    tokens: Tensor,
    config: GPTConfig,
    *,
    use_cache: bool,
    attention: AttentionKernel,
    head: Tensor | None,
) -> DecodeState:
    """Forward over the last `block_size` tokens; state with their cache (or none)."""
    hidden, cache = transformer(
        params, tokens[:, -config.block_size :], config, attention=attention
    )
    return DecodeState(
        tokens, cache if use_cache else None, _next_token_logits(params, hidden, head)
    )


def _next_token_logits(params: Params, hidden: Tensor, head: Tensor | None) -> Tensor:
    last = hidden[:, -1]
    return last @ (lm_head_matrix(params) if head is None else head)


def _check_prompt(params: Params, prompt: Tensor, config: GPTConfig, *, cropped: bool) -> None:
    check_params(params, config)
    check_tokens(prompt, config, cropped=cropped, name="prompt")
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must hold at least one token per row, got shape {tuple(prompt.shape)}"
        )


def _check_generate_arguments(
    params: Params,
    prompt: Tensor,
    config: GPTConfig,
    max_new_tokens: object,
    transform: object,
    greedy: object,
    seed: object,
    eos_token_id: object,
    use_cache: object,
) -> None:
    _check_prompt(params, prompt, config, cropped=False)
    check_int("max_new_tokens", max_new_tokens, at_least=0)
    if transform is not None and not callable(transform):
        raise ValueError(
            f"transform must be a function (logits, context) -> logits, got {transform!r}"
        )
    if not check_bool("greedy", greedy):
        if seed is None:
            raise ValueError(
                "seed must be an int >= 0 when sampling (greedy=False), got None: "
                "randomness is an argument"
            )
        check_int("seed", seed, at_least=0)
    if eos_token_id is not None:
        check_token_id("eos_token_id", eos_token_id, vocab_size=config.vocab_size)
    check_bool("use_cache", use_cache)
