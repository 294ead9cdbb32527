"""Smoke test of the benchmark suite: every benchmark runs and the runner writes its report.

The benchmarks run at toy sizes (the runner hands each `run` the keyword arguments below) so
the file takes seconds; the figures are meaningless and never asserted. What is asserted:
every table and plot reaches REPORT.md, and the numerical checks the benchmarks record hold
(both train-step contenders compute the same loss; the attention kernels agree, to a
tolerance per dtype).
"""

import importlib
import json

import pytest
import torch

from gpt_fn import GPTConfig

# benchmarks/ is a folder next to gpt_fn, not an installed package: `python -m pytest` from the
# repository root makes it importable.
run = importlib.import_module("benchmarks.run")
attention = importlib.import_module("benchmarks.attention")
train_step = importlib.import_module("benchmarks.train_step")
generate = importlib.import_module("benchmarks.generate")
optimizer = importlib.import_module("benchmarks.optimizer")
lm_head_loss = importlib.import_module("benchmarks.lm_head_loss")

# Toy sizes: odd widths, a vocabulary without GPT-2's end-of-text id.
TOY = GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=16)
TOY_SEQ_LENS = (8, 32)
TOY_SIZES = {
    "attention": {"seq_lens": TOY_SEQ_LENS},
    "train_step": {"config": TOY, "batch": 2},
    "generate": {"config": TOY},  # 16-token prompt + 32 new tokens fit its 64-token block
    "hooks": {"config": TOY},
    "prepare": {"sizes_mb": (0.2,)},
    "optimizer": {"config": TOY},
    "lm_head_loss": {"d_model": 16, "vocab": 97},
    "patching": {"config": TOY, "seq": 5},
    "inspect_prompt": {
        "config": GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    },
    "activation_checkpointing": {"config": TOY, "cases": ((8, 2), (16, 1))},
    "choices": {
        "config": GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=16),
        "items": 3,
    },
}

# How closely the attention kernels must agree, per dtype. The inputs are unit normals, so
# outputs (convex combinations of v's rows) and input gradients stay below 8 here (measured:
# up to ~6); both kernels compute the same sums, rounding at different points.
KERNEL_AGREEMENT = {
    # fp32 (24 significand bits) spaces values below 8 at most 2**-21 = 4.8e-7 apart; the
    # kernels sum the same terms in different orders (see test_attention): ~1e-6 here, and
    # 1e-4 (~200 of those steps) leaves room for longer reductions.
    "float32": 1e-4,
    # bf16 keeps 8 significand bits, so values in [4, 8) lie 2**-5 = 0.031 apart. The manual
    # kernel rounds its scores, softmax weights and output to bf16 one after another, while
    # sdpa accumulates in fp32 and rounds once: measured one step apart at the largest values
    # (0.016-0.031). Four steps, 0.125, leave room for a few roundings adding up, and still
    # catch a wrong mask or scale, which moves outputs by whole units.
    "bfloat16": 4 * 2**-5,
}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """One quick run of every benchmark through the runner, at toy sizes."""
    out = tmp_path_factory.mktemp("bench-out")
    # One thread: the runner hands it to every benchmark (and it is the steadier setting on a
    # shared machine).
    run.run_benchmarks(run.BENCHMARKS, quick=True, out=out, threads=1, sizes=TOY_SIZES)
    return out


def test_report_names_the_machine(out_dir):
    report = (out_dir / "REPORT.md").read_text()
    assert "## Machine" in report
    for field in ("| CPU |", "| device |", "| torch |"):
        assert field in report


@pytest.mark.parametrize("name", run.BENCHMARKS)
def test_runner_hands_its_thread_count_to_every_benchmark(out_dir, name):
    assert json.loads((out_dir / f"{name}.json").read_text())["threads"] == 1


