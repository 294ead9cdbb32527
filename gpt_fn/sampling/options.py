"""How a decoder picks and stops: `DecodeOptions`, one frozen object checked where it is built.

    options = DecodeOptions(transform=top_k(40), seed=0, eos_token_id=50256, stop=["\\n\\n"])
    tokens = generate(params, prompts, config, max_new_tokens=50, options=options)
    beams = beam_search(params, prompts, config, 4, max_new_tokens=50, options=options)

`generate`, `generate_stream`, `beam_search` and `speculative_generate` take the options as
`options=` (the documented way: one object, built and checked once, passed to any decoder).
Each also reads the same knobs as keywords (`generate(..., seed=0)`), shorthand for
`options=DecodeOptions(seed=0)`; a call uses one of the two, never both. The constructor
checks every value that needs no model (`ValueError`/`TypeError` naming it); `decode_choices`
adds the checks against the model's config (ids within its vocabulary, hook sites) once per
call and prepares what the decoding loop uses.

The one policy for every decoder, the CLI and the harness: with a tokenizer in use
(`tokenizer` given, or GPT-2's for `stop`), ids past its vocabulary are never generated
(`ban_padding_ids`, before `transform`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from gpt_fn.checks import check_bool, check_int, check_token_id
from gpt_fn.config import GPTConfig
from gpt_fn.sampling.stops import StopStrings, check_tokenizer
from gpt_fn.sampling.transforms import Transform, ban_tokens, chain
from gpt_fn.sites import Hooks, check_hooks


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How a decoder picks tokens and where a row stops; checked when built.

    - `transform(logits, tokens_so_far)` changes each step's logits (beam search: the
      log-probs) before a token is picked; `gpt_fn.sampling.make_transform` builds one.
    - `greedy=True` picks the argmax; otherwise each row samples with its own generator seeded
      from `(seed, row)` (`seed` is required when sampling: randomness is an argument). Beam
      search is deterministic and reads neither.
    - A row stops after producing `eos_token_id`, or at the first token that completes one of
      the `stop` strings in its generated text (UTF-8 bytes of `tokenizer`'s tokens, default
      GPT-2's); it is then padded with `pad_token_id` (default: `eos_token_id`, else 0).
    - `hooks` (`{site: hook}`) intervene at every step (`generate`, `beam_search`);
      `compile=True` runs `generate`'s cached decode step through `torch.compile`.
    """

    transform: Transform | None = None
    greedy: bool = False
    seed: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    stop: Sequence[str] | None = None
    tokenizer: Any = None
    hooks: Hooks | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.transform is not None and not callable(self.transform):
            raise ValueError(
                f"transform must be a function (logits, context) -> logits, got {self.transform!r}"
            )
        check_bool("greedy", self.greedy)
        if self.seed is not None:
            check_int("seed", self.seed, at_least=0)
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), at_least=0)
        if self.stop is not None:
            if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.tokenizer is not None:
            check_tokenizer(self.tokenizer)
        check_bool("compile", self.compile)


_KEYWORD_DEFAULTS = DecodeOptions()


def options_or_keywords(options: DecodeOptions | None, keywords: DecodeOptions) -> DecodeOptions:
    """`options` when given (then every keyword must be left at its default), else the
    `DecodeOptions` the keywords built."""
    if options is None:
        return keywords
    if not isinstance(options, DecodeOptions):
        raise TypeError(f"options must be a DecodeOptions, got {type(options).__name__}")
    for field in dataclasses.fields(DecodeOptions):
        if getattr(keywords, field.name) != getattr(_KEYWORD_DEFAULTS, field.name):
            raise ValueError(
                f"{field.name}= was given with options=: pass each decoding option once, in "
                "the DecodeOptions or as a keyword"
            )
    return options


class DecodeChoices(NamedTuple):
    """`DecodeOptions` checked against a model and prepared for the decoding loop."""

    transform: Transform | None  # with `ban_padding_ids` first when a tokenizer is in use
    generators: list[torch.Generator] | None  # one per row; None: greedy (or a search)
    eos_token_id: int | None
    pad_token_id: int  # what a stopped row emits
    stops: StopStrings | None


def decode_choices(
    options: DecodeOptions, config: GPTConfig, *, rows: int | None, device: torch.device
) -> DecodeChoices:
    """The checks of `options` that need the model's `config` (ids within its vocabulary, hook
    sites), once per call; `rows`: the rows that sample (one generator each unless greedy), or
    None for a deterministic search."""
    generators = None
    if rows is not None and not options.greedy:
        if options.seed is None:
            raise ValueError(
                "seed must be an int >= 0 when sampling (greedy=False), got None: "
                "randomness is an argument"
            )
        generators = row_generators(options.seed, rows, device)
    vocab = config.vocab_size
    eos = options.eos_token_id
    if eos is not None:
        check_token_id("eos_token_id", eos, vocab_size=vocab)
    pad = options.pad_token_id
    pad = check_token_id("pad_token_id", (0 if eos is None else eos) if pad is None else pad,
                         vocab_size=vocab)  # fmt: skip
    if options.hooks is not None:
        check_hooks(options.hooks, config)
    transform, tokenizer = options.transform, options.tokenizer
    if tokenizer is None and options.stop:
        from gpt_fn.tokenizer import gpt2

        tokenizer = gpt2()
    stops = None
    if tokenizer is not None:
        banned = ban_padding_ids(vocab, tokenizer)
        if banned is not None:
            transform = banned if transform is None else chain(banned, transform)
        stops = StopStrings(options.stop, tokenizer) if options.stop else None
    return DecodeChoices(transform, generators, eos, pad, stops)


def ban_padding_ids(vocab_size: int, tokenizer: Any) -> Transform | None:
    """`ban_tokens` of the ids a model of `vocab_size` has past `tokenizer`'s vocabulary (the
    padding ids of a vocabulary rounded up for speed, 50257..50303 for GPT-2's at 50304); None
    when it has none.

    The one policy for every decoder, the CLI and the harness: where a tokenizer is in use,
    ids that have no text are never generated.
    """
    check_int("vocab_size", vocab_size, at_least=1)
    n_vocab = check_tokenizer(tokenizer).n_vocab
    if vocab_size <= n_vocab:
        return None
    return ban_tokens(range(n_vocab, vocab_size))


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
