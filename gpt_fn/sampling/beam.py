"""Beam search over `DecodeState`: the `num_beams` best continuations of each prompt by score.

    out = beam_search(params, prompts, config, 4, max_new_tokens=20)
    out.sequences[0], out.scores[0]       # the best beam of prompt 0 and its score

The rules are Hugging Face `transformers`' (`GenerationMixin._beam_search`, 5.x), so the best
sequence and its score equal `model.generate(num_beams=k, do_sample=False)` on the same
weights (tested):

- Each step scores every continuation of every running beam by its summed log-probability
  (`log_softmax` of the model's logits, then `transform`, as HF's processors see log-probs),
  keeps the `2 * num_beams` best, and carries on with the best `num_beams` of those that did
  not just end.
- A candidate ends with `eos_token_id`, when its new text completes one of the `stop` strings
  (HF's `stop_strings`, matched as `generate` matches them: on generated text only), or when
  it reaches `max_new_tokens`. Its final score is its sum over
  `generated_length ** length_penalty`, the length counting only new tokens (eos or the
  stop's last token included); only candidates among the step's top `num_beams` can become
  finished hypotheses, and each prompt keeps the `num_beams` best.
- `early_stopping`: `True` stops a prompt once it has `num_beams` finished hypotheses; `False`
  (HF's default) also stops it when the best running beam, scored at its current length,
  cannot beat the worst finished one; `"never"` scores it at `max_new_tokens` when
  `length_penalty > 0` (the canonical rule that can stop only when nothing can improve).

HF writes "impossible" as a score of -1e9 rather than -inf, and so does this module: the
ranks of partly dead beams then follow HF's too. The first step starts from one live beam per
prompt (the others at -1e9), so no two beams repeat each other.

Beams are rows of a `DecodeState` (prompt `b`'s beams are rows `b * num_beams ...`);
reordering them is `DecodeState.select` (the cache's `KVCache.select`). Ragged prompt batches
(token lists, or a left-padded tensor with its mask) work as in `generate`, and a sequence may
run past `block_size` (the model then sees its last `block_size` tokens, as in `generate`).
"""

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt_fn.checks import check_int, check_number
from gpt_fn.config import GPTConfig
from gpt_fn.memory import SAMPLING_ADVICE, beam_search_bytes, check_fits
from gpt_fn.model import TokenRows, check_params
from gpt_fn.nn import AttentionKernel, attention_kernel
from gpt_fn.sampling import samplers
from gpt_fn.sampling.engine import (
    advance_state,
    decoding_head,
    fan_out,
    in_prompt_kind,
    prefill_state,
    prompt_tokens,
)
from gpt_fn.sampling.options import DecodeOptions, decode_choices, options_or_keywords
from gpt_fn.sampling.stops import StopStrings
from gpt_fn.sampling.transforms import Transform, apply_transform
from gpt_fn.shapes import Params
from gpt_fn.sites import Hooks

IMPOSSIBLE = -1.0e9
"""HF's score for a beam that must not be chosen (added, so such beams still rank among
themselves as HF's do)."""


class BeamSearchOutput(NamedTuple):
    """The best `num_return_sequences` hypotheses of each prompt, best first."""

    sequences: Int[Tensor, "rows total"] | list[list[int]]
    """Rows `b * num_return_sequences + j`: prompt `b` then its `j`-th best continuation. A
    prompt tensor comes back as a tensor (shorter hypotheses padded with `pad_token_id`),
    token lists as lists (each cut where its hypothesis ended)."""
    scores: Float[Tensor, " rows"]
    """Each hypothesis's summed log-probability over `generated_length ** length_penalty`."""


