"""Speculative decoding: a small draft model proposes tokens, the target checks them in one pass.

    out = speculative_generate(params, prompts, config, max_new_tokens=100,
                               draft_params=small, draft_config=small_config, seed=0)
    out.tokens, out.stats.acceptance_rate

Each round, for every row at once (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"):

1. the draft proposes `k = num_draft_tokens` tokens `d_1 .. d_k` autoregressively, each drawn
   from its distribution `q_i` (greedy: its argmax);
2. the target runs once over the chunk `[last token, d_1 .. d_k]` on its KV cache, which gives
   its distributions `p_1 .. p_{k+1}` at every proposed position;
3. `d_i` is accepted with probability `min(1, p_i(d_i) / q_i(d_i))` (greedy: when it is the
   target's argmax), left to right; at the first rejection the row instead draws from
   `norm(max(0, p_i - q_i))` (greedy: the target's argmax), and if all `k` are accepted it
   draws a bonus token from `p_{k+1}`.

So a round makes 1 to `k + 1` tokens per row, and the tokens follow the target's distribution
exactly: greedy speculative decoding gives the target's greedy tokens, and sampling gives
samples of the target's distribution (both tested). `transform` applies to the draft's and the
target's logits alike, each with the context the position has, so `p` and `q` are the
distributions that sampling from either model with that transform would use.

Rows accept different numbers of tokens. Each row's cache keeps its own length
(`KVCache.lengths`): rolling a row back after a rejection is lowering its length, and the slots
past it are masked out by position until the next chunk overwrites them. The draft's cache is
rolled back the same way and catches up by re-reading the last two tokens of each row (its last
accepted token and the target's own token) at the start of the next round. A row that has
finished (eos, a stop string, `max_new_tokens`) leaves the batch, so the rest run on smaller
batches. HF's assisted generation (`assistant_model=`) takes one prompt at a time; this takes a
batch, ragged prompts included.

Both models see every position of a sequence while it fits both `block_size`s; rounds shrink
`k` near the end. A row past the draft's `block_size` is decoded by the target alone, and once a
row is longer than the target's `block_size` the remaining tokens come from plain decoding of
the last `block_size` tokens, as `generate` does. Sampling randomness is one generator per row
(`row_generators`): the draft's draws, the acceptance tests and the corrections of a row
consume only its own generator.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from gpt_fn.checks import check_int
from gpt_fn.config import GPTConfig
from gpt_fn.model import TokenRows, check_params, transformer
from gpt_fn.nn import AttentionKernel, attention_kernel
from gpt_fn.sampling import samplers
from gpt_fn.sampling.engine import (
    advance_state,
    decoding_head,
    in_prompt_kind,
    pick_tokens,
    prefill_state,
    prompt_tokens,
)
from gpt_fn.sampling.options import DecodeOptions, decode_choices, options_or_keywords
from gpt_fn.sampling.stops import RowStops
from gpt_fn.sampling.transforms import PAD, Transform, apply_transform
from gpt_fn.shapes import Params


class SpeculativeStats(NamedTuple):
    """What the draft bought: counts summed over the rows and rounds of one call."""

    proposed: int
    """Draft tokens proposed."""
    accepted: int
    """Proposed tokens the target accepted."""
    rounds: int
    """Target forwards over the cache after the prefill (one per round, all rows together),
    plus plain decode steps past `block_size`."""
    row_rounds: int
    """Rounds summed over the rows each included: `new_tokens / row_rounds` is the mean
    number of tokens a row gets per target forward (1 without a draft)."""
    draft_forwards: int
    """Draft forwards after its prefill."""
    new_tokens: int
    """Tokens returned, summed over the rows."""

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed tokens that were accepted (nan when none were proposed)."""
        return self.accepted / self.proposed if self.proposed else math.nan


class SpeculativeOutput(NamedTuple):
    tokens: Int[Tensor, "batch total"] | list[list[int]]
    """What `generate` would return: the prompts and their new tokens, in the prompt's kind."""
    stats: SpeculativeStats


