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


def test_the_evaluation_examples_run(tmp_path, monkeypatch):
    """The Evaluation section's Python blocks (the functions, under hooks, and the `--hooks`
    module) run on a tiny model with the names they leave to the reader."""
    text = README.read_text()
    section = text[text.index("## Evaluation") : text.index("### lm-evaluation-harness")]
    evaluation_code, hooks_module = re.findall(r"```python\n(.*?)```", section, re.S)
    config = GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=16)
    params = init_params(config, seed=0)
    y = torch.tensor([[464, 3797, 3332, 319]])
    (tmp_path / "hellaswag_val.jsonl").write_text(
        '{"ctx": "The cat", "endings": ["sat.", "flew away"], "label": 0}\n'
    )
    monkeypatch.chdir(tmp_path)
    namespace = {
        "params": params,
        "config": config,
        "tokens": torch.tensor([[464, 3797, 3332, 319, 262]]),
        "text_or_tokens": "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 3,
        "val_loss": 5.0,
        "y": y,
        "v": torch.ones(config.n_embd),
    }
    exec(compile(evaluation_code, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["steered"].nats != namespace["result"].nats
    assert namespace["ablated"].items == 1
    module: dict = {}
    exec(compile(hooks_module, str(README), "exec"), module)  # noqa: S102
    assert list(module["hooks"](params, config)) == ["h.1.resid_post"]


def test_the_plots_example_runs(tmp_path, monkeypatch):
    """The Plots block draws and writes its three PNGs, given the results it leaves to the
    reader (a `(n_layer, n_head)` tensor and logit-lens logits)."""
    import gpt_fn

    text = README.read_text()
    section = text[text.index("### Plots") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=16)
    tokens = torch.tensor([[464, 3797, 3332, 319, 262, 2603]])
    monkeypatch.chdir(tmp_path)
    namespace = {
        "gpt_fn": gpt_fn,
        "params": init_params(config, seed=0),
        "config": config,
        "tokens": tokens,
        "results": torch.randn(2, 2),
        "lens": torch.randn(3, 6, 50257),
    }
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    for name in ("attn.png", "heads.png", "lens.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_the_checkpoint_series_example_runs(tmp_path, monkeypatch):
    from gpt_fn.checkpoint import Checkpoint, save_checkpoint, series_path

    text = README.read_text()
    section = text[text.index("### Checkpoint series") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16)
    for step in (1, 2, 4):
        params = init_params(config, seed=step)
        save_checkpoint(
            series_path(tmp_path / "out", step), Checkpoint(params, {}, step, config, {})
        )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["series"].steps == [1, 2, 4]
    assert namespace["losses"].shape == (3,) and namespace["patterns"].shape == (3, 4, 2, 32, 32)


def test_the_inspect_example_runs(tmp_path, monkeypatch):
    """The Inspect block writes its report and scores heads against its own key mask."""
    text = README.read_text()
    section = text[text.index("### Inspect a prompt") : text.index("### Shape checks")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "ioi" / "report.md").is_file()
    assert (tmp_path / "ioi" / "results.json").is_file()
    assert namespace["found"].head_scores["duplicate_token"] is not None
    assert namespace["to_first"].shape == (2, 4)
