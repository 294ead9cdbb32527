"""A gpt_fn model as an lm-evaluation-harness `LM`, registered as `gpt_fn`, and lm-eval's CLI.

    python -m gpt_fn.harness --model gpt_fn --model_args checkpoint=out --tasks hellaswag
    gpt-fn lm-eval --model gpt_fn --model_args hf=exported/,batch_size=16 --tasks lambada_openai

    import gpt_fn.harness, lm_eval                       # importing registers "gpt_fn"
    lm_eval.simple_evaluate(model="gpt_fn", model_args="checkpoint=out", tasks=[...])
    lm_eval.simple_evaluate(model=gpt_fn.harness.GPTFnLM(params=params, config=config), ...)

Why a command of our own: lm-eval 0.4.13 finds models only in its built-in `MODEL_MAPPING`
(`lm_eval/models/__init__.py`) and in what was registered in the running process
(`@register_model`); it reads no entry points (`lm_eval/api/registry.py` accepts an
`EntryPoint` as a lazy target but nothing ever loads entry points from installed packages).
So a bare `lm_eval --model gpt_fn` cannot see this module; `python -m gpt_fn.harness ...` is
lm-eval's own CLI (`lm_eval.__main__.cli_evaluate`, every flag as is) run after the import
that registers `gpt_fn`.

`--model_args`: `checkpoint=DIR_OR_FILE` (a gpt_fn checkpoint) or `hf=DIR` (a Hugging Face
GPT-2 directory), `device` (default: cuda if available, else cpu; a CUDA device on a machine
without CUDA falls back to cpu, as lm-eval's `hf` model does, since lm-eval's CLI asks for
`cuda:0` by default), `batch_size` (default 8; given in `--model_args` it wins over
`--batch_size`, which lm-eval's CLI always passes, 1 unless given), `dtype` (`float32`, the default, `bfloat16`,
`float16`: the params are cast to it, as HF's `dtype=` loads a model; `auto`: as loaded),
`max_length` (default `block_size`), `max_gen_toks` (default 256), `seed` (sampling only;
default 1234, lm-eval's torch seed), `hooks=module:function` (every request runs under the
hooks `function(params, config)` returns: `gpt_fn.hooks.load_hooks`; in Python, `hooks=` also
takes a `{site: hook}` dict).

What each request computes is what lm-eval's `hf` model computes for GPT-2 (`HFLM`), so the
same weights score the same (tests hold them equal):

- `loglikelihood`: `gpt_fn.eval.encode_pair` + `score_continuations` (context's trailing
  whitespace moved into the continuation, an empty context becomes `<|endoftext|>`, left
  truncation to `max_length`).
- `loglikelihood_rolling`: lm-eval's own rolling windows (`get_rolling_token_windows` with
  `<|endoftext|>` as prefix and `make_disjoint_window`), each scored as above, summed.
- `generate_until`: `gpt_fn.sampling.generate` over the batch's prompts as token lists
  (left-truncated to `max_length - max_gen_toks`), greedy unless `do_sample`, making
  `max_gen_toks` tokens or, where the request gives `max_length`, as many as bring the batch's
  longest prompt to that length (HF's `generate(max_length=)`), stopping at
  `<|endoftext|>` or at the `until` strings across token boundaries; the text is cut before the
  first stop string, as lm-eval's `postprocess_generated_text` does. An empty prompt starts
  from `<|endoftext|>` (HF's model gets a row of nothing but padding there).

Tokens are GPT-2's (`gpt_fn.tokenizer.gpt2()`): ids the tokenizer never makes (a vocabulary
padded to 50304 for speed) are never generated, and log-probs are normalised over the 50257
real ids, so a checkpoint scores what `gpt-fn export --vocab-size 50257` of it scores in HF.
"""

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from tqdm import tqdm

from gpt_fn import sampling
from gpt_fn.checks import check_int
from gpt_fn.config import GPTConfig
from gpt_fn.eval import encode_pair, score_continuations
from gpt_fn.hooks import load_hooks
from gpt_fn.loading import load_model
from gpt_fn.model import check_params
from gpt_fn.runtime import DTYPES, resolve_device
from gpt_fn.shapes import Params
from gpt_fn.sites import Hooks, check_hooks
from gpt_fn.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's `HFLM.max_gen_toks`: tokens a `generate_until` request may make unless it says."""
DEFAULT_SEED = 1234
# generation_kwargs lm-eval tasks pass that map onto gpt_fn's transforms (HF's names).
_TRANSFORM_KWARGS = {
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram",
}


