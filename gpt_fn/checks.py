"""Argument checks shared by every layer: one helper for each kind of check.

Each helper takes the argument's name as the caller knows it (`"top_k"`, `"GPTConfig.n_layer"`)
and its value, returns the value when it is fine (an `int`, a `float`, ...) and otherwise raises
one line that names the argument, says what was expected and shows what came:

- Python scalars (ints, numbers, bools, choices): `ValueError`, also for a value of the wrong
  kind (`top_k(2.5)`, `top_k(True)`, `GPTConfig(bias="no")`), so users without the shape checker
  get the same error class for every bad setting (optax, HF processors do likewise).
- Tensors: `TypeError` for the wrong kind of object or dtype, `ValueError` for bad values.

Data-dependent checks (reading tensor values) are skipped where values cannot be read: under
`torch.compile` and `vmap` (`is_traced`).
"""

import math
from collections.abc import Collection, Mapping, Sequence
from numbers import Real
from typing import TypeVar

import torch
from jaxtyping import Bool
from torch import Tensor

T = TypeVar("T")

TOKEN_DTYPES = (torch.int64, torch.int32)
"""The dtypes embedding lookups and `gather` accept as token ids."""


def check_int(name: str, value: object, *, at_least: int | None = None) -> int:
    """`value` if it is an `int` (not a `bool`) and `>= at_least`; else `ValueError`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (at_least is not None and value < at_least)
    ):
        kind = "a positive int" if at_least == 1 else "an int"
        if at_least is not None and at_least != 1:
            kind += f" >= {at_least}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


SEED_LIMIT = 2**64
"""Seeds are in [0, 2**64): what `torch.Generator.manual_seed` takes (and numpy's SeedSequence)."""


def check_seed(name: str, value: object) -> int:
    """`value` if it is an int in [0, 2**64) (`SEED_LIMIT`); else `ValueError` naming the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> float:
    """`value` as a `float` if it is a finite real number (not a `bool`) within the bounds given.

    `at_least`/`above` bound it from below (`>=`/`>`), `at_most`/`below` from above (`<=`/`<`).
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    fits = (
        (at_least is None or number >= at_least)
        and (above is None or number > above)
        and (at_most is None or number <= at_most)
        and (below is None or number < below)
    )
    if not fits:
        raise ValueError(
            f"{name} must be {_interval(at_least, above, at_most, below)}, got {value!r}"
        )
    return number


def _interval(
    at_least: float | None, above: float | None, at_most: float | None, below: float | None
) -> str:
    """The bounds of `check_number` as a reader writes them: `"> 0"`, `"in [0, 1)"`."""
    has_low, has_high = (
        at_least is not None or above is not None,
        at_most is not None or below is not None,
    )
    if has_low and has_high:
        opening = f"[{at_least:g}" if at_least is not None else f"({above:g}"
        closing = f"{at_most:g}]" if at_most is not None else f"{below:g})"
        return f"in {opening}, {closing}"
    bounds = ((">=", at_least), (">", above), ("<=", at_most), ("<", below))
    return " and ".join(f"{op} {bound:g}" for op, bound in bounds if bound is not None)


def check_bool(name: str, value: object) -> bool:
    """`value` if it is a `bool`; else `ValueError` (a truthy string is not a switch)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_choice(name: str, value: T, choices: Sequence[T]) -> T:
    """`value` if it is one of `choices`; else `ValueError` listing them."""
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"unknown {name} {value!r}; choose one of {listed}")
    return value


def check_token_id(name: str, value: object, *, vocab_size: int) -> int:
    """`value` if it is an `int` token id in `[0, vocab_size)`; else `ValueError`."""
    token = check_int(name, value, at_least=0)
    if token >= vocab_size:
        raise ValueError(f"{name} {token} is outside [0, vocab_size={vocab_size})")
    return token


def check_token_tensor(name: str, value: object) -> Tensor:
    """`value` if it is a tensor of token ids (int64 or int32); else `TypeError`."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids, got {type(value).__name__}; "
            "wrap it with torch.tensor(...)"
        )
    if value.dtype not in TOKEN_DTYPES:
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        raise TypeError(
            f"{name} must be an int64 or int32 tensor, got dtype {value.dtype}; "
            "convert it with .long()"
        )
    return value


def check_token_ids(name: str, tokens: Tensor, *, vocab_size: int) -> None:
    """`ValueError` naming the first id outside `[0, vocab_size)` (one host sync); skipped when
    the values cannot be read (`is_traced`)."""
    if not tokens.numel() or is_traced(tokens):
        return
    low, high = (int(x) for x in torch.stack(torch.aminmax(tokens)).tolist())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} {bad} is outside [0, vocab_size={vocab_size})")


