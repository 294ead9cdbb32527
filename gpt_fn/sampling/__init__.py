"""Logit transforms, samplers and KV-cache decoding for GPT-2 (layer 3).

    from gpt_fn import sampling
    transform = sampling.make_transform(temperature=0.8, top_k=200, top_p=0.95)
    tokens = sampling.generate(params, prompt, config, max_new_tokens=100,
                               transform=transform, seed=0)
    for token in sampling.generate_stream(params, prompt, config, max_new_tokens=100,
                                          greedy=True):
        ...  # one token per row, as soon as it is chosen

- `transforms`: pure `(logits, context) -> logits` functions and `chain` (HF / OpenAI semantics).
- `samplers`: `greedy` and `categorical` (explicit generators).
- `decoding`: `prefill` / `decode_step` over an explicit `DecodeState`, `generate`; stop
  strings and `ban_padding_ids` (ids past the tokenizer are never generated where one is used).
- `head`: `decoding_head`, the tied LM head laid out for decode steps (`LMHead`).
- `beam`: `beam_search` (HF's rules and scores).
- `speculative`: `speculative_generate`, a draft model's tokens checked by the target.
"""

from gpt_fn.sampling.beam import BeamSearchOutput, beam_search
from gpt_fn.sampling.decoding import (
    DecodeState,
    ban_padding_ids,
    cut_at_stop,
    decode_step,
    decode_step_,
    fan_out,
    generate,
    generate_stream,
    prefill,
    row_generators,
)
from gpt_fn.sampling.head import LMHead, decoding_head
from gpt_fn.sampling.samplers import categorical, check_logits, greedy
from gpt_fn.sampling.speculative import (
    SpeculativeOutput,
    SpeculativeStats,
    speculative_generate,
)
from gpt_fn.sampling.transforms import (
    PAD,
    Transform,
    apply_transform,
    ban_tokens,
    chain,
    frequency_penalty,
    logit_bias,
    make_transform,
    min_p,
    no_repeat_ngram,
    presence_penalty,
    repetition_penalty,
    temperature,
    top_k,
    top_p,
    typical_p,
)

__all__ = [
    "PAD",
    "BeamSearchOutput",
    "DecodeState",
    "LMHead",
    "SpeculativeOutput",
    "SpeculativeStats",
    "Transform",
    "apply_transform",
    "ban_padding_ids",
    "ban_tokens",
    "beam_search",
    "categorical",
    "chain",
    "check_logits",
    "cut_at_stop",
    "decode_step",
    "decode_step_",
    "fan_out",
    "frequency_penalty",
    "generate",
    "generate_stream",
    "greedy",
    "decoding_head",
    "logit_bias",
    "make_transform",
    "min_p",
    "no_repeat_ngram",
    "prefill",
    "presence_penalty",
    "repetition_penalty",
    "row_generators",
    "speculative_generate",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
]