class GPTFnLM(TemplateLM):
    """lm-eval's `LM` over a gpt_fn parameter dict (pure functions; nothing is an nn.Module)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        hf: str | None = None,
        *,
        params: Params | None = None,
        config: GPTConfig | None = None,
        device: str = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = DEFAULT_SEED,
        hooks: Hooks | str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"gpt_fn model: unknown model_args {sorted(unknown)}; it takes checkpoint=, "
                "hf=, device=, batch_size=, dtype=, max_length=, max_gen_toks=, seed=, hooks="
            )
        sources = {
            name: value
            for name, value in (("checkpoint", checkpoint), ("hf", hf))
            if value is not None
        }
        if (params is None) == (not sources) or len(sources) > 1:
            raise ValueError(
                "gpt_fn model: give exactly one of model_args checkpoint=DIR or hf=DIR (or, "
                "in Python, params= and config=)"
            )
        if params is not None and config is None:
            raise ValueError("gpt_fn model: params= needs config=")
        if sources:
            ((name, value),) = sources.items()
            # lm-eval's argument parser may hand over a number: a path or hub name is text.
            loaded = load_model(**{name: str(value)})
            params, config = loaded.params, loaded.config
            self._source = f"{name}={value}"
        else:
            self._source = "params"
        assert params is not None and config is not None
        check_params(params, config)
        if config.vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(
                f"gpt_fn model: vocab_size {config.vocab_size} is smaller than GPT-2's tokenizer "
                f"({GPT2_VOCAB_SIZE} ids); lm-eval feeds it GPT-2 tokens"
            )
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(
                f"gpt_fn model: dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}"
            )
        self._device = _device(device)
        self.params = {
            name: value.to(device=self._device, dtype=DTYPES.get(dtype, value.dtype))
            for name, value in params.items()
        }
        self.config = config
        self.dtype_name = dtype
        self.batch_size = _batch_size(batch_size)
        self._max_length = config.block_size if max_length is None else max_length
        check_int("max_length", self._max_length, at_least=1)
        if self._max_length > config.block_size:
            raise ValueError(
                f"gpt_fn model: max_length={self._max_length} is more than the model's "
                f"block_size={config.block_size}"
            )
        self._max_gen_toks = check_int("max_gen_toks", max_gen_toks, at_least=1)
        self.seed = check_int("seed", seed, at_least=0)
        # Built from the params as they run (device, dtype), so its tensors match theirs.
        if isinstance(hooks, str):
            self._hooks_source: str | None = hooks
            self.hooks = load_hooks(hooks, self.params, config)
        else:
            self._hooks_source = None if hooks is None else "python"
            if hooks is not None:
                check_hooks(hooks, config)
            self.hooks = hooks
        self.encoding = gpt2()
        self._generate_calls = 0

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> "GPTFnLM":
        """The model from `--model_args` (`arg_string`) and the CLI's own flags
        (`additional_config`); a key in both is taken from `--model_args` (see
        `create_from_arg_obj`)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> "GPTFnLM":
        """The model from `arg_dict` (`--model_args`) and `additional_config` (lm-eval's
        `--batch_size`, `--max_batch_size`, `--device`). lm-eval's CLI always passes
        `batch_size` (1 unless given), so a `batch_size=` in `--model_args`, the more specific
        of the two, wins rather than colliding with it."""
        extra = {
            key: value
            for key, value in (additional_config or {}).items()
            if value is not None and key not in arg_dict
        }
        return cls(**arg_dict, **extra)

    # --- what TemplateLM needs ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        # HF's GPT-2 tokenizer reads "<|endoftext|>" in text as the special token; so do we.
        return self.encoding.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` without `<|endoftext|>` (HF's `skip_special_tokens=True`)."""
        return self.encoding.decode([t for t in tokens if t != EOT_TOKEN])

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_source": self._source,
            "model_num_parameters": sum(v.numel() for v in self.params.values()),
            "model_dtype": self.dtype_name,
            "model_config": self.config.to_dict(),
            "model_hooks": self._hooks_source,
        }

    # --- requests ----------------------------------------------------------------------------

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        encoded = [
            ((context, continuation), *encode_pair(context, continuation))
            for context, continuation in pairs
        ]
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        with tqdm(
            total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests"
        ) as bar:
            scores = score_continuations(
                self.params,
                [(context, continuation) for _, context, continuation in requests],
                self.config,
                max_length=self.max_length,
                batch_size=self.batch_size,
                vocab_size=GPT2_VOCAB_SIZE,
                progress=bar.update,
                hooks=self.hooks,
            )
        answers = [(score.logprob, score.greedy) for score in scores]
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in [req.args for req in requests]:
            pieces = [
                make_disjoint_window(pair)
                for pair in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows.extend((None, context, continuation) for context, continuation in pieces)
            counts.append(len(pieces))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, position = [], 0
        for (string,), count in zip([req.args for req in requests], counts, strict=True):
            total = math.fsum(logprob for logprob, _ in scores[position : position + count])
            position += count
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        results: list[str | None] = [None] * len(args)
        # One batch holds requests of one set of generation kwargs, longest prompts first.
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(index)
        with tqdm(
            total=len(args), disable=disable_tqdm, desc="Running generate_until requests"
        ) as bar:
            for indices in groups.values():
                indices.sort(key=lambda i: (-len(self.tok_encode(args[i][0])), args[i][0]))
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    texts = self._generate([args[i][0] for i in chunk], args[chunk[0]][1])
                    for i, text in zip(chunk, texts, strict=True):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
                    bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.encoding.decode([EOT_TOKEN])
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0))
        if max_gen_toks >= self.max_length:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                f"max_length={self.max_length}"
            )
        options: dict[str, Any] = {}
        for key in list(kwargs):
            if key in _TRANSFORM_KWARGS:
                value = kwargs.pop(key)
                if value is not None:
                    options[_TRANSFORM_KWARGS[key]] = value
        total_length = kwargs.pop("max_length", None)
        if kwargs:
            raise ValueError(f"gpt_fn model: unsupported generation kwargs {sorted(kwargs)}")
        if not do_sample:
            options = {}  # greedy: HF ignores the sampling knobs too
        elif temperature > 0:
            options["temperature"] = temperature
        transform = sampling.make_transform(**options)
        room = self.max_length - max_gen_toks
        prompts = [(self.tok_encode(context) or [EOT_TOKEN])[-room:] for context in contexts]
        if total_length is not None:
            max_gen_toks = self._new_tokens_within(total_length, prompts)
        self._generate_calls += 1
        seed = None
        if do_sample:
            entropy = np.random.SeedSequence([self.seed, self._generate_calls])
            seed = int(entropy.generate_state(1, np.uint32)[0])
        stops = [s for s in until if s and s != eos]
        rows = sampling.generate(
            self.params,
            prompts,
            self.config,
            max_new_tokens=max_gen_toks,
            transform=transform,
            greedy=not do_sample,
            seed=seed,
            eos_token_id=EOT_TOKEN,
            stop=stops or None,
            tokenizer=self.encoding,  # ids past it (vocabulary padding) are never generated
            hooks=self.hooks,
        )
        return [
            postprocess_generated_text(
                self.tok_decode(row[len(prompt) :]), stop=until, think_end_token=None
            )
            for row, prompt in zip(rows, prompts, strict=True)
        ]

    def _new_tokens_within(self, total_length: Any, prompts: list[list[int]]) -> int:
        """New tokens under a request's `max_length`, as lm-eval's `hf` model reads it: the
        batch's longest prompt plus the new tokens make at most `max_length` (it replaces
        `max_gen_toks`, as HF's `generate(max_length=)` replaces `max_new_tokens`)."""
        check_int("generation kwarg max_length", total_length, at_least=1)
        longest = max(len(prompt) for prompt in prompts)
        if total_length > self.max_length:
            raise ValueError(
                f"generation kwarg max_length={total_length} is more than the model's "
                f"max_length={self.max_length}"
            )
        if total_length <= longest:
            raise ValueError(
                f"generation kwarg max_length={total_length} leaves no room to generate after "
                f"the batch's longest prompt ({longest} tokens)"
            )
        return total_length - longest


if __name__ != "__main__":
    # Registered by the importable module only: `python -m gpt_fn.harness` runs this file as
    # __main__ and imports `gpt_fn.harness` below, which must not meet a second GPTFnLM.
    register_model("gpt_fn", "gpt-fn")(GPTFnLM)


def _device(spec: str) -> torch.device:
    """The device to run on. lm-eval's CLI asks for `cuda:0` unless `--device` is given; as
    its `hf` model does, a CUDA device without CUDA falls back to the CPU (with a warning)."""
    if str(spec).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("gpt_fn model: device %r, but CUDA is not available; running on cpu", spec)
        return torch.device("cpu")
    return resolve_device(str(spec))


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes `--batch_size` as given: an int, a digit string, or `auto`."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str):
        if value.strip().startswith("auto"):
            raise ValueError(
                "gpt_fn model: batch_size=auto is not supported (it probes GPU memory for HF "
                "models); pass a number, e.g. --batch_size 16"
            )
        if not value.strip().isdigit():
            raise ValueError(f"gpt_fn model: batch_size must be a positive int, got {value!r}")
        value = int(value)
    return check_int("batch_size", value, at_least=1)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm-eval ...`) with the `gpt_fn` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    # cli_evaluate reads sys.argv (and inserts `run` when no subcommand is named).
    sys.argv = ["lm-eval", *(saved[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    from gpt_fn.harness import main as registered_main  # importing it registers `gpt_fn`

    registered_main()
