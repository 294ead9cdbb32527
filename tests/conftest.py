"""Shared fixtures: a tiny config (odd sizes on purpose), a seeded generator, a tiny corpus,
one thread."""

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


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    for tiny tensors a second thread costs more than it saves, much more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