def beam_search(
    params: Params,
    prompt: Int[Tensor, "batch seq"] | TokenRows,
    config: GPTConfig,
    num_beams: int,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    num_return_sequences: int = 1,
    options: DecodeOptions | None = None,
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    attention: AttentionKernel = "sdpa",
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    transform: Transform | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    hooks: Hooks | None = None,
) -> BeamSearchOutput:
    """The `num_return_sequences` best of `num_beams` beams per prompt (the module docstring
    gives the rules: HF's).

    - `max_new_tokens`: the most new tokens a hypothesis has; `min_new_tokens`: `eos_token_id`
      is banned before that many (HF's `min_new_tokens`). Without an eos every hypothesis has
      exactly `max_new_tokens`.
    - `transform(log_probs, tokens_so_far)` changes the log-probs before they are scored
      (HF's processors: `repetition_penalty`, `no_repeat_ngram`, `ban_tokens`, ...).
    - `stop`, `tokenizer`: as in `generate`: a hypothesis ends at the token that completes a
      stop string in its new text, and with a tokenizer in use ids past its vocabulary are
      banned (`ban_padding_ids`).
    - `pad_token_id` (default: `eos_token_id`, else 0) fills a tensor result after a
      hypothesis that ended early.
    - `options` (`DecodeOptions`), or its knobs as keywords (`eos_token_id` ... `hooks`, never
      both); a search is deterministic, so `greedy` and `seed` do not apply.
    """
    keywords = DecodeOptions(
        transform=transform, eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop=stop,
        tokenizer=tokenizer, hooks=hooks,
    )  # fmt: skip
    options = options_or_keywords(options, keywords)
    if options.compile:
        raise ValueError("compile=True compiles generate's decode step; beam_search runs eagerly")
    check_params(params, config)
    tokens = prompt_tokens(prompt, attention_mask, config, params, cropped=False)
    beams = check_int("num_beams", num_beams, at_least=1)
    max_new = check_int("max_new_tokens", max_new_tokens, at_least=1)
    min_new = check_int("min_new_tokens", min_new_tokens, at_least=0)
    if min_new > max_new:
        raise ValueError(
            f"min_new_tokens ({min_new}) must be <= max_new_tokens ({max_new}) for beam search"
        )
    penalty = check_number("length_penalty", length_penalty)
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    returned = check_int("num_return_sequences", num_return_sequences, at_least=1)
    if returned > beams:
        raise ValueError(
            f"num_return_sequences ({returned}) must be <= num_beams ({beams}): beam search "
            "keeps num_beams hypotheses per prompt"
        )
    choices = decode_choices(options, config, rows=None, device=tokens.device)
    need = beam_search_bytes(
        config, batch=tokens.shape[0], prompt=tokens.shape[1], max_new_tokens=max_new,
        num_beams=beams, dtype=params["wte.weight"].dtype,
    )  # fmt: skip
    check_fits(
        need,
        tokens.device,
        what=f"beam_search ({tokens.shape[0] * beams} beams)",
        advice=SAMPLING_ADVICE,
    )
    with torch.no_grad():
        new, lengths, scores = _search(
            params, tokens, config, beams=beams, max_new=max_new, min_new=min_new,
            penalty=penalty, early_stopping=early_stopping, eos=choices.eos_token_id,
            pad=choices.pad_token_id, transform=choices.transform, stops=choices.stops,
            attention=attention_kernel(attention), hooks=options.hooks,
        )  # fmt: skip
    new, lengths, scores = new[:, :returned], lengths[:, :returned], scores[:, :returned]
    sequences = in_prompt_kind(
        prompt, new.flatten(0, 1), lengths.flatten().tolist(), repeats=returned
    )
    return BeamSearchOutput(sequences, scores.flatten())


