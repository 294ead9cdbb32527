"""The training loop: exact resume, divergence handling, config checks, DDP, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt_fn.model
from gpt_fn import cli, runlog
from gpt_fn.checkpoint import CheckpointError, load_checkpoint, load_series, series_steps
from gpt_fn.rundir import read_metrics
from gpt_fn.settings import SettingsError, TrainSettings
from gpt_fn.train import TrainingDiverged, train


def _settings(corpus: Path, out_dir: Path, **overrides) -> TrainSettings:
    fields = dict(
        data=str(corpus),
        data_dir=str(out_dir.parent / "tokens"),
        out_dir=str(out_dir),
        preset="cpu-tiny",
        n_layer=1,
        n_embd=32,
        block_size=16,
        batch_size=4,
        max_steps=12,
        warmup_steps=1,
        eval_interval=6,
        eval_batches=2,
        sample_tokens=8,
        lr=3e-3,
    )
    return TrainSettings(**{**fields, **overrides})


def _quiet(*args, **kwargs):
    return None


def test_resumed_run_equals_an_uninterrupted_run(corpus, tmp_path):
    full = _settings(corpus, tmp_path / "full", max_steps=12)
    train(full, log=_quiet)
    half = _settings(corpus, tmp_path / "half", max_steps=6, lr_decay_steps=12)
    train(half, log=_quiet)
    assert load_checkpoint(tmp_path / "half").step == 6
    train(_settings(corpus, tmp_path / "half", max_steps=12, resume=True), log=_quiet)

    uninterrupted = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "half" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(12))
    # Same batches, lr and state on the same CPU kernels: equal to the last bit; 1e-6 is the
    # bound the issue asks for.
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
        assert a["lr"] == b["lr"]
    end_a, end_b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "half")
    # Params may differ by ~1e-7 after several resumed steps: MKL's GEMM picks code paths by
    # the alignment of activation buffers, which depends on the process's allocation history
    # (MKL "conditional numerical reproducibility"). Two uninterrupted runs are bit-equal.
    for name in end_a.params:
        torch.testing.assert_close(end_a.params[name], end_b.params[name], atol=1e-5, rtol=0)


def test_metrics_plot_and_sample_are_written(corpus, tmp_path):
    asked = []

    def sample(params, config, *, tokens, seed):
        asked.append((tokens, seed, {p.dtype for p in params.values()}))
        return cli.sample_text(params, config, tokens=tokens, seed=seed)

    settings = _settings(corpus, tmp_path / "run", max_steps=6)
    summary = train(settings, log=_quiet, sample=sample)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[0])
    assert "val_loss" in records[5]
    assert records[-1]["loss"] < records[0]["loss"]  # it learns the repeated speech
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert summary["sample"].startswith("ROMEO:")
    assert asked == [(8, settings.seed, {torch.float32})]  # once, after the last step


def test_a_run_without_a_sample_callback_samples_nothing(corpus, tmp_path):
    summary = train(_settings(corpus, tmp_path / "run", max_steps=2, sample_every=1), log=_quiet)
    assert "sample" not in summary


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_settings(corpus, out, max_steps=6), log=_quiet)
    real_loss = gpt_fn.model.loss

    def poisoned(*args, **kwargs):
        return real_loss(*args, **kwargs) * float("nan")

    monkeypatch.setattr(gpt_fn.model, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="diverged at step 6.*last good checkpoint"):
        train(_settings(corpus, out, max_steps=12, resume=True), log=_quiet)
    assert load_checkpoint(out).step == 6


def test_an_eval_steps_record_is_written_before_its_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"

    def closed_pipe(line: str) -> None:  # `gpt-fn train | head`: the eval's line cannot be printed
        if line.startswith("step 2:"):
            raise BrokenPipeError

    with pytest.raises(BrokenPipeError):
        train(_settings(corpus, out, max_steps=4, eval_interval=2), log=closed_pipe)
    # A resume keeps the records before the checkpoint's step: every one of them is there.
    assert load_checkpoint(out).step == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


def test_resuming_with_another_model_config_names_the_difference(corpus, tmp_path):
    out = tmp_path / "run"
    train(_settings(corpus, out, max_steps=2, eval_interval=2), log=_quiet)
    with pytest.raises(CheckpointError, match="n_embd=32 there, 48 here"):
        train(_settings(corpus, out, max_steps=4, n_embd=48, resume=True), log=_quiet)


def test_resuming_with_another_optimizer_names_the_state_keys_that_differ(corpus, tmp_path):
    out = tmp_path / "run"
    train(_settings(corpus, out, max_steps=2, eval_interval=2, optimizer="adamw"), log=_quiet)
    with pytest.raises(
        CheckpointError,
        match=r"optimizer state does not match this run \(another --optimizer or --autocast-dtype\?\): "
        r"missing \d+ keys \['adamw/step', .*, \.\.\.\]; \d+ unexpected keys \['exp_avg\.",
    ):
        train(
            _settings(corpus, out, max_steps=4, optimizer="muon", resume=True, allow_changes=True),
            log=_quiet,
        )


def test_resuming_from_a_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    out = tmp_path / "run"
    train(_settings(corpus, out, max_steps=2, eval_interval=2), log=_quiet)
    path = out / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(_settings(corpus, out, max_steps=4, resume=True), log=_quiet)


def test_bf16_autocast_and_grad_accumulation_train(corpus, tmp_path):
    settings = _settings(
        corpus,
        tmp_path / "run",
        max_steps=2,
        eval_interval=2,
        autocast_dtype="bfloat16",
        grad_accum=2,
    )
    summary = train(settings, log=_quiet, sample=cli.sample_text)
    assert torch.isfinite(torch.tensor(summary["loss"]))


def test_bad_settings_are_rejected_when_built(corpus, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _settings(corpus, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="unknown training settings: \\['lr_max'\\]"):
        TrainSettings.from_dict({"lr_max": 1.0})


def test_ddp_with_two_processes_equals_one_process(corpus, tmp_path):
    common = [
        f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}", "--preset=cpu-tiny", "--n-layer=1",
        "--n-embd=32", "--block-size=16", "--batch-size=4", "--max-steps=4", "--warmup-steps=1",
        "--eval-interval=4", "--eval-batches=1", "--sample-tokens=4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "gpt_fn.cli", "train", f"--out-dir={tmp_path / 'one'}", *common],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "gpt_fn", "train", f"--out-dir={tmp_path / 'two'}", *common],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    # The same global batch; DDP averages two half-batch means instead of one full mean, so
    # fp32 rounding differs by ~1e-7 per step.
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5


# --- the CLI -------------------------------------------------------------------------------


def test_cli_train_flags_override_the_config_file(corpus, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"max_steps": 50, "lr": 1e-3, "n_layer": 3}))
    args = cli._parser().parse_args(
        ["train", "--config", str(config), "--max-steps", "7", "--no-compile"]
    )
    settings = cli.settings_from_args(args)
    assert (settings.max_steps, settings.lr, settings.n_layer, settings.compile) == (
        7,
        1e-3,
        3,
        False,
    )


def test_the_autocast_dtype_flag_is_the_autocast_dtype_setting():
    args = cli._parser().parse_args(["train", "--autocast-dtype", "float16"])
    assert cli.settings_from_args(args).autocast_dtype == "float16"


def test_cli_bad_flags_exit_nonzero_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--autocast-dtype", "float8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    assert cli.main(["train", "--batch-size", "0"]) == 1
    assert "batch_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sample", "--top-p", "1.5"])
    assert "top_p" in capsys.readouterr().err


def test_cli_sample_streams_from_a_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(_settings(corpus, out, max_steps=2, eval_interval=2), log=_quiet)
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(out),
                "--max-new-tokens",
                "5",
                "--num-samples",
                "2",
                "--top-k",
                "5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("ROMEO:") >= 2 and "--- sample 2 ---" in printed


def test_cli_sample_without_weights_uses_a_random_tiny_model(capsys):
    assert cli.main(["sample", "--prompt", "Hello", "--max-new-tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_init_from_gpt2_weights_takes_their_shape_and_crops_the_block(corpus, tmp_path):
    from gpt_fn import GPTConfig, hf, init_params
    from gpt_fn.data import get_batch, load_split
    from gpt_fn.model import loss

    weights_config = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)
    weights = init_params(weights_config, seed=3)
    hf.save(weights, weights_config, tmp_path / "gpt2-dir")
    settings = _settings(
        corpus,
        tmp_path / "run",
        init_from=str(tmp_path / "gpt2-dir"),
        n_layer=None,  # the shape comes from the weights
        n_embd=None,
        max_steps=2,
        eval_interval=2,
    )
    train(settings, log=_quiet)

    trained = load_checkpoint(tmp_path / "run")
    assert trained.model_config == GPTConfig(
        vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16
    )
    # Step 0 trains from exactly the GPT-2 weights (wpe cropped to the 16-position block).
    x, y = get_batch(
        load_split(settings.data_dir, "train", block_size=16),
        batch_size=4,
        block_size=16,
        seed=0,
        step=0,
    )
    cropped = {**weights, "wpe.weight": weights["wpe.weight"][:16]}
    expected = loss(cropped, x, y, trained.model_config).item()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == pytest.approx(
        expected, abs=1e-6
    )

    with pytest.raises(ValueError, match="n_embd=16, but the run's model has 32"):
        train(
            _settings(corpus, tmp_path / "bad", init_from=str(tmp_path / "gpt2-dir")),
            log=_quiet,
        )


# --- scale-out: FSDP, Muon, fp16 loss scaling, llm.c shards -------------------------------


def _torchrun(tmp_path, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "gpt_fn", "train", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


# FSDP reduce-scatters two half-batch means where one process takes one mean: fp32 rounding
# ~1e-7 per step, as for DDP, under AdamW. Muon orthogonalises in bf16 (8 mantissa bits, as
# torch.optim.Muon): a 1e-7 difference in a gradient can flip a bf16 rounding in
# Newton-Schulz, which moves that update by ~2^-8 of itself; measured 3.9e-5 after 6 steps.
FSDP_TOLERANCE = {"adamw": 1e-5, "muon": 2e-4}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_equals_one_process_and_resumes_exactly_on_another_number_of_ranks(
    corpus, tmp_path, optimizer
):
    common = [f"--optimizer={optimizer}",
        f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}", "--preset=cpu-tiny", "--n-layer=1",
        "--n-embd=32", "--block-size=16", "--batch-size=4", "--eval-interval=2",
        "--eval-batches=1", "--sample-tokens=4", "--lr-decay-steps=6", "--lr=3e-3",
    ]  # fmt: skip
    sharded = tmp_path / "fsdp"
    assert cli.main(["train", f"--out-dir={tmp_path / 'one'}", "--max-steps=6", *common]) == 0
    _torchrun(tmp_path, f"--out-dir={sharded}", "--parallel=fsdp", "--max-steps=2", *common)
    assert (sharded / "checkpoint.dcp").is_dir() and not (
        sharded / "checkpoint.safetensors"
    ).exists()
    _torchrun(tmp_path, f"--out-dir={sharded}", "--resume", "--max-steps=4")  # FSDP resume
    # ... and the last two steps in one process, from the sharded checkpoint (resharded).
    assert cli.main(["train", f"--out-dir={sharded}", "--resume", "--max-steps=6"]) == 0
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    resumed = read_metrics(sharded / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(6))
    for a, b in zip(one, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= FSDP_TOLERANCE[optimizer]
        assert a["lr"] == b["lr"]
    # The sharded checkpoint reads whole: it converts to the single file and to HF.
    whole = load_checkpoint(sharded)
    assert whole.step == 6 and whole.params["wte.weight"].shape == (50304, 32)
    assert cli.main(["export", "--checkpoint", str(sharded), "--out", str(tmp_path / "hf")]) == 0


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])  # muon is the default elsewhere
def test_each_optimizer_resumes_exactly(corpus, tmp_path, optimizer):
    full = _settings(corpus, tmp_path / "full", optimizer=optimizer, max_steps=8, eval_interval=4)
    train(full, log=_quiet)
    half = _settings(corpus, tmp_path / "half", optimizer=optimizer, max_steps=4, lr_decay_steps=8)
    train(half, log=_quiet)
    saved = load_checkpoint(tmp_path / "half")
    prefix = "muon/momentum_buffer.h.0." if optimizer == "muon" else "exp_avg.h.0."
    assert any(k.startswith(prefix) for k in saved.optimizer_state)
    train(_settings(corpus, tmp_path / "half", optimizer=optimizer, max_steps=8, lr_decay_steps=8,
                    resume=True), log=_quiet)  # fmt: skip
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "half" / "metrics.jsonl")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]
    assert (a[0].get("muon_lr", 0) > a[0]["lr"]) == (optimizer == "muon")


def test_fp16_skips_an_overflowing_step_and_backs_off_its_loss_scale(corpus, tmp_path, monkeypatch):
    real_loss = gpt_fn.model.loss
    calls = []

    def overflow_once(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        return value * float("inf") if len(calls) == 3 else value  # the third step's loss

    monkeypatch.setattr(gpt_fn.model, "loss", overflow_once)
    summary = train(
        _settings(corpus, tmp_path / "run", autocast_dtype="float16", max_steps=5, eval_interval=5),
        log=_quiet,
    )
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [False, False, True, False, False]
    assert records[2]["loss_scale"] == records[1]["loss_scale"] / 2 == 2.0**15
    assert torch.isfinite(torch.tensor(summary["loss"]))
    assert "loss_scale.scale" in load_checkpoint(tmp_path / "run").optimizer_state


def test_a_folder_of_llmc_shards_trains_as_it_is(corpus, tmp_path):
    import numpy as np

    from gpt_fn import data

    tokens = np.random.default_rng(0).integers(0, 50257, 5000, dtype=np.uint16)
    folder = tmp_path / "fineweb"
    folder.mkdir()
    for name, part in (("x_val_000000.bin", tokens[:1000]), ("x_train_000001.bin", tokens[1000:3000]),
                       ("x_train_000002.bin", tokens[3000:])):  # fmt: skip
        (folder / name).write_bytes(data.shard_header(len(part)) + part.tobytes())
    settings = _settings(corpus, tmp_path / "run", data=str(folder), max_steps=2, eval_interval=2)
    summary = train(settings, log=_quiet)
    assert torch.isfinite(torch.tensor(summary["val_loss"]))
    assert not (folder / "meta.json").exists()  # read in place, nothing prepared


def test_evals_log_val_bits_per_byte_next_to_val_loss(corpus, tmp_path):
    import math

    from gpt_fn import data
    from gpt_fn.eval import count_bytes

    settings = _settings(corpus, tmp_path / "run", max_steps=2, eval_interval=2)
    train(settings, log=_quiet)
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    val = data.load_split(settings.data_dir, "val", block_size=16)
    targets = [
        data.eval_batch(val, batch_size=4, block_size=16, seed=0, index=i)[1] for i in range(2)
    ]
    tokens = sum(t.numel() for t in targets)
    expected = record["val_loss"] * tokens / (math.log(2) * sum(count_bytes(t) for t in targets))
    assert record["val_bpb"] == pytest.approx(expected, rel=1e-9)


def test_compiling_is_announced(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # no real compile
    train(_settings(corpus, tmp_path / "run", max_steps=2, eval_interval=2, compile=True))
    assert "compiling the model (torch.compile)" in capsys.readouterr().out


def test_log_lines_are_not_glued_to_the_progress_bar_in_a_redirected_log(corpus, tmp_path):
    log = tmp_path / "train.log"
    args = [
        sys.executable, "-m", "gpt_fn", "train", f"--data={corpus}",
        f"--data-dir={tmp_path / 'tokens'}", f"--out-dir={tmp_path / 'run'}", "--preset=cpu-tiny",
        "--n-layer=1", "--n-embd=32", "--block-size=16", "--batch-size=4", "--max-steps=4",
        "--eval-interval=2", "--eval-batches=1", "--sample-tokens=4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    with log.open("w") as handle:  # `gpt-fn train > train.log 2>&1`
        subprocess.run(
            args, stdout=handle, stderr=subprocess.STDOUT, env=env, check=True, timeout=300
        )
    text = log.read_text()
    for step in (2, 4):
        at = text.index(f"step {step}: train loss")
        assert text[at - 1] in "\n\r", text[max(0, at - 80) : at + 40]


def test_activation_checkpointing_trains_as_the_plain_run(corpus, tmp_path):
    # Recomputed blocks give the plain losses (dropout replayed from the same generator state):
    # equal within 1e-6 per step, the bound gpt_fn.module's test holds per gradient.
    plain = _settings(corpus, tmp_path / "plain", max_steps=4, dropout=0.1)
    train(plain, log=_quiet)
    recomputed = _settings(
        corpus, tmp_path / "recomputed", max_steps=4, dropout=0.1, activation_checkpointing=True
    )
    train(recomputed, log=_quiet)
    a = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    b = read_metrics(tmp_path / "recomputed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6


def test_a_series_keeps_its_steps_states_its_disk_use_and_resumes_from_any_of_them(
    corpus, tmp_path, one_thread
):
    lines = []
    keep = {"keep_checkpoints": "log+every:3", "max_steps": 8}
    train(_settings(corpus, tmp_path / "run", **keep), log=lines.append)
    run = tmp_path / "run"
    # Log-spaced and every 3rd, whether or not an eval step (6, 8), and the last step.
    assert series_steps(run) == [1, 2, 3, 4, 6, 8]
    stated = next(line for line in lines if line.startswith("keeping 6 checkpoints"))
    each = float(stated.split(": 6 x ")[1].split(" MB")[0]) * 1e6
    sizes = [p.stat().st_size for p in (run / "checkpoints").iterdir()]
    # The statement counts the tensors' bytes (to 0.1 MB); each file adds its JSON header.
    assert all(abs(size - each) < 60_000 for size in sizes), (stated, sizes)
    series = load_series(run)
    assert torch.equal(series.params["wte.weight"][-1], load_checkpoint(run).params["wte.weight"])
    first = read_metrics(run / "metrics.jsonl")

    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5; it keeps steps \[1, 2, 3"):
        train(_settings(corpus, run, **keep, resume=True, from_step=5), log=_quiet)
    train(_settings(corpus, run, **keep, resume=True, from_step=3), log=lines.append)
    assert any("goes back to its kept checkpoint of step 3" in line for line in lines)
    assert any("dropped the kept checkpoints of steps [4, 6, 8]" in line for line in lines)
    again = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(8)) and series_steps(run) == series.steps
    # The replayed steps see the same batches, lr and state: the losses of the first run to
    # 1e-6 (the exact-resume bound) and params within MKL's alignment noise (see above).
    for a, b in zip(first, again, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    replayed = load_series(run)
    for name, stacked in series.params.items():
        torch.testing.assert_close(replayed.params[name], stacked, atol=1e-5, rtol=0)


def test_series_settings_are_checked_when_built(corpus, tmp_path):
    with pytest.raises(SettingsError, match="from_step only applies with resume"):
        _settings(corpus, tmp_path, from_step=2)
    with pytest.raises(SettingsError, match="'every:0' is not one of every:N"):
        _settings(corpus, tmp_path, keep_checkpoints="every:0")


def test_a_resume_does_not_need_the_eval_file_the_run_started_with(corpus, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(corpus.read_text()[:2000])
    out = tmp_path / "run"
    train(
        _settings(corpus, out, max_steps=6, lr_decay_steps=12, eval_text=str(held_out)), log=_quiet
    )
    held_out.unlink()  # gone, and the resume does not ask for it
    train(_settings(corpus, out, max_steps=8, lr_decay_steps=12, resume=True), log=_quiet)
    assert load_checkpoint(out).step == 8


def test_a_fresh_run_asking_for_a_missing_eval_file_fails_before_any_step(corpus, tmp_path):
    out = tmp_path / "run"
    missing = str(tmp_path / "missing.txt")
    settings = _settings(corpus, out, max_steps=6, eval_text=missing)  # a value: accepted
    with pytest.raises(SettingsError, match=r"^eval_text: no such file .*missing\.txt'$"):
        train(settings, log=_quiet)
    assert not (out / "metrics.jsonl").exists()


def test_a_resume_does_not_need_the_run_log_package_the_run_started_with(
    corpus, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(_settings(corpus, out, max_steps=6, lr_decay_steps=12, log="tensorboard"), log=_quiet)
    monkeypatch.setattr(runlog.importlib.util, "find_spec", lambda name: None)  # uninstalled
    train(_settings(corpus, out, max_steps=8, lr_decay_steps=12, resume=True), log=_quiet)
    assert load_checkpoint(out).step == 8
    with pytest.raises(SettingsError, match=r"--log tensorboard needs the tensorboard package"):
        train(
            _settings(corpus, out, max_steps=9, lr_decay_steps=12, resume=True, log="tensorboard")
        )
