"""Memory estimates: lower bounds of what training really keeps, and one named error."""

import pytest
import torch

from gpt_fn import GPT, GPTConfig, init_params, loss
from gpt_fn.memory import (
    InsufficientMemoryError,
    allocation_errors,
    available_bytes,
    check_fits,
    training_bytes,
)
from gpt_fn.optim import adamw, gpt_muon_adamw, muon

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept_by_backward(params, tokens, config, forward=None) -> int:
    """Bytes of the activations autograd keeps for backward (storages, each once; no params)
    in `forward(inputs, targets)` (default: `gpt_fn.loss`)."""
    storages: dict[int, int] = {}
    own = {p.untyped_storage().data_ptr() for p in params.values()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if forward is None:
            loss(params, tokens[:, :-1], tokens[:, 1:], config)
        else:
            forward(tokens[:, :-1], tokens[:, 1:])
    return sum(storages.values())


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
        InsufficientMemoryError, match=r"^it needs at least [\d.,]+ TiB .*: ask less$"
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
