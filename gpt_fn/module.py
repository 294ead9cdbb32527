"""`GPT`: a thin `nn.Module` over the same parameter dict, for the tools that want a Module.

DDP, `torch.compile`, `state_dict`, `torch.func.functional_call` and the optimizers in
`torch.optim` all speak `nn.Module`. `GPT` registers the dict's tensors as Parameters under
the same dotted names (so `state_dict()` keys are the param-dict keys) and its `forward` is the
pure `gpt_fn.model.forward` applied to whatever parameters the module holds at call time, which
includes the ones `functional_call` swaps in.
"""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from gpt_fn import model
from gpt_fn.checks import check_choice
from gpt_fn.config import GPTConfig
from gpt_fn.nn import KERNELS, AttentionKernel
from gpt_fn.shapes import Logits, Params, Tokens


class GPT(nn.Module):
    """`GPT(config, seed=0)` initialises; `GPT.from_params(params, config)` wraps a dict."""

    def __init__(
        self,
        config: GPTConfig,
        *,
        seed: int = 0,
        attention: AttentionKernel = "sdpa",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        params: Params | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention = check_choice("attention kernel", attention, KERNELS)
        if params is None:
            params = model.init_params(config, seed=seed, dtype=dtype, device=device)
        model.check_params(params, config)
        for name, value in params.items():
            *path, leaf = name.split(".")
            parent: nn.Module = self
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.register_parameter(leaf, nn.Parameter(value))

    @classmethod
    def from_params(
        cls, params: Params, config: GPTConfig, *, attention: AttentionKernel = "sdpa"
    ) -> "GPT":
        """Wrap `params` without copying: the module's Parameters share their storage."""
        return cls(config, attention=attention, params=params)

    def params(self) -> Params:
        """The parameter dict (the module's own Parameters, by name)."""
        return dict(self.named_parameters())

    def forward(
        self,
        tokens: Tokens,
        targets: Tokens | None = None,
        generator: torch.Generator | None = None,
    ) -> Logits | Float[Tensor, ""]:
        """Logits of `tokens`; with `targets`, the mean cross-entropy loss instead.

        The loss goes through `forward` (not a separate method) because DDP and
        `torch.compile` wrap `forward` only; it never materialises the full logits.
        """
        params = self.params()
        if targets is None:
            return model.forward(
                params, tokens, self.config, attention=self.attention, generator=generator
            )
        return model.loss(
            params, tokens, targets, self.config, attention=self.attention, generator=generator
        )
