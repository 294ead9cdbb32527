"""`gpt-fn sae train` / `gpt-fn sae eval` as a user meets them: SAE folders SAELens can read,
metrics.jsonl, and every mistake one line with a non-zero exit."""

import json
import re

import pytest

from gpt_fn import GPTConfig, cli, data, init_params, sae_cli
from gpt_fn.checkpoint import Checkpoint, save_checkpoint
from gpt_fn.rundir import read_metrics
from gpt_fn.sae import load_sae, save_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


def assert_usage_error(code: int, err: str, pattern: str) -> None:
    """argparse's way, as the other commands: its usage line, the error, exit 2."""
    assert code == 2 and re.search(pattern, err), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def model_and_data(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae_cli")
    config = GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16)
    save_checkpoint(folder / "ckpt", Checkpoint(init_params(config, seed=0), {}, 5, config, {}))
    data.prepare(str(corpus), folder / "tokens", val_fraction=0.2)
    return folder / "ckpt", folder / "tokens"


TINY = ["--steps=6", "--batch-size=32", "--model-batch-size=2", "--block-size=16"]


def test_train_writes_k_saes_and_a_metrics_line_per_step_and_eval_reads_them(
    capsys, model_and_data, tmp_path, monkeypatch
):
    ckpt, tokens = model_and_data
    out = tmp_path / "saes"
    saved = []
    monkeypatch.setattr(
        sae_cli, "save_sae", lambda folder, *a, **k: saved.append(save_sae(folder, *a, **k))
    )
    code, stdout, err = run(
        capsys, "sae", "train", "--checkpoint", ckpt, "--data", tokens, "--site",
        "h.1.resid_post", "--kind", "topk", "--d-sae", "32", "64", "--k", "4", "--out", out,
        "--save-interval", "3", *TINY,
    )  # fmt: skip
    assert code == 0, err
    assert "wrote 2 SAE(s)" in stdout
    assert len(saved) == 2 * 3  # at steps 3 and 6 (--save-interval 3), and at the end
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    assert len(records[0]["saes"]) == 2
    sae, config, site = load_sae(out / "sae_1")
    assert (config.d_in, config.d_sae, config.k, site) == (16, 64, 4, "h.1.resid_post")
    code, stdout, err = run(
        capsys, "sae", "eval", "--checkpoint", ckpt, "--data", tokens, "--sae", out / "sae_0",
        "--batches=1", "--batch-size=2", "--block-size=16",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["site"] == "h.1.resid_post" and 0 < metrics["l0"] <= 4
    assert {"explained_variance", "mse", "dead_features", "ce_loss_recovered"} <= metrics.keys()
    code, _, err = run(
        capsys, "sae", "train", "--checkpoint", ckpt, "--data", tokens, "--site",
        "h.1.resid_post", "--d-sae", "32", "--out", out, *TINY,
    )  # fmt: skip
    assert_one_line(code, err, "already holds a run")


def test_sae_input_errors_are_one_line(capsys, model_and_data, tmp_path):
    ckpt, tokens = model_and_data
    base = ["sae", "train", "--checkpoint", ckpt, "--data", tokens, "--out", tmp_path / "o", *TINY]
    code, _, err = run(capsys, *base, "--site", "h.1.resid", "--d-sae", "8")
    assert_one_line(code, err, "unknown activation site 'h.1.resid'")
    code, _, err = run(
        capsys,
        *base,
        "--site",
        "h.1.mlp.out",
        "--d-sae",
        "8",
        "16",
        "4",
        "--k",
        "2",
        "3",
        "--kind",
        "topk",
    )
    assert_usage_error(code, err, r"--k takes 1 or 3 values")
    code, _, err = run(capsys, *base, "--site", "h.1.mlp.out", "--d-sae", "8", "--kind", "topk")
    assert_usage_error(code, err, "--kind topk needs --k")
    # An SAE whose d_in does not fit the site it is evaluated at.
    code, _, err = run(
        capsys, *base[: -len(TINY)], *TINY, "--site", "h.0.resid_post", "--d-sae", "8"
    )
    assert code == 0, err
    code, _, err = run(
        capsys, "sae", "eval", "--checkpoint", ckpt, "--data", tokens, "--sae",
        tmp_path / "o" / "sae_0", "--site", "h.0.mlp.pre", "--batches=1", "--batch-size=2",
    )  # fmt: skip
    assert_one_line(code, err, r"d_in=16 cannot read 'h.0.mlp.pre', which has 64")
    code, _, err = run(
        capsys, "sae", "eval", "--checkpoint", ckpt, "--data", tokens, "--sae", tmp_path,
    )  # fmt: skip
    assert_one_line(code, err, "no cfg.json")
