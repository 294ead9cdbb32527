"""Shape-typed aliases shared by every module, and the switch for run-time shape checks.

Axis names are one vocabulary everywhere, in annotations and einops patterns alike
(TransformerLens): `batch seq d_model n_head d_head d_mlp vocab`.

Checks come from jaxtyping + beartype. Under pytest they are on for all of `gpt_fn`
(`--jaxtyping-packages=gpt_fn,beartype.beartype` in pyproject.toml). A user turns them on by
importing gpt_fn under jaxtyping's hook::

    with jaxtyping.install_import_hook("gpt_fn", "beartype.beartype"):
        import gpt_fn

Timed and compiled code runs with checks off (`shape_checks(False)`): each check costs
Python time, and jaxtyping under dynamo forces recompiles.
"""

import contextlib
from collections.abc import Iterator

import jaxtyping
from jaxtyping import Float, Int
from torch import Tensor

Params = dict[str, Tensor]
"""A model's parameters by dotted name (`h.3.attn.c_attn.weight`); the model *is* this dict."""

Tokens = Int[Tensor, "batch seq"]
Logits = Float[Tensor, "batch seq vocab"]
Activations = Float[Tensor, "batch seq d_model"]


@contextlib.contextmanager
def shape_checks(enabled: bool) -> Iterator[None]:
    """Turn jaxtyping's run-time checks on or off inside the block (where they were installed)."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", not enabled)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)
