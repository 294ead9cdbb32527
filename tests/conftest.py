"""Shared fixtures: a tiny config (odd sizes on purpose), a seeded generator, a tiny corpus."""

from pathlib import Path

import pytest
import torch

from gpt_fn import GPTConfig


@pytest.fixture
def tiny_config() -> GPTConfig:
    # Odd head count, vocab not a multiple of 64, short block: shapes that catch layout bugs.
    return GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


SPEECH = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
    "Deny thy father and refuse thy name.\n\n"
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A one-file corpus of a repeated speech: a model learns it in a few steps."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(SPEECH * 40)
    return path