@pytest.mark.parametrize("name", run.BENCHMARKS)
def test_report_holds_each_benchmarks_table(out_dir, name):
    report = (out_dir / "REPORT.md").read_text()
    table = (out_dir / f"{name}.md").read_text()
    assert f"## {name}" in report
    assert table.strip() in report
    assert "| ---" in table  # a markdown table, not just a caption
    json.loads((out_dir / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["attention", "train_step"])
def test_plots_are_written_and_linked(out_dir, name):
    assert (out_dir / f"{name}.png").stat().st_size > 0
    assert f"![{name}]({name}.png)" in (out_dir / "REPORT.md").read_text()


def test_activation_checkpointing_contenders_agree(out_dir):
    result = json.loads((out_dir / "activation_checkpointing.json").read_text())
    assert [(row["block"], row["batch"]) for row in result["rows"]] == [(8, 2), (16, 1)]
    for row in result["rows"]:
        # Recomputation repeats the same fp32 ops: equal to rounding (1e-6; measured 0).
        assert row["loss_difference"] <= 1e-6
        assert row["max_grad_difference"] <= 1e-6


def test_choices_contenders_agree(out_dir):
    result = json.loads((out_dir / "choices.json").read_text())
    # The same log-probs to rounding (fp32; see tests/test_eval.py) and the same accuracies.
    assert result["max_logprob_difference"] <= 1e-5
    assert result["same_accuracy"]


def test_train_step_contenders_compute_the_same_loss(out_dir):
    result = json.loads((out_dir / "train_step.json").read_text())
    (mode,) = result["modes"]  # quick: fp32 eager only
    assert (mode["dtype"], mode["compile"]) == ("float32", False)
    # Same weights and batch in fp32; the sums run in different orders (fused vs full-logits
    # cross-entropy), ~1e-6 on a loss of ~4.6.
    assert mode["first_loss_diff"] < 1e-4
    # After identical AdamW updates on both sides the trajectories still agree.
    assert mode["last_loss_diff"] < 1e-3


def test_generate_contenders_agree_and_the_floor_counts_every_weight(out_dir):
    result = json.loads((out_dir / "generate.json").read_text())
    assert all(row["same_tokens"] for row in result["results"])
    # The floor reads each block's four weight matrices and the LM head, fp32: at the toy
    # size 1 x (16*48 + 16*16 + 16*64 + 64*16) + 97*16 floats.
    assert result["floor"]["weight_mb"] == pytest.approx((48 + 16 + 64 + 64 + 97) * 16 * 4 / 1e6)
    assert result["floor"]["step_ms"] > 0
    # Steps early and late in one request were timed for both contenders.
    assert result["steps"]["window"] >= 1
    for name in ("gpt_fn cached", "HF generate"):
        assert result["steps"][name]["first_ms"] > 0
        assert result["steps"][name]["last_ms"] > 0
    # A long request against a short one, eager only in a quick run (no compiled contender):
    # both timed, the ratio theirs, and the short request's tokens begin the long one's.
    ratios = result["long_over_short"]
    assert ratios["short"] < ratios["long"] <= result["long_block_size"] - result["prompt_tokens"]
    speeds = ratios["tokens_per_s"]["gpt_fn cached"]
    assert speeds[str(ratios["short"])] > 0 and speeds[str(ratios["long"])] > 0
    ratio = speeds[str(ratios["long"])] / speeds[str(ratios["short"])]
    assert ratios["ratio"] == {"gpt_fn cached": pytest.approx(ratio)}
    assert ratios["cpu_ratio"]["gpt_fn cached"] > 0
    assert ratios["same_tokens"]
    assert ratios["compilations"] == 0  # eager decoding compiles nothing


def test_patching_sweeps_equal_transformer_lens_and_every_contender_is_timed(out_dir):
    result = json.loads((out_dir / "patching.json").read_text())
    assert [row["runs"] for row in result["rows"]] == [TOY.n_layer * 5, TOY.n_layer * TOY.n_head]
    for row in result["rows"]:
        # Both sides compute GPT-2 in fp32 (tests/test_patching.py's bound).
        assert row["max_abs_diff_vs_tl"] < 1e-5
        assert all(seconds > 0 for seconds in row["median_s"].values())
    assert "gpt_fn attribution_patch" in result["rows"][1]["median_s"]


def assert_attention_cases(result: dict, dtypes: list[str]) -> None:
    """Every (dtype, pass, seq, kernel) of the quick grid was timed, and the kernels agree."""
    cases = {(row["dtype"], row["pass"], row["seq"], row["kernel"]) for row in result["rows"]}
    assert cases == {
        (dtype, pass_name, seq, kernel)
        for dtype in dtypes
        for pass_name in attention.PASSES
        for seq in TOY_SEQ_LENS
        for kernel in ("sdpa", "manual")  # quick: no compiled kernel
    }
    for row in result["rows"]:
        assert row["max_abs_diff_vs_sdpa"] < KERNEL_AGREEMENT[row["dtype"]], row
    # The manual kernel materialises the (batch, heads, seq, seq) scores at least once, so the
    # memory measurement must see at least that much.
    for row in result["rows"]:
        if row["kernel"] == "manual":
            assert row["peak_mb"] >= row["scores_mb"] > 0


def test_attention_kernels_agree_and_every_case_is_timed(out_dir):
    result = json.loads((out_dir / "attention.json").read_text())
    # Quick mode runs bf16 only where it is native: expect what the benchmark says it ran,
    # always fp32, and every dtype it left out named in a note.
    assert result["dtypes"][0] == "float32"
    for dtype in set(attention.DTYPES) - set(result["dtypes"]):
        assert any(note.startswith(f"{dtype} skipped") for note in result["skipped"])
    assert_attention_cases(result, result["dtypes"])


def test_attention_kernels_agree_in_every_dtype():
    # bf16 asked for explicitly runs on any CPU (emulated where not native: slow, but these
    # sizes take a moment), so its tolerance is checked on every machine.
    result = attention.run(
        quick=True, dtypes=tuple(attention.DTYPES), seq_lens=TOY_SEQ_LENS, threads=1
    )
    assert result["dtypes"] == list(attention.DTYPES) and result["skipped"] == []
    assert_attention_cases(result, list(attention.DTYPES))


def test_runner_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    run.run_benchmarks(["optimizer"], quick=True, out=tmp_path, threads=before + 1, sizes=TOY_SIZES)
    assert torch.get_num_threads() == before


def test_runner_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        run.run_benchmarks(["nope"], out=tmp_path)
    with pytest.raises(SystemExit):
        run.main(["--only", "attention,nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="threads"):
        run.run_benchmarks(["attention"], out=tmp_path, threads=0)
    with pytest.raises(ValueError, match="nope"):
        run.run_benchmarks(["attention"], out=tmp_path, sizes={"nope": {}})


def test_attention_rejects_unknown_dtype(capsys):
    with pytest.raises(ValueError, match="float8"):
        attention.run(quick=True, dtypes=("float8",))
    # On the command line: a usage error naming the dtype, not a traceback.
    for main in (attention.main, train_step.main):
        with pytest.raises(SystemExit):
            main(["--dtypes", "float32,float8"])
        assert "unknown dtype(s) ['float8']" in capsys.readouterr().err
