"""`GPT`: a thin `nn.Module` over the same parameter dict, for the tools that want a Module.

DDP, FSDP, `torch.compile`, `state_dict`, `torch.func.functional_call` and the optimizers in
`torch.optim` all speak `nn.Module`. `GPT` registers the dict's tensors as Parameters under
the same dotted names (so `state_dict()` keys are the param-dict keys). Each block `h.{i}` is
a submodule (`Block`) whose `forward` is the pure `gpt_fn.model.block` over the Parameters it
holds at call time, and `GPT.forward` is `gpt_fn.model.forward`/`loss` with those blocks:
FSDP2's `fully_shard(model.h[i])` gathers a block's weights when its `forward` runs, and
`functional_call` swaps in whatever parameters it is given.

`checkpoint_blocks=True` is activation checkpointing: each block keeps only its input for
backward and recomputes its activations there (`torch.utils.checkpoint`, non-reentrant), so a
step holds one block's activations at a time instead of all of them, for one more forward of
the blocks. Losses and gradients are those of the plain module (dropout included: the
recomputation replays the generator's state). It lives here, on the module path that DDP, FSDP
and `gpt-fn train` use; the pure `gpt_fn.forward`/`loss` keep every activation, since a
function transform (`torch.func.grad`, `vmap`) traces its own backward, which
`torch.utils.checkpoint` does not take part in.
"""

import torch
import torch.utils.checkpoint
from jaxtyping import Float
from torch import Tensor, nn

from gpt_fn import model
from gpt_fn.checks import check_bool
from gpt_fn.config import GPTConfig
from gpt_fn.nn import AttentionKernel, KVWriter, Mask, attention_kernel
from gpt_fn.shapes import Activations, Logits, Params, Tokens
from gpt_fn.sites import LayerTaps


def _register(module: nn.Module, params: Params) -> None:
    """Register each tensor of `params` as a Parameter of `module` at its dotted name."""
    for name, value in params.items():
        *path, leaf = name.split(".")
        parent = module
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, nn.Parameter(value))


class Block(nn.Module):
    """Block `h.{i}`: its Parameters (`ln_1.weight`, `attn.c_attn.weight`, ...) and a forward."""

    def __init__(
        self,
        params: Params,
        config: GPTConfig,
        attention: AttentionKernel,
        *,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.config, self.attention, self.checkpoint = config, attention, checkpoint
        _register(self, params)

    def forward(
        self,
        x: Activations,
        *,
        mask: Mask | None = None,
        kv: KVWriter | None = None,
        taps: LayerTaps | None = None,
        generator: torch.Generator | None = None,
    ) -> Activations:
        parts: model.BlockParams = {"ln_1": {}, "attn": {}, "ln_2": {}, "mlp": {}}
        for name, value in self.named_parameters():
            part, rest = name.split(".", 1)
            parts[part][rest] = value

        def run(x: Activations, generator: torch.Generator | None) -> Activations:
            return model.block(
                parts,
                x,
                self.config,
                attention=self.attention,
                mask=mask,
                kv=kv,
                taps=taps,
                generator=generator,
            )

        # Only a plain training forward recomputes: a decoding step (kv) writes a cache, and a
        # hooked run may record or draw what it sees, which must happen once.
        if not (self.checkpoint and torch.is_grad_enabled() and kv is None and taps is None):
            return run(x, generator)
        if generator is None:
            return torch.utils.checkpoint.checkpoint(run, x, None, use_reentrant=False)
        # Dropout draws from `generator`: forward and recomputation each draw from a copy made
        # at the state it had here, and `generator` then moves on as the plain block moves it.
        start = generator.get_state()
        end: list[Tensor] = []

        def replay(x: Activations) -> Activations:
            copy = torch.Generator(device=generator.device)
            copy.set_state(start)
            out = run(x, copy)
            end.append(copy.get_state())
            return out

        out = torch.utils.checkpoint.checkpoint(replay, x, use_reentrant=False)
        generator.set_state(end[0])
        return out


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
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention = attention_kernel(attention)
        check_bool("checkpoint_blocks", checkpoint_blocks)
        if params is None:
            params = model.init_params(config, seed=seed, dtype=dtype, device=device)
        model.check_params(params, config)
        # In `param_shapes` order, so `named_parameters()` lists them as the dict does.
        by_block: list[Params] = [{} for _ in range(config.n_layer)]
        for name, value in params.items():
            if name.startswith("h."):
                _, index, rest = name.split(".", 2)
                by_block[int(index)][rest] = value
        _register(self, {k: v for k, v in params.items() if k in ("wte.weight", "wpe.weight")})
        self.h = nn.ModuleList(
            Block(p, config, self.attention, checkpoint=checkpoint_blocks) for p in by_block
        )
        _register(self, {k: v for k, v in params.items() if k.startswith("ln_f.")})

    @classmethod
    def from_params(
        cls,
        params: Params,
        config: GPTConfig,
        *,
        attention: AttentionKernel = "sdpa",
        checkpoint_blocks: bool = False,
    ) -> "GPT":
        """Wrap `params` without copying: the module's Parameters share their storage."""
        return cls(config, attention=attention, params=params, checkpoint_blocks=checkpoint_blocks)

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

        The loss goes through `forward` (not a separate method) because DDP, FSDP and
        `torch.compile` wrap `forward` only; it never materialises the full logits.
        """
        top = {
            name: value
            for name, value in self.named_parameters(recurse=True)
            if not name.startswith("h.")
        }
        blocks = list(self.h)
        if targets is None:
            return model.forward(
                top, tokens, self.config, attention=self.attention, generator=generator,
                blocks=blocks,
            )  # fmt: skip
        return model.loss(
            top, tokens, targets, self.config, attention=self.attention, generator=generator,
            blocks=blocks,
        )  # fmt: skip
