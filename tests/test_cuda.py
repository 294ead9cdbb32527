"""The CUDA paths: bf16 autocast, torch.compile, flash SDPA, nccl DDP/FSDP, decoding on a GPU.

CI has no GPU: every test here skips cleanly without CUDA. On a machine with one they check
that the paths the CPU tests cannot reach run and agree with the CPU's results.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt_fn
from gpt_fn import sampling
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CONFIG = gpt_fn.GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=128)


def test_bf16_autocast_and_compile_train_like_fp32():
    params = gpt_fn.init_params(CONFIG, seed=0, device="cuda")
    tokens = torch.randint(0, CONFIG.vocab_size, (4, 65), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    reference = gpt_fn.loss(params, x, y, CONFIG)
    with shape_checks(False), torch.autocast("cuda", dtype=torch.bfloat16):
        module = gpt_fn.GPT.from_params(params, CONFIG)
        compiled = torch.compile(module)(x, y)
    # bf16 operands (8 mantissa bits) on a loss of ~6.2: within a few hundredths.
    assert abs(float(compiled) - float(reference)) < 5e-2


def test_flash_sdpa_agrees_with_the_manual_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = gpt_fn.nn.sdpa_kernel(q, k, v)
    manual = gpt_fn.nn.manual_kernel(q.float(), k.float(), v.float())
    torch.testing.assert_close(flash.float(), manual, atol=3e-2, rtol=0)  # bf16 outputs


def test_greedy_decoding_on_cuda_gives_the_cpus_tokens():
    params = gpt_fn.init_params(CONFIG, seed=0)
    params = {**params, "wte.weight": params["wte.weight"] * 10}  # wide argmax gaps
    rows = [[1, 2, 3], [7]]
    on_cpu = sampling.generate(params, rows, CONFIG, max_new_tokens=16, greedy=True)
    cuda = {k: v.cuda() for k, v in params.items()}
    assert sampling.generate(cuda, rows, CONFIG, max_new_tokens=16, greedy=True) == on_cpu


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_training_runs_on_the_visible_gpus(corpus, tmp_path, parallel):
    gpus = min(2, torch.cuda.device_count())
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
         "-m", "gpt_fn", "train", f"--data={corpus}", f"--data-dir={tmp_path / 'tokens'}",
         f"--out-dir={tmp_path / 'run'}", "--preset=cpu-tiny", "--n-layer=1", "--block-size=16",
         "--batch-size=4", "--max-steps=4", "--eval-interval=2", "--eval-batches=1",
         "--sample-tokens=4", f"--parallel={parallel}", "--no-compile"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_inspect_on_cuda_reports_the_cpus_numbers(tmp_path):
    from gpt_fn import inspect as inspection

    config = gpt_fn.GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=64)
    params = gpt_fn.init_params(config, seed=0)
    tokens = torch.tensor([464, 3797, 3332, 319, 262, 3797, 3332])  # "The cat sat on the cat sat"
    on_cpu = inspection.inspect_prompt(params, tokens, config, answer=319, wrong=262)
    on_gpu = inspection.inspect_prompt(
        {name: value.cuda() for name, value in params.items()}, tokens.cuda(), config,
        answer=319, wrong=262,
    )  # fmt: skip
    # fp32 matmuls on another device (TF32 off by default): 1e-4 on logits of order 1.
    torch.testing.assert_close(on_gpu.dla_by_head.cpu(), on_cpu.dla_by_head, rtol=0, atol=1e-4)
    for kind, scores in on_cpu.head_scores.items():
        torch.testing.assert_close(on_gpu.head_scores[kind].cpu(), scores, rtol=0, atol=1e-5)
    written = inspection.write_report(on_gpu, tmp_path, config)
    assert (tmp_path / "top_heads.png").is_file() and written["answer"]["token"] == 319
