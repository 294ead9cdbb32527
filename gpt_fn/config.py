"""Model configuration: one frozen dataclass and the GPT-2 presets.

Field names follow the GPT-2 checkpoint and nanoGPT (`n_layer`, `n_head`, `n_embd`,
`block_size`, `vocab_size`), so a config reads the same as HF's `GPT2Config`.
"""

import dataclasses
from dataclasses import dataclass

from gpt_fn.checks import check_bool, check_choice, check_int, check_number


@dataclass(frozen=True)
class GPTConfig:
    """Shape and regularisation of a GPT-2 style model; validated when built."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(f"GPTConfig.{name}", getattr(self, name), at_least=1)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        check_bool("GPTConfig.bias", self.bias)
        check_number("GPTConfig.dropout", self.dropout, at_least=0.0, below=1.0)
        check_number("GPTConfig.layer_norm_eps", self.layer_norm_eps, above=0.0)

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> "GPTConfig":
        """A preset by name (`gpt2`, `gpt2-medium`, ..., `cpu-small`), fields overridden."""
        check_choice("preset", name, sorted(PRESETS))
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**fields)  # type: ignore[arg-type]


# 50304 = 50257 rounded up to a multiple of 64 (nanoGPT): faster matmuls; the extra rows
# are never produced by the tokenizer.
PADDED_GPT2_VOCAB = 50304

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Trains on the Shakespeare corpus on two CPU cores in minutes (the default of `gpt-fn train`).
    "cpu-small": GPTConfig(
        vocab_size=PADDED_GPT2_VOCAB, block_size=128, n_layer=4, n_head=4, n_embd=256
    ),
    # For tests and smoke runs: seconds, not minutes.
    "cpu-tiny": GPTConfig(
        vocab_size=PADDED_GPT2_VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=64
    ),
}
