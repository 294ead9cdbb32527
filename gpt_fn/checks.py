"""Argument checks shared by every layer: one helper for each kind of check.

Each raises `ValueError` (or `TypeError` for a wrong kind of object) with a message that names
the argument and says what was expected. Data-dependent checks (reading tensor values) are
skipped where values cannot be read: under `torch.compile` and `vmap` (`is_traced`).
"""

import torch
from torch import Tensor


def is_traced(t: Tensor) -> bool:
    """Whether `t`'s values cannot be read now: under `torch.compile`, or batched by a `vmap`
    at any functorch level (`grad` layers may wrap the batched tensor).

    Data-dependent input checks (token ids < vocab) are skipped then.
    """
    if torch.compiler.is_compiling():
        return True
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False
