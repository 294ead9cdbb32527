"""Model configuration: one frozen dataclass and the GPT-2 presets.

Field names follow the GPT-2 checkpoint and nanoGPT (`n_layer`, `n_head`, `n_embd`,
`block_size`, `vocab_size`), so a config reads the same as HF's `GPT2Config`.
"""

import dataclasses
from dataclasses import dataclass


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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> "GPTConfig":
        """A preset by name (`gpt2`, `gpt2-medium`, ..., `cpu-small`), fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
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