def speculative_generate(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    *,
    draft_params: Params,
    draft_config: GPTConfig,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    options: DecodeOptions | None = None,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    attention: AttentionKernel = "sdpa",
    transform: Transform | None = None,
    greedy: bool = False,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> SpeculativeOutput:
    """The target's (`params`, `config`) continuations of the prompts, drafted by a smaller
    model (`draft_params`, `draft_config`) that shares its vocabulary.

    The arguments mean what they mean in `generate`; `num_draft_tokens` is how many tokens the
    draft proposes per round. Greedy tokens are the target's greedy tokens; samples follow the
    target's distribution under `transform` (see the module docstring). `options`
    (`DecodeOptions`), or its knobs as keywords (`transform` ... `tokenizer`, never both);
    hooks and a compiled step are `generate`'s alone.
    """
    keywords = DecodeOptions(
        transform=transform, greedy=greedy, seed=seed, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer,
    )  # fmt: skip
    options = options_or_keywords(options, keywords)
    if options.hooks is not None or options.compile:
        raise ValueError(
            "speculative_generate takes no hooks and no compile=True: the draft and the target "
            "would need them apart; use generate"
        )
    run = _Speculation(
        params, prompt, config, draft_params=draft_params, draft_config=draft_config,
        max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, options=options,
        attention_mask=attention_mask, attention=attention,
    )  # fmt: skip
    with torch.no_grad():
        run.decode()
    return SpeculativeOutput(run.assemble(), run.stats())


class _Speculation:
    """One `speculative_generate` call: checked arguments, the rounds, and the result."""

    def __init__(
        self,
        params: Params,
        prompt: Tensor | TokenRows,
        config: GPTConfig,
        *,
        draft_params: Params,
        draft_config: GPTConfig,
        max_new_tokens: int,
        num_draft_tokens: int,
        options: DecodeOptions,
        attention_mask: Tensor | None,
        attention: AttentionKernel,
    ) -> None:
        check_params(params, config)
        if not isinstance(draft_config, GPTConfig):
            raise TypeError(f"draft_config must be a GPTConfig, got {type(draft_config).__name__}")
        if draft_config.vocab_size != config.vocab_size:
            raise ValueError(
                f"the draft model's vocab_size is {draft_config.vocab_size}, the target's "
                f"{config.vocab_size}: speculative decoding needs a draft with the target's "
                "vocabulary"
            )
        try:
            check_params(draft_params, draft_config)
        except (KeyError, ValueError) as error:
            raise type(error)(f"draft_params: {error.args[0]}") from None
        self.params, self.config = params, config
        self.draft_params, self.draft_config = draft_params, draft_config
        self.prompt = prompt
        self.tokens = prompt_tokens(prompt, attention_mask, config, params, cropped=False)
        self.max_new = check_int("max_new_tokens", max_new_tokens, at_least=0)
        self.k = check_int("num_draft_tokens", num_draft_tokens, at_least=1)
        rows = self.tokens.shape[0]
        choices = decode_choices(options, config, rows=rows, device=self.tokens.device)
        self.transform, self.generators = choices.transform, choices.generators
        self.eos, self.pad = choices.eos_token_id, choices.pad_token_id
        self.stops = None if choices.stops is None else RowStops(choices.stops, rows)
        self.attention = attention_kernel(attention)  # resolved once, not at every step
        self.new: list[list[int]] = [[] for _ in range(rows)]
        self.proposed = self.accepted = self.rounds = self.row_rounds = self.draft_forwards = 0

    # ------------------------------------------------------------------ the decoding loop

    def decode(self) -> None:
        if self.max_new == 0:
            return
        config, draft_config, tokens = self.config, self.draft_config, self.tokens
        device = tokens.device
        # The hot row counts: the target verifies k + 1 positions per row, the draft one.
        self.head = decoding_head(self.params, rows=tokens.shape[0] * (self.k + 1))
        self.draft_head = decoding_head(self.draft_params, rows=tokens.shape[0])
        self.active = list(range(tokens.shape[0]))  # original row of each active row
        self.gens = self.generators
        counts = (tokens != PAD).sum(dim=1)
        longest = int(counts.max())
        # Slot of a row's token = its left padding + its position; positions stay below the
        # block sizes while speculating, and below the prompt + max_new_tokens + k.
        width = tokens.shape[1]
        capacity = width + min(self.max_new + self.k, config.block_size)
        target = prefill_state(
            self.params, tokens, config, capacity=capacity, use_cache=True,
            attention=self.attention, hooks=None, head=self.head,
        ).cache  # fmt: skip
        assert target is not None
        # The target's cache holds all but each row's last token, which starts the next chunk.
        self.target = target._replace(lengths=target.lengths - 1)
        self.drafting = self._draft_length(longest, self.max_new) >= 1
        self.draft_width = 1  # tokens the draft reads at the start of a round (then 2)
        if self.drafting:
            draft = prefill_state(
                self.draft_params, tokens, draft_config,
                capacity=width + min(self.max_new + self.k, draft_config.block_size),
                use_cache=True, attention=self.attention, hooks=None, head=self.draft_head,
            ).cache  # fmt: skip
            assert draft is not None
            self.draft = draft
        self.tokens, self.counts = tokens, counts
        self.generated = torch.zeros(len(self.active), dtype=torch.long, device=device)
        while self.active:
            longest = int(self.counts.max())
            if longest > config.block_size:
                self._plain_tail()
                return
            remaining = int((self.max_new - self.generated).max())
            k = self._draft_length(longest, remaining) if self.drafting else 0
            if k < 1:
                self.drafting = False
            self._round(max(k, 0))

    def _draft_length(self, longest: int, remaining: int) -> int:
        """Tokens to propose this round: `k`, fewer near the block sizes and the budget."""
        # Target positions n-1 .. n-1+k < block_size; draft reads up to d_{k-1} at n-2+k.
        return min(
            self.k,
            self.config.block_size - longest,
            self.draft_config.block_size - longest + 1,
            remaining - 1,
        )

    def _round(self, k: int) -> None:
        """Propose `k` tokens per active row (none: the target alone), verify, accept, emit."""
        tokens, counts = self.tokens, self.counts
        rows = tokens.shape[0]
        proposals = tokens.new_zeros(rows, 0)
        q_probs: list[Tensor] = []
        if k:
            proposals, q_probs = self._propose(k)
        chunk = torch.cat([tokens[:, -1:], proposals], dim=1)
        hidden, self.target = transformer(
            self.params, chunk, self.config, attention=self.attention, cache=self.target,
            write="in_place",
        )  # fmt: skip
        # (rows, k + 1, vocab); a 2-D matmul: faster on CPU than the batched 3-D one.
        model_logits = self.head(hidden.flatten(0, 1)).view(rows, k + 1, -1)
        logits = model_logits
        if self.transform is not None:
            # Position i's context is the row so far and the first i proposals, left-padded.
            pad = torch.full((rows, k), PAD, dtype=tokens.dtype, device=tokens.device)
            contexts = torch.stack(
                [
                    torch.cat([pad[:, : k - i], tokens, proposals[:, :i]], dim=1)
                    for i in range(k + 1)
                ],
                dim=1,
            )
            flat = apply_transform(
                self.transform, model_logits.flatten(0, 1), contexts.flatten(0, 1)
            )
            logits = flat.view(model_logits.shape)
        samplers.check_logits(logits.flatten(0, 1), model_logits=model_logits.flatten(0, 1))
        if self.gens is None:
            choice = samplers.greedy_unchecked(logits)
            matches = (proposals == choice[:, :k]).long()
            accepted = matches.cumprod(dim=1).sum(dim=1)
            last = choice.gather(1, accepted[:, None])[:, 0]
        else:
            accepted, last = self._accept(logits.float().softmax(dim=-1), proposals, q_probs)
        self.rounds += 1
        self.row_rounds += rows
        self.proposed += k * rows
        self.accepted += int(accepted.sum())
        emitted = torch.cat([proposals, proposals.new_zeros(rows, 1)], dim=1)
        emitted = emitted.scatter(1, accepted[:, None], last[:, None])
        done = self._emit(emitted, accepted + 1)
        # Unfinished rows made accepted + 1 tokens: the target cache keeps the accepted ones,
        # the draft re-reads the last two next round.
        grown = accepted + 1
        self.tokens = _append(tokens, emitted, grown)
        self.counts = counts + grown
        self.generated = self.generated + grown
        self.target = self.target._replace(lengths=self.target.starts + self.counts - 1)
        self.draft_width = 2
        self._drop(done)

    def _propose(self, k: int) -> tuple[Tensor, list[Tensor]]:
        """The draft's `k` tokens per row and (when sampling) the distributions they came from."""
        tokens, w = self.tokens, self.draft_width
        draft = self.draft._replace(lengths=self.draft.starts + self.counts - w)
        hidden, draft = transformer(
            self.draft_params, tokens[:, -w:], self.draft_config, attention=self.attention,
            cache=draft, write="in_place",
        )  # fmt: skip
        context, proposals, q_probs = tokens, [], []
        for i in range(k):
            model_logits = self.draft_head(hidden[:, -1])
            logits = model_logits
            if self.transform is not None:
                logits = apply_transform(self.transform, model_logits, context)
            samplers.check_logits(logits, model_logits=model_logits)
            if self.gens is None:
                token = samplers.greedy_unchecked(logits)
            else:
                token = samplers.categorical_unchecked(logits, self.gens)
                q_probs.append(logits.float().softmax(dim=-1))
            proposals.append(token)
            context = torch.cat([context, token[:, None]], dim=1)
            if i + 1 < k:
                hidden, draft = transformer(
                    self.draft_params, token[:, None], self.draft_config,
                    attention=self.attention, cache=draft, write="in_place",
                )  # fmt: skip
                self.draft_forwards += 1
        self.draft_forwards += 1
        self.draft = draft
        return torch.stack(proposals, dim=1), q_probs

    def _accept(self, p: Tensor, proposals: Tensor, q_probs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Leviathan et al.'s rule: how many proposals each row accepts, and its next token."""
        rows, k = proposals.shape
        assert self.gens is not None
        zeros = p.new_zeros(rows, 1, p.shape[-1])
        q = torch.cat([*(x[:, None] for x in q_probs), zeros], dim=1)  # (rows, k + 1, vocab)
        if k:
            uniforms = torch.stack([torch.rand(k, generator=g, device=p.device) for g in self.gens])
            p_d = p[:, :k].gather(-1, proposals[..., None])[..., 0]
            q_d = q[:, :k].gather(-1, proposals[..., None])[..., 0]
            # u < p/q without dividing; q_d > 0 (it was drawn), and p_d = 0 never accepts.
            accepted = (uniforms * q_d < p_d).long().cumprod(dim=1).sum(dim=1)
        else:
            accepted = proposals.new_zeros(rows)
        index = accepted[:, None, None].expand(-1, 1, p.shape[-1])
        p_a, q_a = p.gather(1, index)[:, 0], q.gather(1, index)[:, 0]
        # After all k accepted, q_a is the zero row: the residual is p_{k+1} itself.
        residual = (p_a - q_a).clamp(min=0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
        return accepted, samplers.categorical_unchecked(residual.log(), self.gens)

    def _emit(self, emitted: Tensor, made: Tensor) -> Tensor:
        """Record each active row's `made` tokens (cut at eos, a stop or the budget); which
        rows are finished."""
        columns, counts = emitted.tolist(), made.tolist()
        generated = self.generated.tolist()
        finished = [False] * len(self.active)
        hits = [self._stop_hits(emitted, made, j) for j in range(emitted.shape[1])]
        for i, row in enumerate(self.active):
            for j in range(counts[i]):
                token = columns[i][j]
                self.new[row].append(token)
                if (
                    token == self.eos
                    or (hits[j] is not None and hits[j][i])
                    or generated[i] + j + 1 >= self.max_new
                ):
                    finished[i] = True
                    break
        return torch.tensor(finished, device=emitted.device)

    def _stop_hits(self, emitted: Tensor, made: Tensor, j: int) -> list[bool] | None:
        """Whether column `j` completes a stop string in each active row (None: no stops).

        Each row's text goes through `generate`'s stop checker token by token. A row that
        stops (or ends) at an earlier column is finished: what its later columns add to the
        checker's tail is never read, as the row leaves the batch.
        """
        if self.stops is None:
            return None
        column = torch.zeros(len(self.new), dtype=torch.long)
        skip = torch.ones(len(self.new), dtype=torch.bool)
        active = torch.tensor(self.active)
        column[active] = emitted[:, j].cpu()
        skip[active] = (made <= j).cpu()
        return self.stops.update(column, skip)[active].tolist()

    def _drop(self, done: Tensor) -> None:
        """Take finished rows out of the batch."""
        if not bool(done.any()):
            return
        keep = (~done).nonzero()[:, 0]
        kept = keep.tolist()
        self.active = [self.active[i] for i in kept]
        if not self.active:
            return
        self.tokens = _trim(self.tokens.index_select(0, keep))
        self.counts = self.counts.index_select(0, keep)
        self.generated = self.generated.index_select(0, keep)
        self.target = self.target.select(keep)
        if self.drafting:
            self.draft = self.draft.select(keep)
        if self.gens is not None:
            self.gens = [self.gens[i] for i in kept]

    def _plain_tail(self) -> None:
        """Rows longer than the target's block_size: plain decoding of their last block_size
        tokens, one token per row per step (as `generate` does)."""
        del self.target
        self.drafting = False
        state = prefill_state(
            self.params, self.tokens, self.config, capacity=None, use_cache=True,
            attention=self.attention, hooks=None, head=self.head,
        )  # fmt: skip
        while True:
            token = pick_tokens(state.logits, state.tokens, self.transform, self.gens)
            self.rounds += 1
            self.row_rounds += len(self.active)
            ones = torch.ones_like(token)
            done = self._emit(token[:, None], ones)
            self.generated = self.generated + 1
            keep = (~done).nonzero()[:, 0]
            self.active = [self.active[i] for i in keep.tolist()]
            if not self.active:
                return
            if self.gens is not None:
                self.gens = [self.gens[i] for i in keep.tolist()]
            self.generated = self.generated.index_select(0, keep)
            if bool(done.any()):
                state = state.select(keep)
            state = advance_state(
                self.params, state, token.index_select(0, keep), self.config,
                attention=self.attention, hooks=None, head=self.head, write="in_place",
            )  # fmt: skip

    # ------------------------------------------------------------------ the result

    def stats(self) -> SpeculativeStats:
        return SpeculativeStats(
            proposed=self.proposed,
            accepted=self.accepted,
            rounds=self.rounds,
            row_rounds=self.row_rounds,
            draft_forwards=self.draft_forwards,
            new_tokens=sum(len(new) for new in self.new),
        )

    def assemble(self) -> Tensor | list[list[int]]:
        """The result in the prompt's kind (`in_prompt_kind`): a tensor padded with
        `pad_token_id` after a row that stopped early, or token lists cut where each stopped."""
        lengths = [len(new) for new in self.new]
        new = torch.full((len(self.new), max(lengths)), self.pad, dtype=torch.long)
        for row, tokens in enumerate(self.new):
            new[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return in_prompt_kind(self.prompt, new, lengths)


def _append(tokens: Tensor, emitted: Tensor, made: Tensor) -> Tensor:
    """Rows (left-padded with PAD, so they end in the last column) followed by their first
    `made` emitted tokens, still ending in the last column."""
    grown = torch.cat([tokens, emitted], dim=1)
    width = grown.shape[1]
    shift = emitted.shape[1] - made  # the unused emitted slots move to the left
    source = torch.arange(width, device=tokens.device)[None, :] - shift[:, None]
    out = grown.gather(1, source.clamp(min=0)).masked_fill(source < 0, PAD)
    return _trim(out)


def _trim(tokens: Tensor) -> Tensor:
    """Drop the leading columns that are padding in every row."""
    longest = int((tokens != PAD).sum(dim=1).max())
    return tokens[:, tokens.shape[1] - longest :]
