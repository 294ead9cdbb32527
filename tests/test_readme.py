"""README.md's Python examples run as written (with their paths pointed at a temp folder); its
site table lists exactly the sites `gpt_fn.sites` defines; its links lead somewhere."""

import re
from pathlib import Path

import pytest
import torch

from gpt_fn import GPTConfig, hf, init_params, sites

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


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


def site_table(text: str) -> dict[str, str]:
    """The first markdown table in `text` whose header starts `| site | shape |`, as
    `{site: shape}` with block sites relative to `h.{i}.`. A cell may name several sites
    (`` `h.{i}.attn.q`, `.k`, `.v` ``: a leading dot replaces the previous name's last part)
    with one shape for all or one shape each."""
    table = text[text.index("| site | shape |") :].split("\n\n")[0].splitlines()[2:]
    shapes_of = {}
    for row in table:
        names_cell, shapes_cell = row.split("|")[1:3]
        names, shapes = re.findall(r"`([^`]+)`", names_cell), re.findall(r"`([^`]+)`", shapes_cell)
        assert len(shapes) in (1, len(names)), row
        full = []
        for name in names:
            full.append(full[-1].rsplit(".", 1)[0] + name if name.startswith(".") else name)
        shapes = shapes * len(full) if len(shapes) == 1 else shapes
        for name, shape in zip(full, shapes, strict=True):
            site = name.removeprefix("h.{i}.")
            assert site not in shapes_of, f"{site} is listed twice"
            shapes_of[site] = shape
    return shapes_of


@pytest.mark.parametrize(
    "where, text",
    [
        ("README.md", README.read_text().split("### Activation sites", 1)[1]),
        ("gpt_fn/sites.py's docstring", sites.__doc__),
    ],
)
def test_the_site_tables_list_every_site_with_one_shape(where, text):
    table = site_table(text)
    assert set(table) == {*sites.BLOCK_SITES, *sites.TOP_SITES}, where
    assert table == site_table(sites.__doc__), f"{where} and gpt_fn.sites disagree on a shape"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lowercase, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md", "experiments/README.md"])
def test_relative_links_reach_a_file_and_heading(doc):
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc} links to {file}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{doc}: no heading #{anchor}"
