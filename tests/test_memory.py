"""gpt_fn.memory: what a sampling request needs and a training run keeps (lower bounds checked
against what autograd really keeps), what the machine has, and the refusal of requests that
cannot fit (in the API; the CLI's cases are in test_cli.py)."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.timing import saved_for_backward_bytes
from gpt_fn import GPT, GPTConfig, init_params, loss, memory, sampling
from gpt_fn.memory import (
    InsufficientMemoryError,
    allocation_errors,
    available_bytes,
    check_fits,
    training_bytes,
)
from gpt_fn.optim import adamw, gpt_muon_adamw, muon

pytestmark = pytest.mark.usefixtures("one_thread")


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
        InsufficientMemoryError,
        match=rf"generate \(5000 rows\) needs at least {need / 1e6:.1f} MB of memory, more than "
        r"the 10.0 MB available on cpu: ask for fewer rows, beams or tokens",
    ):
        sampling.generate(params, [[1, 2, 3]], CONFIG, max_new_tokens=4, num_samples=5000, seed=0)
    with pytest.raises(InsufficientMemoryError, match=r"beam_search \(5000 beams\) needs at least"):
        sampling.beam_search(params, [[1, 2, 3]], CONFIG, 5000, max_new_tokens=4)
    # What fits runs as before.
    assert len(sampling.generate(params, [[1, 2, 3]], CONFIG, max_new_tokens=2, greedy=True)[0])


def _kept_by_backward(params, tokens, config, forward=None) -> int:
    """Bytes of the activations autograd keeps for backward in `forward(inputs, targets)`
    (default: `gpt_fn.loss`), the params left out."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if forward is None:
        return saved_for_backward_bytes(
            lambda: loss(params, inputs, targets, config), list(params.values())
        )
    return saved_for_backward_bytes(lambda: forward(inputs, targets), list(params.values()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_training_estimate_is_a_lower_bound_of_what_a_step_keeps(optimizer):
    config = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32)
    params = {k: v.requires_grad_() for k, v in init_params(config, seed=0).items()}
    tokens = torch.randint(0, 101, (4, 17), generator=torch.Generator().manual_seed(0))
    schedule = lambda step: 1e-3  # noqa: E731
    make = (
        adamw(schedule) if optimizer == "adamw" else gpt_muon_adamw(muon(schedule), adamw(schedule))
    )
    state = make.init(params)
    param_bytes = sum(p.nbytes for p in params.values())
    real = (
        2 * param_bytes  # the params and their gradients
        + sum(v.nbytes for v in state.values())
        + _kept_by_backward(params, tokens, config)
        + 2 * tokens[:, 1:].nbytes
    )
    estimate = training_bytes(config, batch_size=4, optimizer=optimizer)
    assert estimate <= real
    assert estimate >= 0.5 * real  # a bound that still means something


def test_with_activation_checkpointing_the_estimate_is_a_lower_bound_too():
    config = GPTConfig(vocab_size=101, block_size=64, n_layer=6, n_head=2, n_embd=32)
    params = {k: v.requires_grad_() for k, v in init_params(config, seed=0).items()}
    tokens = torch.randint(0, 101, (4, 65), generator=torch.Generator().manual_seed(0))
    model = GPT.from_params(params, config, checkpoint_blocks=True)
    # Kept through the backward: what the checkpointed forward saves (the blocks' inputs, the
    # head's), and at its peak one block's activations, recomputed.
    kept = _kept_by_backward(params, tokens, config, forward=model)
    kept += _kept_by_backward(params, tokens, config) // config.n_layer
    estimate = training_bytes(
        config, batch_size=4, optimizer="adamw", activation_checkpointing=True
    )
    state = 4 * sum(p.nbytes for p in params.values())  # params, grads, AdamW's two buffers
    assert estimate - state - 2 * tokens[:, 1:].nbytes <= kept
    assert estimate < training_bytes(config, batch_size=4, optimizer="adamw")


def test_a_request_beyond_the_free_memory_is_refused_with_its_size():
    free = available_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    check_fits(free // 2, torch.device("cpu"), what="half", advice="fine")
    with pytest.raises(
        InsufficientMemoryError, match=r"^it needs at least [\d.,]+ GB .*: ask less$"
    ):
        check_fits(2**50, torch.device("cpu"), what="it", advice="ask less")


def test_a_failed_allocation_is_the_named_error():
    with (
        pytest.raises(InsufficientMemoryError, match="training ran out of memory .*: ask less"),
        allocation_errors("training", "ask less"),
    ):
        torch.empty(2**52, dtype=torch.uint8)  # 4 PiB: refused by the allocator at once
    with pytest.raises(RuntimeError, match="not about memory"), allocation_errors("x", "y"):
        raise RuntimeError("not about memory")
