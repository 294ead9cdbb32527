"""Shared fixtures: a tiny config (odd sizes on purpose) and a seeded generator."""

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