def _search(
    params: Params,
    tokens: Tensor,
    config: GPTConfig,
    *,
    beams: int,
    max_new: int,
    min_new: int,
    penalty: float,
    early_stopping: bool | str,
    eos: int | None,
    pad: int,
    transform: Transform | None,
    stops: StopStrings | None,
    attention: AttentionKernel,
    hooks: Hooks | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Finished hypotheses per prompt, best first: new tokens `(batch, beams, max_new)` (padded),
    their lengths `(batch, beams)` and scores `(batch, beams)`."""
    batch, width = tokens.shape
    vocab, device = config.vocab_size, tokens.device
    head = decoding_head(params, rows=batch * beams)
    prompt_width = min(width, config.block_size)
    capacity = max(min(config.block_size, prompt_width + max_new - 1), prompt_width)
    state = prefill_state(
        params, tokens, config, capacity=capacity, use_cache=True, attention=attention,
        hooks=hooks, head=head,
    )  # fmt: skip
    state = fan_out(state, beams)
    # Running beams: their new tokens and summed log-probs. Only beam 0 starts live.
    running = torch.full((batch, beams, max_new), pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = IMPOSSIBLE
    # Finished hypotheses: tokens, scores (length-penalised), lengths, and which slots hold one.
    done, done_scores = running.clone(), torch.full((batch, beams), IMPOSSIBLE, device=device)
    done_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    # Per prompt: can its finished hypotheses still improve (HF's early-stop heuristic)?
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    candidates = 2 * beams  # enough that num_beams survive even if num_beams end at once
    top_beams = torch.arange(candidates, device=device) < beams
    first_row = torch.arange(batch, device=device)[:, None] * beams
    tails = [b""] * (batch * beams)  # each running beam's last bytes, for the stop strings
    for step in range(max_new):
        samplers.check_logits(state.logits)  # the model's logits: NaN/+inf is its error
        log_probs = state.logits.float().log_softmax(dim=-1)
        if eos is not None and step < min_new:
            log_probs = log_probs.index_fill(-1, torch.tensor([eos], device=device), -torch.inf)
        if transform is not None:
            log_probs = apply_transform(transform, log_probs, state.tokens)
        totals = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, -1)
        top_scores, top_index = totals.topk(candidates, dim=-1)
        parents, next_tokens = top_index // vocab, top_index % vocab
        grown = _gather(running, parents)
        grown[:, :, step] = next_tokens
        if step + 1 == max_new:
            ends = torch.ones_like(next_tokens, dtype=torch.bool)
        elif eos is not None:
            ends = next_tokens == eos
        else:
            ends = torch.zeros_like(next_tokens, dtype=torch.bool)
        if stops is not None:
            hits, grown_tails = _stop_hits(stops, tails, first_row + parents, next_tokens)
            ends = ends | hits
        # The best num_beams candidates that go on.
        alive_scores = top_scores + ends.float() * IMPOSSIBLE
        keep = alive_scores.topk(beams, dim=-1).indices
        running, running_scores = _gather(grown, keep), alive_scores.gather(1, keep)
        parents, next_tokens = parents.gather(1, keep), next_tokens.gather(1, keep)
        if stops is not None:
            kept = (torch.arange(batch, device=device)[:, None] * candidates + keep).flatten()
            tails = [grown_tails[i] for i in kept.tolist()]
        # Those of the top num_beams that just ended join the finished hypotheses.
        just_done = ends & top_beams
        final = top_scores / ((step + 1) ** penalty)
        full = is_done.all(dim=-1, keepdim=True) & (early_stopping is True)
        final = final + full.float() * IMPOSSIBLE + (~improvable).float() * IMPOSSIBLE
        final = final + (~just_done).float() * IMPOSSIBLE
        merged_scores = torch.cat([done_scores, final], dim=1)
        best = merged_scores.topk(beams, dim=-1).indices
        done = _gather(torch.cat([done, grown], dim=1), best)
        done_scores = merged_scores.gather(1, best)
        is_done = torch.cat([is_done, just_done], dim=1).gather(1, best)
        new_lengths = torch.full_like(just_done, step + 1, dtype=torch.long)
        done_lengths = torch.cat([done_lengths, new_lengths], dim=1).gather(1, best)
        # Stop when no prompt can improve, every hypothesis is in (early_stopping=True), or
        # every candidate ended (max_new_tokens).
        length = max_new if early_stopping == "never" and penalty > 0 else step + 1
        best_running = running_scores[:, :1] / (length**penalty)
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, IMPOSSIBLE)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        all_in = bool(is_done.all()) and early_stopping is True
        if not bool(improvable.any()) or all_in or bool(ends.all()):
            break
        state = state.select((first_row + parents).flatten())
        state = advance_state(
            params, state, next_tokens.flatten(), config, attention=attention, hooks=hooks,
            head=head, write="in_place",
        )  # fmt: skip
    return done, done_lengths, done_scores


def _stop_hits(
    stops: StopStrings, tails: list[bytes], rows: Tensor, tokens: Tensor
) -> tuple[Tensor, list[bytes]]:
    """Which candidates (`tokens[b, c]` after running row `rows[b, c]`) complete a stop
    string, and each candidate's tail, flat in candidate order."""
    steps = [
        stops.step(tails[row], token)
        for row, token in zip(rows.flatten().tolist(), tokens.flatten().tolist(), strict=True)
    ]
    hits = torch.tensor([hit for hit, _ in steps], device=tokens.device).view(tokens.shape)
    return hits, [tail for _, tail in steps]


def _gather(sequences: Tensor, index: Tensor) -> Tensor:
    """`sequences[b, index[b, j]]` for each prompt `b`: `(batch, beams, n)` by `(batch, k)`."""
    return sequences.gather(1, index[..., None].expand(-1, -1, sequences.shape[-1]))
