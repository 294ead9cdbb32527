"""Shared fixtures: a tiny config (odd sizes on purpose), a seeded generator, a tiny corpus,
one thread."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_fn import GPTConfig

# The SAELens interop tests need sae-lens, which needs transformer-lens < 4: they run in their
# own venv (.ci/run), which sets GPT_FN_SAE_INTEROP=1; the main suite does not collect them.
collect_ignore = [] if os.environ.get("GPT_FN_SAE_INTEROP") else ["sae_interop"]


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


@pytest.fixture
def plain_python():
    """Run a snippet in a fresh interpreter, where gpt_fn is imported without pytest's
    jaxtyping hook (what `torch.compile(fullgraph=True)` needs: dynamo cannot trace the
    checker's wrapper); fail with its output if it fails."""

    def run(code: str, timeout: float = 600) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    return run


@pytest.fixture(scope="session")
def transformer_lens_bridge():
    """`transformer_lens_bridge(directory, **compatibility)`: TransformerLens's
    `TransformerBridge` over the HF GPT-2 saved in `directory`, on the CPU, in compatibility mode
    (`enable_compatibility_mode(**compatibility)`: `no_processing=True` keeps HF's numerics).
    Skips the test where transformer_lens is not installed."""

    def boot(directory, **compatibility):
        pytest.importorskip("transformer_lens")
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
        bridge.enable_compatibility_mode(**compatibility)
        return bridge

    return boot


@pytest.fixture
def file_size_limit():
    """Within `with file_size_limit(n):` no file this process writes may grow past n bytes, as on
    a full disk: writes fail with EFBIG (SIGXFSZ ignored, so the process is not killed)."""
    import contextlib
    import resource
    import signal

    @contextlib.contextmanager
    def limit(size: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    return limit
