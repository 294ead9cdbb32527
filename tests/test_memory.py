"""Tests for gpt_fn.memory: what a sampling request needs, what the machine has, and the
refusal of requests that cannot fit (in the API; the CLI's cases are in test_cli.py)."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn import GPTConfig, init_params, memory, sampling

CONFIG = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=8)


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 8),
    prompt=st.integers(1, 40),
    new=st.integers(0, 40),
    per_prompt=st.integers(1, 64),
)
def test_an_estimate_holds_the_cache_and_logits_and_grows_with_every_size(
    batch, prompt, new, per_prompt
):
    """Invariants: an estimate is at least the KV cache and one fp32 logits tensor of the
    request's rows (what its tensors must hold), and never shrinks when a size grows."""
    rows = batch * per_prompt
    capacity = max(min(CONFIG.block_size, prompt + new - 1), min(prompt, CONFIG.block_size))
    floor = 2 * CONFIG.n_layer * rows * capacity * CONFIG.n_embd * 4 + rows * CONFIG.vocab_size * 4
    sizes = dict(batch=batch, prompt=prompt, max_new_tokens=new)
    generate = memory.generate_bytes(CONFIG, **sizes, num_samples=per_prompt)
    beams = memory.beam_search_bytes(CONFIG, **sizes, num_beams=per_prompt)
    assert generate >= floor and beams >= floor
    for grown in ({"batch": batch + 1}, {"prompt": prompt + 1}, {"max_new_tokens": new + 1}):
        bigger = {**sizes, **grown}
        assert memory.generate_bytes(CONFIG, **bigger, num_samples=per_prompt) >= generate
        assert memory.beam_search_bytes(CONFIG, **bigger, num_beams=per_prompt) >= beams
    assert memory.generate_bytes(CONFIG, **sizes, num_samples=per_prompt + 1) > generate
    assert memory.beam_search_bytes(CONFIG, **sizes, num_beams=per_prompt + 1) > beams
    half = memory.generate_bytes(CONFIG, **sizes, num_samples=per_prompt, dtype=torch.bfloat16)
    assert half < generate


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_the_cpu_has_a_known_positive_amount_available():
    total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert 0 < memory.available_bytes("cpu") <= total


def test_generate_and_beam_search_refuse_what_does_not_fit_naming_the_need(monkeypatch):
    params = init_params(CONFIG, seed=0)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000_000)  # 10 MB free
    need = memory.generate_bytes(CONFIG, batch=1, prompt=3, max_new_tokens=4, num_samples=5000)
    with pytest.raises(
        ValueError,
        match=rf"generate \(5000 rows\) needs about {need / 1e6:.1f} MB of memory, more than "
        r"the 10.0 MB available on cpu",
    ):
        sampling.generate(params, [[1, 2, 3]], CONFIG, max_new_tokens=4, num_samples=5000, seed=0)
    with pytest.raises(ValueError, match=r"beam_search \(5000 beams\) needs about .* MB"):
        sampling.beam_search(params, [[1, 2, 3]], CONFIG, 5000, max_new_tokens=4)
    # What fits runs as before.
    assert len(sampling.generate(params, [[1, 2, 3]], CONFIG, max_new_tokens=2, greedy=True)[0])
