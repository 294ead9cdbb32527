"""README.md's Python API example runs as written (with its paths pointed at a temp folder)."""

import re
from pathlib import Path

import torch

from gpt_fn import GPTConfig, hf, init_params

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)
    hf.save(init_params(config, seed=0), config, tmp_path / "gpt2")
    code = code.replace("path/to/gpt2", str(tmp_path / "gpt2")).replace(
        '"exported/"', repr(str(tmp_path / "exported"))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape[-1] == 50304
    assert torch.isfinite(namespace["attribution"]).all()
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_the_analysis_example_runs():
    text = README.read_text()
    section = text[text.index("### Analysis") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    logits, wrong = namespace["logits"], namespace["wrong"]
    last, answer = logits[:, -1], namespace["answer"]
    difference = last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])
    # A sum of 30-odd fp32 terms of order 1: a few ulps.
    torch.testing.assert_close(namespace["total"], difference[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(namespace["by_head"].sum(0), difference[:, 0], atol=1e-4, rtol=0)


def test_the_patching_example_runs():
    text = README.read_text()
    section = text[text.index("### Patching") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    config = namespace["config"]
    assert namespace["by_position"].shape == (config.n_layer, 12)
    assert namespace["by_head"].shape == namespace["estimate"].shape == (2, 2)
    assert namespace["path"].shape == () and namespace["logits"].shape == (4, 12, 50304)
