"""The `gpt-fn` command as a user meets it: every mistake is one line and a non-zero exit.

Most cases call `cli.main` in this process (what the `gpt-fn` console script calls): an
exception escaping it would be the traceback a user sees, and fails the test. The cases that
need a real process (a closed pipe, Ctrl-C) run the entry point in a subprocess.
"""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt_fn import GPTConfig, cli, data, flops, forward, hf, init_params
from gpt_fn.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_series,
    save_checkpoint,
    series_steps,
)
from gpt_fn.rundir import read_metrics
from gpt_fn.sampling import ban_tokens, beam_search, cut_at_stop
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

TINY_RUN = [
    "--preset=cpu-tiny", "--n-layer=1", "--n-embd=32", "--block-size=16", "--batch-size=4",
    "--eval-batches=1", "--sample-tokens=4", "--lr=3e-3",
]  # fmt: skip
ENTRY_POINT = [sys.executable, "-m", "gpt_fn"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gpt-fn argv...`, in this process."""
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, pattern: str, *, expected: int = 1) -> None:
    """A failure as the CLI must report it: the exit code, one line naming it, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def train_args(corpus, tmp_path):
    def args(out: str = "run", *more: str) -> list[str]:
        return [
            "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
            f"--out-dir={tmp_path / out}", *TINY_RUN, *more,
        ]  # fmt: skip

    return args


@pytest.fixture
def checkpoint_dir(tmp_path) -> Path:
    config = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)
    params = init_params(config, seed=0)
    save_checkpoint(tmp_path / "ckpt", Checkpoint(params, {}, 5, config, {}))
    return tmp_path / "ckpt"


# --- files, folders, devices, downloads ---------------------------------------------------


def test_tinyshakespeare_offline_is_one_line(capsys, train_args, monkeypatch):
    monkeypatch.setattr(data.corpora, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    args = train_args()
    args[1] = "--data=tinyshakespeare"
    assert_one_line(*run(capsys, *args)[::2], "could not download tinyshakespeare")


def test_init_from_a_hub_name_offline_is_one_line(capsys, train_args, monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *train_args(), "--init-from=gpt2")
    assert_one_line(code, err, "'gpt2' is not a local directory.*cannot reach 127.0.0.1")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_sample_from_a_hf_dir_that_is_missing_or_a_file(capsys, tmp_path, kind):
    path = tmp_path / "gpt2"
    if kind == "file":
        path.write_text("{}")
    code, _, err = run(capsys, "sample", "--hf", path)
    assert_one_line(code, err, "no such directory" if kind == "missing" else "is a file")


def test_out_dir_or_data_dir_naming_a_file(capsys, tmp_path, train_args):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, *train_args("afile"))
    assert_one_line(code, err, "is a file, not a folder")
    args = train_args()
    args[2] = f"--data-dir={tmp_path / 'afile'}"
    code, _, err = run(capsys, *args)
    assert_one_line(code, err, "data dir .* is a file, not a folder")


def test_prepare_refuses_an_empty_data_path_and_force_rebuilds(capsys, corpus, tmp_path):
    code, _, err = run(capsys, "prepare", "--data", "", "--data-dir", tmp_path / "tokens")
    assert_one_line(code, err, "gpt-fn prepare: error: data must not be empty")
    args = ["prepare", "--data", corpus, "--data-dir", tmp_path / "tokens"]
    assert "prepared" in run(capsys, *args)[1]
    assert "up to date" in run(capsys, *args)[1]
    assert ": prepared" in run(capsys, *args, "--force")[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_cuda_device_without_cuda(capsys, train_args, device):
    code, _, err = run(capsys, *train_args(), f"--device={device}")
    assert_one_line(code, err, f"device '{device}': CUDA is not available")
    code, _, err = run(capsys, "sample", "--device", device, "--max-new-tokens", "2")
    assert_one_line(code, err, f"device '{device}': CUDA is not available")


def test_an_unknown_device_is_named(capsys):
    code, _, err = run(capsys, "sample", "--device", "gpu", "--max-new-tokens", "2")
    assert_one_line(code, err, "unknown device 'gpu'")


def test_a_checkpoint_with_a_missing_key(capsys, tmp_path):
    config = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)
    params = init_params(config, seed=0)
    del params["h.0.ln_2.bias"]
    save_checkpoint(tmp_path, Checkpoint(params, {}, 5, config, {}))
    code, _, err = run(capsys, "sample", "--checkpoint", tmp_path)
    assert_one_line(code, err, "does not hold the params of its model config.*h.0.ln_2.bias")


# --- settings that are accepted and mean something else ----------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([1, 2], "must hold a JSON object of settings, got a list"),
        ({"compile": "no"}, "compile must be true or false or null, got 'no'"),
        ({"max_steps": "2"}, "max_steps must be an int, got '2'"),
        ({"max_steps": 2.5}, "max_steps must be an int, got 2.5"),
    ],
)
def test_config_files_are_type_checked(capsys, tmp_path, train_args, config, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    code, _, err = run(capsys, *train_args(), "--config", path)
    assert_one_line(code, err, re.escape(message))


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--grad-clip=nan", "grad_clip must be a finite number >= 0, got nan"),
        ("--lr-decay-steps=0", "lr_decay_steps must be >= 1"),
    ],
)
def test_flags_that_would_silently_mean_something_else(capsys, train_args, flag, message):
    assert_one_line(*run(capsys, *train_args(), flag)[::2], re.escape(message))


def test_help_gives_every_flag_a_text_and_at_most_one_default(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    # argparse: "  --flag VALUE   help text" (the text may start on the next line).
    entries = re.split(r"\n  (?=--)", out.split("options:", 1)[1])[1:]
    assert len(entries) > 30
    for entry in entries:
        flag, _, text = entry.partition("  ")
        assert text.strip(), f"{flag} has no help text"
        assert entry.count("(default:") <= 1, entry


# --- runs that must not be lost ------------------------------------------------------------


def test_a_fresh_run_never_erases_a_run_and_overwrite_is_explicit(capsys, train_args, tmp_path):
    assert run(capsys, *train_args(), "--max-steps=2", "--eval-interval=2")[0] == 0
    code, _, err = run(capsys, *train_args(), "--max-steps=2")
    assert_one_line(code, err, "already holds a run.*--resume.*--overwrite")
    assert load_checkpoint(tmp_path / "run").step == 2
    code, _, err = run(capsys, *train_args(), "--max-steps=1", "--overwrite")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run").step == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0]


def test_resume_restores_the_runs_settings_without_repeating_flags(capsys, train_args, tmp_path):
    assert run(capsys, *train_args("full"), "--max-steps=6", "--eval-interval=3")[0] == 0
    assert run(capsys, *train_args("half"), "--max-steps=3", "--lr-decay-steps=6")[0] == 0
    # Only the length is given again; data, shape, lr, batch come from the checkpoint.
    code, printed, err = run(
        capsys, "train", "--resume", f"--out-dir={tmp_path / 'half'}", "--max-steps=6"
    )
    assert code == 0, err
    # The cosine ends at step 6, with the run: no step trains at min_lr.
    assert "cosine to min_lr=0.0002 at step 6)\n" in printed
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "half" / "metrics.jsonl")
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)


def test_resume_refuses_a_changed_setting_and_allows_it_when_told(capsys, train_args, tmp_path):
    assert run(capsys, *train_args(), "--max-steps=2", "--eval-interval=2")[0] == 0
    out = f"--out-dir={tmp_path / 'run'}"
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps=4", "--lr=1e-3")
    assert_one_line(code, err, "would change the run's settings \\(lr 0.003 -> 0.001\\)")
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps=1")
    assert_one_line(code, err, "max_steps 1 is below the checkpoint's step 2")
    code, printed, _ = run(
        capsys, "train", "--resume", out, "--max-steps=4", "--lr=1e-3", "--allow-changes"
    )
    assert code == 0 and "changed lr 0.003 -> 0.001 (--allow-changes)" in printed
    assert load_checkpoint(tmp_path / "run").train_settings["lr"] == 1e-3


def test_extending_a_run_keeps_its_schedule(capsys, train_args, tmp_path):
    assert run(capsys, *train_args(), "--max-steps=4", "--eval-interval=4")[0] == 0
    code, printed, _ = run(
        capsys, "train", "--resume", f"--out-dir={tmp_path / 'run'}", "--max-steps=6"
    )
    assert code == 0 and "extending the run from 4 to 6 steps" in printed
    assert "at step 4), so steps 4 to 5 train at min_lr" in printed
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    min_lr = load_checkpoint(tmp_path / "run").train_settings["min_lr"]
    assert lrs[4:] == [min_lr, min_lr]  # after the run's cosine, no jump back up
    assert max(lrs[4:]) <= min(lrs[:4])


def test_resume_refuses_a_changed_corpus_and_a_cut_log(capsys, tmp_path, corpus):
    text = tmp_path / "plays.txt"
    text.write_text(corpus.read_text())
    args = ["train", f"--data={text}", f"--data-dir={tmp_path / 'tokens'}", *TINY_RUN]
    out = f"--out-dir={tmp_path / 'run'}"
    assert run(capsys, *args, out, "--max-steps=2", "--eval-interval=2")[0] == 0
    text.write_text(corpus.read_text() + "A new line.\n")
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps=4")
    assert_one_line(code, err, r"plays.txt changed since the run started \(source sha256 \w{16}")
    text.write_text(corpus.read_text())
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # a log emptied by a killed rewrite
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps=4")
    assert_one_line(code, err, "metrics.jsonl holds no step, but the checkpoint is at step 2")
    code, printed, err = run(capsys, "train", "--resume", out, "--max-steps=4", "--allow-changes")
    assert code == 0 and "steps 0 to 1 are missing" in printed, err
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2, 3]


def test_a_zero_lr_and_a_seed_out_of_range(capsys, train_args, tmp_path):
    code, _, err = run(capsys, *train_args(), "--max-steps=1", "--lr=0", "--min-lr=0")
    assert code == 0, err
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["muon_lr"] == 0.0
    code, _, err = run(capsys, *train_args("other"), "--seed=99999999999999999999999")
    assert_one_line(code, err, r"seed must be an int in \[0, 2\*\*64\), got 9999")


@pytest.mark.parametrize(
    ("flag", "rows", "tokens"),
    [
        ("--batch-size=100000000", "100,000,000", "16"),
        ("--block-size=1000000000", "4", "1,000,000,000"),
    ],
)
def test_a_run_too_large_for_memory_is_refused_before_allocating(
    capsys, train_args, flag, rows, tokens
):
    code, _, err = run(capsys, *train_args(), flag, "--max-steps=1")
    pattern = (
        rf"training 1 layers x 32 on {rows} rows of {tokens} tokens needs at least [\d.,]+ [GM]B"
    )
    assert_one_line(code, err, pattern + ".*available on cpu: lower --batch-size")


def test_resume_without_a_checkpoint_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--resume", f"--out-dir={tmp_path / 'none'}")
    assert_one_line(code, err, "--resume: no checkpoint at")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--from-step=2"], "from_step only applies with resume"),
        (["--keep-checkpoints=every:x"], "'every:x' is not one of every:N"),
        (["--resume", "--from-step=5"], r"--resume: .*checkpoints keeps no checkpoint of step 5"),
    ],
)
def test_series_flags_misused_are_one_line(capsys, tmp_path, flags, message):
    code, _, err = run(capsys, "train", f"--out-dir={tmp_path / 'none'}", *flags)
    assert_one_line(code, err, message)


def test_a_ruinous_step_never_becomes_the_last_good_checkpoint(capsys, train_args, tmp_path):
    assert run(capsys, *train_args(), "--max-steps=2", "--eval-interval=2")[0] == 0
    code, _, err = run(
        capsys, "train", "--resume", f"--out-dir={tmp_path / 'run'}", "--max-steps=6",
        "--eval-interval=1", "--lr=1e30", "--min-lr=1e30", "--allow-changes",
    )  # fmt: skip
    lines = [line for line in err.splitlines() if "diverged" in line]
    assert code == 1 and len(lines) == 1, err
    assert re.search(r"diverged at step 2: .*last good checkpoint .*step 2\) is kept", lines[0])
    saved = load_checkpoint(tmp_path / "run")
    assert saved.step == 2
    assert all(bool(torch.isfinite(p).all()) and p.abs().max() < 100 for p in saved.params.values())


def test_a_run_that_diverges_before_any_checkpoint_says_so(capsys, train_args):
    code, _, err = run(capsys, *train_args(), "--max-steps=3", "--lr=1e30", "--min-lr=1e30")
    line = next(line for line in err.splitlines() if "diverged" in line)
    assert code == 1 and "no checkpoint had been written yet" in line


def test_short_runs_train_with_a_warmup_that_fits(capsys, train_args, tmp_path):
    assert run(capsys, *train_args(), "--max-steps=5")[0] == 0
    assert load_checkpoint(tmp_path / "run").train_settings["warmup_steps"] == 0


def test_mfu_is_never_above_one(capsys, train_args, tmp_path, monkeypatch):
    # A peak measured while the machine was busy: far below what a step achieves.
    monkeypatch.setattr(flops, "peak_flops", lambda device, dtype: 1.0)
    monkeypatch.setattr(flops, "measured_matmul_flops", lambda device, dtype: 2.0)
    assert run(capsys, *train_args(), "--max-steps=3")[0] == 0
    assert all(0 < r["mfu"] <= 1 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


# --- sampling and export -------------------------------------------------------------------


def _samples(capsys, *argv: str) -> list[str]:
    code, out, err = run(capsys, "sample", "--max-new-tokens=12", *argv)
    assert code == 0, err
    return re.split(r"--- sample \d+ ---\n", out)[1:] or [out]


def test_train_samples_ban_the_ids_past_gpt2s_tokenizer_exactly_as_an_explicit_ban():
    """`sample_text` bans padding ids through the decoders' one policy (`ban_padding_ids`):
    the same tokens, to the bit, as `ban_tokens` of them chained before temperature and top-k."""
    config = GPTConfig(vocab_size=50304, block_size=32, n_layer=1, n_head=2, n_embd=32)
    params = init_params(config, seed=0)
    # Long padding rows of the tied embedding give the padding ids the largest logits.
    wte = params["wte.weight"].clone()
    wte[50257:] *= 100
    params = {**params, "wte.weight": wte}
    prompt = torch.tensor([gpt2().encode_ordinary("ROMEO:")])
    tokens = 12

    def generated(**transform):
        out = cli.sampling.generate(
            params, prompt, config, max_new_tokens=tokens, seed=3, eos_token_id=EOT_TOKEN,
            transform=cli.sampling.make_transform(temperature=0.8, top_k=200, **transform),
        )  # fmt: skip
        return [t for t in out[0, prompt.shape[1] :].tolist() if t != EOT_TOKEN]

    assert any(t >= 50257 for t in generated())  # without a ban the padding ids win
    explicit = generated(ban_tokens=range(50257, 50304))
    assert cli.sample_text(params, config, tokens=tokens, seed=3) == gpt2().decode(
        gpt2().encode_ordinary("ROMEO:") + explicit
    )


def test_num_samples_are_independent_of_other_seeds(capsys, checkpoint_dir):
    ckpt = f"--checkpoint={checkpoint_dir}"
    two = _samples(capsys, ckpt, "--num-samples=2", "--seed=0")
    (alone,) = _samples(capsys, ckpt, "--seed=0")
    (seed_one,) = _samples(capsys, ckpt, "--seed=1")
    assert two[0] == alone  # row 0 of a batch is what the seed gives alone
    assert two[1] != seed_one  # row 1 is not another seed's row 0


def test_a_prompt_longer_than_the_block(capsys, checkpoint_dir):
    code, _, err = run(capsys, "sample", f"--checkpoint={checkpoint_dir}", "--prompt", "a " * 40)
    assert_one_line(code, err, "longer than the model's block_size 32")


def test_export_writes_a_hf_model_with_the_same_logits(capsys, checkpoint_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    code, out, err = run(
        capsys, "export", "--checkpoint", checkpoint_dir, "--out", tmp_path / "hf",
        "--vocab-size", "50000",
    )  # fmt: skip
    assert code == 0, err
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    saved = load_checkpoint(checkpoint_dir)
    tokens = torch.randint(0, 50000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(tokens).logits
    params, config = hf.load(tmp_path / "hf")
    assert config.vocab_size == 50000 and params["wte.weight"].shape[0] == 50000
    assert not (tmp_path / "hf" / "vocab.json").exists()  # 50000 ids: not GPT-2's tokenizer
    # Cropping drops rows of the tied head: the logits of the kept ids are unchanged.
    ours = forward(saved.params, tokens, saved.model_config)[..., :50000]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # fp32, different kernels
    capsys.readouterr()  # transformers' loading bar
    code, _, err = run(
        capsys, "export", "--checkpoint", checkpoint_dir, "--out", tmp_path / "x",
        "--vocab-size", "60000",
    )  # fmt: skip
    assert_one_line(code, err, "--vocab-size must be in \\[1, 50257\\]")
    # The whole vocabulary: the directory carries GPT-2's tokenizer too.
    assert run(capsys, "export", "--checkpoint", checkpoint_dir, "--out", tmp_path / "full")[0] == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "full")
    assert tokenizer("ROMEO:")["input_ids"] == [33676, 4720, 25]


# --- what only a real process shows ----------------------------------------------------------


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}


def test_export_onto_a_full_disk_is_one_line_and_writes_nothing(checkpoint_dir, tmp_path):
    resource = pytest.importorskip("resource")

    def small_files():  # in the child: files of at most 64 KiB (config.json fits, weights not)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a kill

    done = subprocess.run(
        [*ENTRY_POINT, "export", "--checkpoint", checkpoint_dir, "--out", tmp_path / "hf"],
        capture_output=True, text=True, env=_environment(), preexec_fn=small_files, timeout=120,
    )  # fmt: skip
    assert_one_line(
        done.returncode, done.stderr, r"gpt-fn export: error: cannot write .*hf: File too large; "
        "nothing was written",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no folder, no temporary


@pytest.mark.parametrize("request_", [["--num-beams", "60000"], ["--num-samples", "100000"]])
def test_a_request_beyond_the_memory_limit_is_refused_before_allocating(checkpoint_dir, request_):
    resource = pytest.importorskip("resource")

    def limited():  # in the child: `ulimit -v` of 8 GiB
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    done = subprocess.run(
        [*ENTRY_POINT, "sample", "--checkpoint", checkpoint_dir, "--max-new-tokens", "4",
         "--prompt", "Hi", *request_],
        capture_output=True, text=True, env=_environment(), preexec_fn=limited, timeout=120,
    )  # fmt: skip
    assert_one_line(
        done.returncode, done.stderr,
        r"gpt-fn sample: error: (beam_search \(60000 beams\)|generate \(100000 rows\)) needs "
        r"at least [\d.]+ GB of memory, more than the [\d.]+ GB available on cpu: ask for fewer",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                      "can't allocate memory: you tried to allocate 24000000000 bytes. Error "
                      "code 12 (Cannot allocate memory)"), r"tried to allocate 24\.0 GB"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                "total capacity of 79.19 GiB"), "Tried to allocate 20.00 GiB"),
    ],
)  # fmt: skip
def test_an_allocation_that_fails_anyway_is_one_line(capsys, checkpoint_dir, monkeypatch, error,
                                                     reason):  # fmt: skip
    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli.sampling, "beam_search", allocate)
    code, _, err = run(capsys, "sample", "--checkpoint", checkpoint_dir, "--num-beams", "2")
    assert_one_line(code, err, rf"gpt-fn sample: error: out of memory \({reason}\): ask for fewer")


def test_a_closed_pipe_is_one_line(checkpoint_dir):
    process = subprocess.Popen(
        # Streamed token by token for seconds: the reader leaves long before the end.
        [*ENTRY_POINT, "sample", f"--checkpoint={checkpoint_dir}", "--max-new-tokens=5000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment(),
    )  # fmt: skip
    process.stdout.read(3)  # `gpt-fn sample ... | head -c 3`
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    process.stderr.close()
    assert_one_line(process.returncode, err, "broken pipe")


def test_ctrl_c_saves_the_step_and_the_run_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    args = [
        *ENTRY_POINT, "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
        f"--out-dir={out}", *TINY_RUN, "--max-steps=100000", "--eval-interval=100000",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment()
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out / "metrics.jsonl")) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    stop = re.search(r"interrupted before step (\d+): saved .*checkpoint.safetensors", err)
    assert stop, err
    assert load_checkpoint(out).step == int(stop[1])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(int(stop[1])))


def test_a_killed_series_run_resumes_and_rewrites_the_same_series(
    corpus, tmp_path, capsys, one_thread
):
    out = tmp_path / "run"
    given = [
        "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}", f"--out-dir={out}",
        *TINY_RUN, "--eval-interval=6", "--keep-checkpoints=log+every:5",
    ]  # fmt: skip
    process = subprocess.Popen(
        [*ENTRY_POINT, *given, "--max-steps=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    # Killed from step 9 on: after the kept step 8 and (mostly) before the checkpoint of 12,
    # so the resumed run usually replays a kept step.
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out / "metrics.jsonl")) < 9:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.kill()  # SIGKILL: no handler runs, a write may be cut anywhere
    stdout, _ = process.communicate(timeout=120)
    # 17 powers of two and 20000 multiples of 5 up to step 100000, stated before step 0.
    assert re.search(
        r"keeping 20017 checkpoints \(steps 1, 2, 4, 5, 8, ..., 100000\) .*: "
        r"20017 x [\d.]+ MB = [\d.]+ MB",
        stdout,
    ), stdout
    before = read_metrics(out / "metrics.jsonl")
    killed = load_series(out)
    resumed_at = load_checkpoint(out).step

    # The same steps again: the resumed run replays those after its checkpoint.
    code, stdout, err = run(capsys, *given, "--resume", f"--max-steps={len(before)}")
    assert code == 0, err
    after = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(len(before)))
    # Same batches, lr and state: equal to the last bit; 1e-6 is the exact-resume bound.
    for a, b in zip(before, after, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    assert set(killed.steps) <= set(series_steps(out))
    again = load_series(out, steps=killed.steps)
    for name, stacked in killed.params.items():
        # Params within MKL's alignment noise over replayed steps (see test_train's resume test).
        torch.testing.assert_close(again.params[name], stacked, atol=1e-5, rtol=0)
    replayed = [step for step in killed.steps if step > resumed_at]
    if replayed:
        assert f"dropped the kept checkpoints of steps {replayed}" in stdout


def _wait_until_torch_loads(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once `process` has mapped torch's shared library: it is importing torch, which
    takes seconds, from inside `gpt_fn.__main__.main` (a loaded machine can take longer than
    any fixed sleep just to start Python)."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + timeout
    while "libtorch" not in maps.read_text():
        assert process.poll() is None and time.monotonic() < deadline, "torch never loaded"
        time.sleep(0.01)


def test_ctrl_c_while_the_command_imports_is_one_line(corpus, tmp_path):
    process = subprocess.Popen(
        [*ENTRY_POINT, "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
         f"--out-dir={tmp_path / 'run'}", *TINY_RUN],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
    )  # fmt: skip
    _wait_until_torch_loads(process)  # inside `main`: before that, Python itself gets the ^C
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert_one_line(process.returncode, err, "^gpt-fn: interrupted$", expected=130)


def test_ctrl_c_during_the_final_sample_ends_it_and_says_the_run_is_saved(corpus, tmp_path):
    out = tmp_path / "run"
    args = [
        *ENTRY_POINT, "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
        f"--out-dir={out}", *TINY_RUN, "--max-steps=1", "--sample-tokens=1000000",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**_environment(), "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    for line in process.stdout:  # the last line before the sample
        if line.startswith("wrote "):
            break
    process.send_signal(signal.SIGINT)
    printed, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "stopping after this step" not in printed
    assert re.search(r"interrupted after the last step: the run is complete and saved", err)
    assert load_checkpoint(out).step == 1


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(corpus, tmp_path):
    def small_files() -> None:  # `ulimit -f 1024`: no file past 1 MiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))

    done = subprocess.run(
        [*ENTRY_POINT, "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
         f"--out-dir={tmp_path / 'run'}", *TINY_RUN, "--max-steps=2"],
        capture_output=True, text=True, preexec_fn=small_files, env=_environment(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]  # under the progress bar
    assert re.search(r"error: cannot write checkpoint .*File too large.*disk full", last), last


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from gpt_fn import cli
rename = os.replace
def rename_then_die(source, target):
    rename(source, target)
    if str(target).endswith("checkpoint.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the checkpoint's rename
os.replace = rename_then_die
cli.main(sys.argv[1:])
"""


def test_kill_9_right_after_a_checkpoint_loses_no_record(corpus, tmp_path):
    args = [
        "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
        f"--out-dir={tmp_path / 'run'}", *TINY_RUN, "--max-steps=4", "--eval-interval=2",
    ]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, *args],
        capture_output=True, text=True, env=_environment(), timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # A resume keeps the records before the checkpoint's step: every one of them is there.
    assert load_checkpoint(tmp_path / "run").step == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


# --- gpt-fn eval ----------------------------------------------------------------------------

EVAL_TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 4


@pytest.fixture
def eval_files(tmp_path):
    text = tmp_path / "plays.txt"
    text.write_text(EVAL_TEXT)
    choices = tmp_path / "items.jsonl"
    choices.write_text(
        '{"ctx": "ROMEO:", "endings": ["But, soft!", "Hello there"], "label": 0}\n'
        '{"ctx": "It is the", "endings": ["east", "west", "sun"], "label": 2}\n'
    )
    return text, choices


def test_eval_prints_a_table_and_writes_json(capsys, checkpoint_dir, eval_files, tmp_path):
    text, choices = eval_files
    out = tmp_path / "results.json"
    code, stdout, err = run(
        capsys, "eval", "--checkpoint", checkpoint_dir, "--text", text, "--choices", choices,
        "--stride", "8", "--batch-size", "3", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out.read_text())
    from gpt_fn import eval as evaluation

    saved = load_checkpoint(checkpoint_dir)
    expected = evaluation.perplexity(saved.params, EVAL_TEXT, saved.model_config, stride=8)
    assert results["text"]["nats_per_token"] == pytest.approx(expected.nats_per_token)
    assert results["text"]["bits_per_byte"] == pytest.approx(expected.bits_per_byte)
    assert results["text"]["tokens"] == expected.tokens and results["text"]["stride"] == 8
    assert results["choices"]["items"] == 2 and 0 <= results["choices"]["acc_norm"] <= 1
    assert results["model"]["step"] == 5
    for label in ("perplexity", "bits/byte", "acc_norm", f"wrote {out}"):
        assert label in stdout
    assert "window" in err  # the progress bar


def test_eval_scores_a_token_file_like_its_text(capsys, checkpoint_dir, tmp_path):
    import numpy as np

    from gpt_fn.tokenizer import gpt2

    (tmp_path / "val.bin").write_bytes(
        np.array(gpt2().encode_ordinary(EVAL_TEXT), dtype=np.uint16).tobytes()
    )
    (tmp_path / "val.txt").write_text(EVAL_TEXT)
    ids = np.array(gpt2().encode_ordinary(EVAL_TEXT), dtype=np.uint16)
    shards = tmp_path / "shards"  # llm.c's layout: a header, then the tokens
    shards.mkdir()
    (shards / "x_val_000000.bin").write_bytes(data.shard_header(len(ids)) + ids.tobytes())
    (shards / "x_train_000000.bin").write_bytes(data.shard_header(len(ids)) + ids.tobytes())
    for name, source in (("shard", shards / "x_val_000000.bin"), ("folder", shards)):
        out = tmp_path / f"{name}.json"
        code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--tokens", source,
                           "--out", out)  # fmt: skip
        assert code == 0, err
    for name in ("val.bin", "val.txt"):
        flag = "--tokens" if name.endswith(".bin") else "--text"
        out = tmp_path / f"{name}.json"
        code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, flag, tmp_path / name,
                           "--out", out)  # fmt: skip
        assert code == 0, err
    by_tokens, by_text = (json.loads((tmp_path / f"{n}.json").read_text())["text"]
                          for n in ("val.bin", "val.txt"))  # fmt: skip
    assert by_tokens["nats"] == pytest.approx(by_text["nats"]) and by_tokens["stride"] == 16
    for name in ("shard", "folder"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["text"]["nats"] == pytest.approx(
            by_text["nats"]
        )


@pytest.mark.parametrize(
    ("make", "flag", "pattern"),
    [
        (None, "--text", r"--text .*missing.txt: no such file"),
        ("", "--text", r"--text .* is empty: there is nothing to score"),
        ("\n  \n", "--text", r"is empty"),
        ("Hi", "--text", r"holds 1 token\(s\); perplexity needs at least 2"),
        (None, "--tokens", r"--tokens .*: no such file"),
        (b"\x01", "--tokens", r"holds 1 bytes, not a whole number of uint16"),
        (None, "--choices", r"no such file"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": ', "--choices",
         r"line 2: not valid JSON"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n\n'
         '{"ctx": "a", "endings": ["b", "c"], "label": 3}\n', "--choices",
         r"line 3: label 3 is out of range for 2 endings"),
    ],
)  # fmt: skip
def test_eval_input_errors_are_one_line(capsys, checkpoint_dir, tmp_path, make, flag, pattern):
    path = tmp_path / "missing.txt"
    if make is not None:
        path = tmp_path / "input"
        if isinstance(make, bytes):
            path.write_bytes(make)
        else:
            path.write_text(make)
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, flag, path,
                       "--out", tmp_path / "r.json")  # fmt: skip
    assert_one_line(code, err, pattern)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("layout", ["llm.c shard", "raw uint16"])
def test_eval_tokens_refuses_an_id_past_gpt2s_vocabulary_in_either_layout(
    capsys, checkpoint_dir, tmp_path, layout
):
    import numpy as np

    ids = np.array([*gpt2().encode_ordinary(EVAL_TEXT), 50300], dtype=np.uint16)  # a padding id
    header = data.shard_header(len(ids)) if layout == "llm.c shard" else b""
    (tmp_path / "val.bin").write_bytes(header + ids.tobytes())
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--tokens",
                       tmp_path / "val.bin", "--out", tmp_path / "r.json")  # fmt: skip
    assert_one_line(code, err, r"val.bin holds id 50300, not a GPT-2 token \(< 50257\)")


@pytest.mark.parametrize(
    ("out", "pattern"),
    [
        (".", r"--out \. is a folder; give a file name"),
        ("no/such/folder/r.json", r"--out no/such/folder/r.json: no folder no/such/folder"),
    ],
)
def test_eval_checks_out_before_scoring(capsys, checkpoint_dir, eval_files, monkeypatch, out,
                                        pattern):  # fmt: skip
    monkeypatch.chdir(eval_files[0].parent)
    code, stdout, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--text",
                            eval_files[0], "--out", out)  # fmt: skip
    assert_one_line(code, err, pattern)
    assert stdout == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_eval_prints_the_table_before_an_out_file_that_fails(capsys, checkpoint_dir, eval_files):
    code, stdout, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--text",
                            eval_files[0], "--out", "/dev/full")  # fmt: skip
    err = err.splitlines()[-1]  # after the progress bar
    assert_one_line(code, err, r"--out /dev/full: cannot write it \(No space left on device\); "
                    "the results are above")  # fmt: skip
    assert "perplexity" in stdout and "bits/byte" in stdout


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--text", "x.txt"], "give the model: --checkpoint DIR or --hf DIR"),
        (["--checkpoint", "ckpt"], "give something to evaluate"),
        (["--checkpoint", "ckpt", "--text", "a", "--tokens", "b"], "not allowed with argument"),
        (["--checkpoint", "ckpt", "--text", "a", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--checkpoint", "ckpt", "--text", "a", "--stride", "0"], "--stride must be >= 1"),
    ],
)
def test_eval_usage_errors_exit_2(capsys, args, pattern):
    code, _, err = run(capsys, "eval", *args)
    assert code == 2 and re.search(pattern, err), err
    assert "Traceback" not in err


def test_eval_stride_beyond_the_block_and_a_missing_checkpoint(capsys, checkpoint_dir, eval_files):
    text, _ = eval_files
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--text", text,
                       "--stride", "33")  # fmt: skip
    assert_one_line(code, err, r"--stride 33 is more than the model's block_size 32")
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir / "nope", "--text", text)
    assert_one_line(code, err, "no checkpoint at")


def test_eval_reads_a_hf_directory_like_the_checkpoint(
    capsys, checkpoint_dir, eval_files, tmp_path
):
    text, _ = eval_files
    saved = load_checkpoint(checkpoint_dir)
    hf.save(saved.params, saved.model_config, tmp_path / "exported")
    for source, out in ((["--checkpoint", checkpoint_dir], "a.json"),
                        (["--hf", tmp_path / "exported"], "b.json")):  # fmt: skip
        code, stdout, err = run(capsys, "eval", *source, "--text", text, "--out", tmp_path / out)
        assert code == 0, err
    by_checkpoint, by_hf = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert by_hf["text"]["nats"] == pytest.approx(by_checkpoint["text"]["nats"], rel=1e-6)
    assert "step" not in by_hf["model"] and by_checkpoint["model"]["step"] == 5


STEERING = """
from gpt_fn.hooks import add_vector


def steer(params, config):
    return add_vector(f"h.{config.n_layer - 1}.resid_post", 100 * params["wte.weight"][7])
"""


def test_eval_under_hooks_scores_the_steered_model(capsys, checkpoint_dir, eval_files, tmp_path):
    from gpt_fn import eval as evaluation
    from gpt_fn.hooks import load_hooks

    text, choices = eval_files
    (tmp_path / "steering.py").write_text(STEERING)
    spec = f"{tmp_path / 'steering.py'}:steer"
    code, stdout, err = run(
        capsys, "eval", "--checkpoint", checkpoint_dir, "--text", text, "--choices", choices,
        "--stride", "8", "--hooks", spec, "--out", tmp_path / "steered.json",
    )  # fmt: skip
    assert code == 0, err
    assert f"hooks: {spec}" in stdout
    results = json.loads((tmp_path / "steered.json").read_text())
    assert results["model"]["hooks"] == spec
    saved = load_checkpoint(checkpoint_dir)
    hooks = load_hooks(spec, saved.params, saved.model_config)
    steered = evaluation.perplexity(
        saved.params, EVAL_TEXT, saved.model_config, stride=8, hooks=hooks
    )
    plain = evaluation.perplexity(saved.params, EVAL_TEXT, saved.model_config, stride=8)
    assert results["text"]["nats"] == pytest.approx(steered.nats, rel=1e-6)
    assert abs(steered.nats - plain.nats) > 1.0  # the hooks were applied
    items = evaluation.read_choices(choices)
    expected = evaluation.multiple_choice(saved.params, items, saved.model_config, hooks=hooks)
    assert results["choices"]["logprobs"] == [list(x) for x in expected.logprobs]


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("steering", r"hooks must be given as module:function"),
        ("no_such_lab:steer", r"hooks 'no_such_lab:steer': cannot import no_such_lab"),
        ("steering.py:nope", r"steering\.py has no function 'nope'"),
    ],
)
def test_eval_hooks_that_do_not_load_are_one_line(
    capsys, checkpoint_dir, eval_files, tmp_path, monkeypatch, spec, pattern
):
    (tmp_path / "steering.py").write_text(STEERING)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint_dir, "--text", eval_files[0],
                       "--hooks", spec, "--out", tmp_path / "r.json")  # fmt: skip
    assert_one_line(code, err, pattern)
    assert not (tmp_path / "r.json").exists()


# --- gpt-fn inspect -------------------------------------------------------------------------

IOI = "When Mary and John went to the store, John gave a drink to"


def test_inspect_reports_the_library_readouts_of_the_checkpoint(capsys, checkpoint_dir, tmp_path):
    from gpt_fn import direct_logit_attribution, logit_lens, run_with_cache
    from gpt_fn.tokenizer import single_token

    out = tmp_path / "report"
    code, stdout, err = run(capsys, "inspect", "--checkpoint", checkpoint_dir, "--prompt", IOI,
                            "--answer", " Mary", "--wrong", " John", "--out", out)  # fmt: skip
    assert code == 0, err
    saved = json.loads((out / "results.json").read_text())
    checkpoint = load_checkpoint(checkpoint_dir)
    params, config = checkpoint.params, checkpoint.model_config
    tokens = torch.tensor([gpt2().encode_ordinary(IOI)])
    mary, john = torch.tensor([single_token(" Mary")]), torch.tensor([single_token(" John")])
    logits, cache = run_with_cache(params, tokens, config)
    # The same readouts on a cache recorded with other sites: fp32 rounding (1e-6).
    dla, labels = direct_logit_attribution(params, cache, mary, config, by="head", incorrect=john)
    expected = dict(zip(labels, dla[:, 0].tolist(), strict=True))
    assert saved["dla"]["by_head"] == pytest.approx(expected, abs=1e-6)
    difference = (logits[0, -1, mary] - logits[0, -1, john]).item()
    assert saved["logit_difference"] == pytest.approx(difference, abs=1e-5)
    lens, layers = logit_lens(params, cache, config, ln="recompute")
    top = torch.tensor(saved["logit_lens"]["top_tokens"])[..., :1]  # (layers, seq, 1)
    assert saved["logit_lens"]["layers"] == layers
    torch.testing.assert_close(  # each cell's top token has the cell's largest logit
        lens[:, 0].gather(-1, top)[..., 0], lens[:, 0].amax(-1), rtol=0, atol=1e-5
    )
    assert saved["model"]["step"] == 5 and saved["prompt"] == IOI
    for name in [*saved["figures"].values(), "report.md"]:
        assert (out / name).is_file()
    assert "' Mary' - ' John': logit difference" in stdout and f"wrote {out}" in stdout


def test_inspect_reads_a_hf_directory_like_the_checkpoint(capsys, checkpoint_dir, tmp_path):
    from gpt_fn import inspect as inspection

    saved = load_checkpoint(checkpoint_dir)
    params, config = saved.params, saved.model_config
    hf.save(params, config, tmp_path / "exported")
    code, _, err = run(capsys, "inspect", "--hf", tmp_path / "exported", "--prompt", "a b a b",
                       "--out", tmp_path / "report")  # fmt: skip
    assert code == 0, err
    by_hf = json.loads((tmp_path / "report" / "results.json").read_text())
    tokens = torch.tensor(gpt2().encode_ordinary("a b a b"))
    expected = inspection.results(inspection.inspect_prompt(params, tokens, config), config)
    # The HF save is GPT-2's layout of the same numbers: equal up to the order of a sum.
    assert by_hf["answer"] == expected["answer"] and by_hf["answer"]["given"] is False
    for got, want in ((by_hf["dla"]["heads"], expected["dla"]["heads"]),
                      (by_hf["head_scores"]["induction"]["scores"],  # "a b a b" repeats
                       expected["head_scores"]["induction"]["scores"])):  # fmt: skip
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)
    assert by_hf["model"]["source"] == str(tmp_path / "exported")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--answer", " Mary and"], r"--answer ' Mary and' is 2 GPT-2 tokens \[' Mary', ' and'\]"),
        (["--wrong", "Johnathan"], r"--wrong 'Johnathan' is \d GPT-2 tokens"),
        (["--answer", " Mary", "--wrong", " Mary"], "--answer and --wrong are the same token"),
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", IOI * 3], r"--prompt is \d+ tokens; the model reads at most 32"),
    ],
)
def test_inspect_input_errors_are_one_line(capsys, checkpoint_dir, tmp_path, args, pattern):
    prompt = [] if "--prompt" in args else ["--prompt", IOI]
    code, _, err = run(capsys, "inspect", "--checkpoint", checkpoint_dir, *prompt, *args,
                       "--out", tmp_path / "report")  # fmt: skip
    assert_one_line(code, err, pattern)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--prompt", "hi"], "give the model: --checkpoint DIR or --hf DIR"),
        (["--checkpoint", "ckpt"], "the following arguments are required: --prompt"),
        (["--checkpoint", "ckpt", "--prompt", "hi", "--top", "0"], "--top must be >= 1"),
        (["--checkpoint", "ckpt", "--prompt", "hi", "--ln", "none"], "invalid choice"),
    ],
)
def test_inspect_usage_errors_exit_2(capsys, args, pattern):
    code, _, err = run(capsys, "inspect", *args)
    assert code == 2 and re.search(pattern, err), err
    assert "Traceback" not in err


def test_inspect_names_tokens_outside_a_small_vocabulary(capsys, tmp_path):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "small", Checkpoint(init_params(config, seed=0), {}, 1, config, {}))
    code, _, err = run(capsys, "inspect", "--checkpoint", tmp_path / "small", "--prompt", "hello")
    assert_one_line(code, err, r"--prompt holds GPT-2 token 31373 \('hello'\), outside the model's")
    code, _, err = run(capsys, "inspect", "--checkpoint", tmp_path / "small", "--prompt", "!",
                       "--answer", " Mary")  # fmt: skip
    assert_one_line(code, err, r"--answer holds GPT-2 token 5335 \(' Mary'\), outside .* of 64")


def test_inspect_of_a_missing_checkpoint_is_one_line(capsys, checkpoint_dir):
    code, _, err = run(capsys, "inspect", "--checkpoint", checkpoint_dir / "nope", "--prompt", "hi")
    assert_one_line(code, err, "no checkpoint at")


# --- batches of prompts, stop strings, beams and drafts --------------------------------------


def _spread_checkpoint(path: Path, config: GPTConfig, seed: int) -> Path:
    """A random checkpoint whose greedy paths are far from ties (as in test_decoding), so that
    tokens computed in other groupings (beams, draft chunks) agree with plain decoding."""
    params = init_params(config, seed=seed)
    params = {
        **params,
        "wte.weight": params["wte.weight"] * 10,
        "wpe.weight": params["wpe.weight"] * 100,
    }
    save_checkpoint(path, Checkpoint(params, {}, 5, config, {}))
    return path


@pytest.fixture
def models(tmp_path, one_thread) -> dict[str, Path]:
    # one_thread: these tiny models decode in milliseconds a step; a second thread on a busy
    # machine makes each step wait for it (10x slower here).
    target = GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16)
    draft = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=1, n_embd=8)
    other_vocab = GPTConfig(vocab_size=50304, block_size=32, n_layer=1, n_head=1, n_embd=8)
    return {
        "target": _spread_checkpoint(tmp_path / "target", target, 0),
        "draft": _spread_checkpoint(tmp_path / "draft", draft, 1),
        "other_vocab": _spread_checkpoint(tmp_path / "other", other_vocab, 2),
    }


PROMPTS = ["ROMEO:", "JULIET: O Romeo", "", "Wherefore"]  # a blank line is no prompt


def _prompt_file(tmp_path, lines=PROMPTS, name="prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _blocks(out: str) -> dict[str, str]:
    """Printed samples by header (`--- prompt 2 ---` -> its text)."""
    parts = re.split(r"^--- (.*) ---\n", out, flags=re.M)
    return dict(zip(parts[1::2], (text.rstrip("\n") for text in parts[2::2]), strict=True))


def test_a_prompt_file_is_one_batch_and_each_sample_is_what_its_prompt_gives_alone(
    capsys, models, tmp_path
):
    ckpt = f"--checkpoint={models['target']}"
    code, out, err = run(
        capsys, "sample", ckpt, "--prompt-file", _prompt_file(tmp_path), "--greedy",
        "--max-new-tokens=10",
    )  # fmt: skip
    assert code == 0, err
    blocks = _blocks(out)
    assert list(blocks) == ["prompt 1", "prompt 2", "prompt 3"]
    for header, prompt in zip(blocks, ["ROMEO:", "JULIET: O Romeo", "Wherefore"], strict=True):
        code, alone, err = run(capsys, "sample", ckpt, "--prompt", prompt, "--greedy",
                               "--max-new-tokens=10")  # fmt: skip
        assert blocks[header] == alone.rstrip("\n") and alone.startswith(prompt)
    code, out, _ = run(
        capsys, "sample", ckpt, "--prompt-file", _prompt_file(tmp_path), "--num-samples=2",
        "--max-new-tokens=4",
    )  # fmt: skip
    assert code == 0 and list(_blocks(out))[:3] == [
        "prompt 1, sample 1", "prompt 1, sample 2", "prompt 2, sample 1",
    ]  # fmt: skip


@pytest.mark.parametrize("batched", [False, True])
def test_stop_ends_the_printed_text_with_the_stop_string(capsys, models, tmp_path, batched):
    ckpt = f"--checkpoint={models['target']}"
    code, free, _ = run(
        capsys, "sample", ckpt, "--prompt=ROMEO:", "--greedy", "--max-new-tokens=12"
    )
    generated = free.rstrip("\n")[len("ROMEO:") :]
    stop = generated[4:7]  # three characters in the middle of the new text
    source = ["--prompt-file", _prompt_file(tmp_path, ["ROMEO:", "x"])] if batched else []
    code, out, err = run(
        capsys, "sample", ckpt, *(source or ["--prompt=ROMEO:"]), "--greedy",
        "--max-new-tokens=12", "--stop", stop, "--stop", "never printed",
    )  # fmt: skip
    assert code == 0, err
    text = _blocks(out)["prompt 1"] if batched else out.rstrip("\n")
    assert text == "ROMEO:" + cut_at_stop(generated, [stop]) and text.endswith(stop)


def test_num_beams_prints_the_best_beams_of_each_prompt_with_their_scores(capsys, models, tmp_path):
    ckpt = f"--checkpoint={models['target']}"
    code, out, err = run(
        capsys, "sample", ckpt, "--prompt-file", _prompt_file(tmp_path), "--num-beams=3",
        "--num-samples=2", "--max-new-tokens=6",
    )  # fmt: skip
    assert code == 0, err
    blocks = _blocks(out)
    assert len(blocks) == 6
    saved = load_checkpoint(models["target"])
    encoding = gpt2()
    prompt = encoding.encode("JULIET: O Romeo")
    best = beam_search(saved.params, [prompt], saved.model_config, 3, max_new_tokens=6,
                       eos_token_id=EOT_TOKEN, transform=ban_tokens([]))  # fmt: skip
    header = f"prompt 2, beam 1, score {float(best.scores[0]):.4f}"
    assert blocks[header] == "JULIET: O Romeo" + encoding.decode(best.sequences[0][len(prompt) :])


def test_num_beams_with_stop_ends_beams_at_the_stop_string(capsys, models):
    ckpt = f"--checkpoint={models['target']}"
    saved = load_checkpoint(models["target"])
    encoding = gpt2()
    prompt = encoding.encode("ROMEO:")
    options = dict(max_new_tokens=8, eos_token_id=EOT_TOKEN)
    free = beam_search(saved.params, [prompt], saved.model_config, 2, **options)
    stop = encoding.decode(free.sequences[0][len(prompt) :])[3:5]  # mid-way in the best beam
    best = beam_search(saved.params, [prompt], saved.model_config, 2, stop=[stop], **options)
    code, out, err = run(
        capsys, "sample", ckpt, "--prompt=ROMEO:", "--num-beams=2", "--max-new-tokens=8",
        "--stop", stop,
    )  # fmt: skip
    assert code == 0, err
    text = encoding.decode(best.sequences[0][len(prompt) :])
    assert best.sequences != free.sequences  # the stop string changed the search
    assert _blocks(out) == {f"beam 1, score {float(best.scores[0]):.4f}": "ROMEO:" + text}


@pytest.mark.parametrize("greedy", [True, False])
def test_a_draft_checkpoint_decodes_speculatively_and_reports_acceptance(
    capsys, models, tmp_path, greedy
):
    common = [
        "sample", f"--checkpoint={models['target']}", "--prompt-file", _prompt_file(tmp_path),
        "--max-new-tokens=12", *(["--greedy"] if greedy else ["--seed=3"]),
    ]  # fmt: skip
    code, out, err = run(capsys, *common, f"--draft-checkpoint={models['draft']}")
    assert code == 0, err
    assert re.search(r"speculative decoding: \d+ of \d+ draft tokens accepted", err)
    assert len(_blocks(out)) == 3
    if greedy:  # the target's own greedy tokens
        assert out == run(capsys, *common)[1]


@pytest.mark.parametrize(
    ("flags", "pattern", "expected"),
    [
        (["--num-beams=2", "--top-k=5"], "--top-k shapes sampling; --num-beams searches", 2),
        (["--num-beams=2", "--temperature=0.5"], "--temperature shapes sampling", 2),
        (["--num-beams=2", "--num-samples=3"], "--num-samples 3 with --num-beams 2", 2),
        (["--num-beams=0"], "--num-beams must be >= 1", 2),
        (["--num-beams=2", "--draft-checkpoint=x"], "--num-beams searches, --draft-checkpoint", 2),
        (["--num-draft-tokens=0"], "--num-draft-tokens must be >= 1", 2),
        (["--stop="], "--stop must not be empty", 2),
    ],
)
def test_sample_flags_that_cannot_go_together(capsys, models, flags, pattern, expected):
    code, _, err = run(capsys, "sample", f"--checkpoint={models['target']}", *flags)
    assert_one_line(code, err, re.escape(pattern), expected=expected)


def test_prompt_files_and_drafts_that_cannot_be_used_are_one_line(capsys, models, tmp_path):
    ckpt = f"--checkpoint={models['target']}"
    cases = [
        (["--prompt-file", tmp_path / "none.txt"], "--prompt-file .*none.txt: cannot read it"),
        (["--prompt-file", _prompt_file(tmp_path, ["", "  "], "blank.txt")], "holds no prompts"),
        (
            ["--prompt-file", _prompt_file(tmp_path, ["ROMEO:", "a " * 40], "long.txt")],
            "--prompt-file line 2 is 41 tokens, longer than the model's block_size 32",
        ),
        (
            [f"--draft-checkpoint={models['other_vocab']}"],
            "--draft-checkpoint .* has vocab_size 50304, the model 50257",
        ),
        ([f"--draft-checkpoint={tmp_path / 'nowhere'}"], "no checkpoint"),
    ]
    for flags, pattern in cases:
        code, _, err = run(capsys, "sample", ckpt, "--max-new-tokens=2", *flags)
        assert_one_line(code, err, pattern)
