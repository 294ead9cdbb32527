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


def test_the_sae_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## SAEs") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["features"].shape == (4, 64, 256)
    assert (tmp_path / "sae_out" / "cfg.json").is_file()
