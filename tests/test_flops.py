import pytest
import torch

from gpt_fn import GPTConfig
from gpt_fn.flops import matmul_params, mfu, peak_flops, train_flops_per_token


def test_gpt2_small_counts_match_the_published_figures():
    config = GPTConfig.from_preset("gpt2")
    # 124,439,808 parameters in all; minus wpe (1024 x 768) = 123,653,376.
    assert matmul_params(config) == 124_439_808 - 1024 * 768
    # nanoGPT: 6N + 12 L H Q T at T=1024.
    expected = 6 * matmul_params(config) + 12 * 12 * 12 * 64 * 1024
    assert train_flops_per_token(config, 1024) == expected


def test_mfu_is_achieved_over_peak():
    config = GPTConfig.from_preset("cpu-tiny")
    per_token = train_flops_per_token(config, 64)
    assert mfu(1000.0, config, 64, peak=per_token * 2000.0) == pytest.approx(0.5)


def test_cpu_peak_is_measured_and_positive():
    assert peak_flops("cpu", torch.float32) > 1e9
