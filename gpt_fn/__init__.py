"""gpt_fn: GPT-2 as pure, shape-typed functions over a parameter dict.

import gpt_fn
config = gpt_fn.GPTConfig.from_preset("cpu-tiny")
params = gpt_fn.init_params(config, seed=0)
logits = gpt_fn.forward(params, tokens, config)      # (batch, seq, vocab)
logits, cache = gpt_fn.run_with_cache(params, tokens, config, names=["h.0.attn.pattern"])

The names below load on first use (PEP 562): `import gpt_fn` itself imports nothing else, so
the `gpt-fn` command (`gpt_fn.__main__`) handles a Ctrl-C while torch is still importing.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt_fn.analysis import (
        accumulated_resid,
        apply_ln_to_stack,
        center_unembed,
        center_writing_weights,
        decompose_resid,
        direct_logit_attribution,
        fold_layer_norm,
        fold_value_biases,
        head_results,
        ln_f_bias_attr,
        logit_attrs,
        logit_lens,
        stack_head_results,
    )
    from gpt_fn.config import PRESETS, GPTConfig
    from gpt_fn.model import (
        check_params,
        check_tokens,
        forward,
        forward_from,
        init_params,
        loss,
        param_shapes,
        run_with_cache,
    )
    from gpt_fn.module import GPT
    from gpt_fn.shapes import Logits, Params, Tokens
    from gpt_fn.sites import Hook, Hooks, site_names

__all__ = [
    "GPT",
    "PRESETS",
    "GPTConfig",
    "Hook",
    "Hooks",
    "Logits",
    "Params",
    "Tokens",
    "accumulated_resid",
    "apply_ln_to_stack",
    "center_unembed",
    "center_writing_weights",
    "check_params",
    "check_tokens",
    "decompose_resid",
    "direct_logit_attribution",
    "fold_layer_norm",
    "fold_value_biases",
    "forward",
    "forward_from",
    "head_results",
    "init_params",
    "ln_f_bias_attr",
    "logit_attrs",
    "logit_lens",
    "loss",
    "param_shapes",
    "run_with_cache",
    "site_names",
    "stack_head_results",
]
_HOMES = ("analysis", "config", "model", "module", "shapes", "sites")
"""The modules the names of `__all__` come from (those imported above for type checkers)."""


def __getattr__(name: str) -> Any:
    if name in __all__:
        homes = (importlib.import_module(f"gpt_fn.{home}") for home in _HOMES)
        return next(getattr(home, name) for home in homes if hasattr(home, name))
    try:  # `gpt_fn.model` and the like without importing them first
        return importlib.import_module(f"gpt_fn.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"gpt_fn.{name}":
            raise
        raise AttributeError(f"module 'gpt_fn' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