def check_token_batch(
    tokens: object, *, vocab_size: int, block_size: int | None = None, name: str = "tokens"
) -> None:
    """`TypeError`/`ValueError` naming what is wrong with a `(batch, seq)` token tensor.

    It must be an int64/int32 tensor of ids in `[0, vocab_size)`, at most `block_size` long
    (None: any length). The id range is not checked while compiling or under vmap.
    """
    check_token_tensor(name, tokens)
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, seq), got shape {tuple(tokens.shape)}")
    if block_size is not None and tokens.shape[1] > block_size:
        raise ValueError(
            f"sequence of {tokens.shape[1]} positions is longer than block_size={block_size}"
        )
    what = "token id" if name == "tokens" else f"{name}: token id"
    check_token_ids(what, tokens, vocab_size=vocab_size)


def check_attention_mask(attention_mask: object, tokens: Tensor) -> Bool[Tensor, "batch seq"]:
    """The mask as bool, or `ValueError`/`TypeError` naming what is wrong with it.

    It must be a `(batch, seq)` tensor of 0/1 (or bool) shaped like `tokens`, and every row
    needs at least one real token (1).
    """
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens "
            f"{tuple(tokens.shape)}: one 0/1 per token"
        )
    if attention_mask.dtype != torch.bool:
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
        if not is_traced(attention_mask) and bool(
            ((attention_mask != 0) & (attention_mask != 1)).any()
        ):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
        attention_mask = attention_mask.bool()
    if not is_traced(attention_mask):
        empty = (~attention_mask.any(dim=1)).nonzero()
        if len(empty):
            raise ValueError(
                f"attention_mask row {int(empty[0, 0])} has no real token (all 0); every row "
                "needs at least one"
            )
    return attention_mask


def check_shapes(
    tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], *, what: str
) -> None:
    """`tensors` has exactly the keys of `expected`, with those shapes; errors name the key."""
    check_same_keys(tensors, expected, what=f"{what} for this config")
    for name, shape in expected.items():
        if not isinstance(tensors[name], Tensor):
            raise TypeError(
                f"{what}: {name!r} is a {type(tensors[name]).__name__}, not a torch.Tensor"
            )
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                "for this config"
            )


def check_one_dtype_and_device(tensors: Mapping[str, Tensor], *, reference: str, what: str) -> None:
    """Every tensor is floating point, on `tensors[reference]`'s device and of its dtype.

    `TypeError` for a non-floating tensor or another dtype, `ValueError` for another device;
    errors name the tensor. Mixed dtypes are let through under autocast on that device, which
    casts the matmuls' operands (fp16 weights with fp32 LayerNorms, apex's O2).
    """
    dtypes = {value.dtype for value in tensors.values()}
    devices = {value.device for value in tensors.values()}
    if len(dtypes) == 1 and len(devices) == 1 and next(iter(dtypes)).is_floating_point:
        return  # the common case: one pass for each, no per-tensor comparisons
    first = tensors[reference]
    for name, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{what}: {name!r} has dtype {value.dtype}; {what} must be floating point"
            )
        if value.device != first.device:
            raise ValueError(
                f"{what}: {name!r} is on {value.device} but {reference!r} is on {first.device}; "
                f"move all {what} to one device"
            )
        if value.dtype != first.dtype and not torch.is_autocast_enabled(first.device.type):
            raise TypeError(
                f"{what}: {name!r} has dtype {value.dtype} but {reference!r} has {first.dtype}; "
                f"cast all {what} to one dtype (or run under autocast)"
            )


def is_batched(t: Tensor) -> bool:
    """Whether `t` is batched by a `vmap` at any functorch level (`grad` layers may wrap it)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def is_traced(t: Tensor) -> bool:
    """Whether `t`'s values cannot be read now: under `torch.compile`, or batched by a `vmap`.

    Data-dependent input checks (token ids < vocab) are skipped then.
    """
    return torch.compiler.is_compiling() or is_batched(t)


def check_same_keys(
    got: Collection[str],
    expected: Collection[str],
    *,
    what: str,
    error: type[Exception] = KeyError,
) -> None:
    """`error` (a `KeyError` unless told) unless `got` has exactly the keys of `expected`.

    `got` and `expected` are dicts, their keys or sets. The one line reads
    `"{what}: missing 2 keys ['a', 'b']; 1 unexpected key ['c']"`, each list in its collection's
    order and cut after three names.
    """
    missing = [key for key in expected if key not in got]
    unexpected = [key for key in got if key not in expected]
    if missing or unexpected:
        problems = [f"missing {_some_keys(missing)}"] if missing else []
        problems += [_some_keys(unexpected, "unexpected ")] if unexpected else []
        raise error(f"{what}: {'; '.join(problems)}")


def _some_keys(keys: list[str], kind: str = "") -> str:
    """`"2 keys ['a', 'b']"`: the count, and the first three names."""
    shown = ", ".join(repr(key) for key in keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} {kind}key{'' if len(keys) == 1 else 's'} [{shown}]"
