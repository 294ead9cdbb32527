"""Argument checks: each helper accepts what it should and names the argument when it refuses."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt_fn.checks import (
    check_attention_mask,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_one_dtype_and_device,
    check_same_keys,
    check_shapes,
    check_token_batch,
    check_token_id,
    check_token_ids,
    check_token_tensor,
    is_batched,
    is_traced,
)
from gpt_fn.shapes import shape_checks


def test_check_int_returns_the_int_and_refuses_bools_floats_and_small_values():
    assert check_int("n", 3, at_least=1) == 3
    assert check_int("n", 0, at_least=0) == 0
    assert check_int("n", -7) == -7
    for bad, message in [
        (0, "n must be a positive int, got 0"),
        (True, "n must be a positive int, got True"),
        (2.0, "n must be a positive int, got 2.0"),
        ("3", "n must be a positive int, got '3'"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_int("n", bad, at_least=1)
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        check_int("n", -1, at_least=0)
    with pytest.raises(ValueError, match="n must be an int, got None"):
        check_int("n", None)


@pytest.mark.parametrize(
    ("bounds", "good", "bad", "interval"),
    [
        ({"at_least": 0.0, "below": 1.0}, [0, 0.5], [1.0, -0.1], r"in \[0, 1\)"),
        ({"above": 0.0, "at_most": 1.0}, [1, 1e-9], [0.0, 1.5], r"in \(0, 1\]"),
        ({"above": 0.0}, [1e300], [0.0, -2.0], "> 0"),
        ({"at_least": 0.0}, [0.0], [-1e-12], ">= 0"),
        ({"below": 1.0}, [-1e300], [1.0], "< 1"),
    ],
)
def test_check_number_keeps_in_range_numbers_as_floats_and_states_the_interval(
    bounds, good, bad, interval
):
    for value in good:
        out = check_number("x", value, **bounds)
        assert out == value and type(out) is float
    for value in bad:
        with pytest.raises(ValueError, match=f"x must be {interval}, got"):
            check_number("x", value, **bounds)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, True, "0.5", None])
def test_check_number_refuses_non_finite_numbers_and_other_kinds(bad):
    with pytest.raises(ValueError, match="x must be a finite number, got"):
        check_number("x", bad)


def test_check_bool_and_check_choice():
    assert check_bool("flag", False) is False
    with pytest.raises(ValueError, match="flag must be a bool"):
        check_bool("flag", "no")
    with pytest.raises(ValueError, match="flag must be a bool"):
        check_bool("flag", 1)
    assert check_choice("kernel", "sdpa", ("sdpa", "manual")) == "sdpa"
    with pytest.raises(ValueError, match="unknown kernel 'flash'; choose one of 'sdpa', 'manual'"):
        check_choice("kernel", "flash", ("sdpa", "manual"))


def test_check_token_id_bounds_the_id_by_the_vocabulary():
    assert check_token_id("eos", 9, vocab_size=10) == 9
    with pytest.raises(ValueError, match=r"eos 10 is outside \[0, vocab_size=10\)"):
        check_token_id("eos", 10, vocab_size=10)
    with pytest.raises(ValueError, match="eos must be an int >= 0"):
        check_token_id("eos", -1, vocab_size=10)


def test_check_token_tensor_names_the_problem_with_the_object_or_its_dtype():
    ids = torch.tensor([[1, 2]])
    assert check_token_tensor("tokens", ids) is ids
    assert check_token_tensor("tokens", ids.int()).dtype == torch.int32
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor of token ids, got list"):
        check_token_tensor("tokens", [[1, 2]])
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=f"integer tensor, got dtype {dtype}"):
            check_token_tensor("tokens", ids.to(dtype))
    for dtype in (torch.uint8, torch.int16):
        with pytest.raises(TypeError, match=f"int64 or int32 tensor, got dtype {dtype}"):
            check_token_tensor("tokens", ids.to(dtype))


def test_check_token_ids_names_the_first_bad_id_and_is_skipped_under_vmap():
    check_token_ids("token id", torch.tensor([[0, 9]]), vocab_size=10)
    check_token_ids("token id", torch.zeros(2, 0, dtype=torch.long), vocab_size=10)
    with pytest.raises(ValueError, match=r"token id 10 is outside \[0, vocab_size=10\)"):
        check_token_ids("token id", torch.tensor([[0, 10]]), vocab_size=10)
    with pytest.raises(ValueError, match="token id -3 is outside"):
        check_token_ids("token id", torch.tensor([[-3, 10]]), vocab_size=10)

    def checked(tokens):
        check_token_ids("token id", tokens, vocab_size=10)
        return tokens * 2

    # Under vmap the values cannot be read: the check steps aside instead of failing.
    assert torch.equal(
        torch.func.vmap(checked)(torch.tensor([[1], [99]])), torch.tensor([[2], [198]])
    )


def test_is_batched_sees_a_vmap_through_grad_wrappers_and_nothing_else():
    seen = {}

    def record(x):
        seen["batched"], seen["traced"] = is_batched(x), is_traced(x)
        return x.sum()

    x = torch.ones(3, 2)
    record(x)
    assert seen == {"batched": False, "traced": False}
    torch.func.grad(record)(x)
    assert seen == {"batched": False, "traced": False}
    torch.func.vmap(torch.func.grad(record))(x)
    assert seen == {"batched": True, "traced": True}


def test_check_same_keys_passes_equal_key_sets_in_any_order_and_container():
    check_same_keys({"a": 1, "b": 2}, {"b": 3, "a": 4}, what="x")
    check_same_keys({"a": 1}.keys(), {"a"}, what="x")
    check_same_keys({}, set(), what="x")


def test_check_same_keys_names_missing_then_unexpected_keys_first_three_in_order():
    expected = {name: 0 for name in ["e", "d", "c", "b", "a"]}
    with pytest.raises(KeyError) as caught:
        check_same_keys({"a": 0, "z": 0}, expected, what="params for this config")
    assert caught.value.args[0] == (
        "params for this config: missing 4 keys ['e', 'd', 'c', ...]; 1 unexpected key ['z']"
    )
    with pytest.raises(ValueError, match=r"^grads: missing 1 key \['b'\]$"):
        check_same_keys(["a"], ["a", "b"], what="grads", error=ValueError)
    with pytest.raises(KeyError) as caught:
        check_same_keys(dict.fromkeys("abc"), ["a"], what="grads")
    assert caught.value.args[0] == "grads: 2 unexpected keys ['b', 'c']"


@given(
    got=st.sets(st.sampled_from("abcdefg")),
    expected=st.sets(st.sampled_from("abcdefg")),
)
def test_check_same_keys_raises_exactly_when_the_sets_differ_and_names_a_differing_key(
    got, expected
):
    if got == expected:
        check_same_keys(got, expected, what="x")
        return
    with pytest.raises(KeyError) as caught:
        check_same_keys(got, expected, what="x")
    message = caught.value.args[0]
    assert (
        f"missing {len(expected - got)} " in message if expected - got else "missing" not in message
    )
    assert (
        f"{len(got - expected)} unexpected " in message
        if got - expected
        else "unexpected" not in message
    )
    assert any(repr(key) in message for key in got ^ expected)


def test_check_token_batch_names_the_shape_the_length_and_the_first_bad_id():
    tokens = torch.tensor([[1, 2, 3]])
    check_token_batch(tokens, vocab_size=4, block_size=3)
    check_token_batch(tokens, vocab_size=4)  # no block_size: any length
    with pytest.raises(
        ValueError, match=r"tokens must have shape \(batch, seq\), got shape \(3,\)"
    ):
        check_token_batch(tokens[0], vocab_size=4)
    with pytest.raises(ValueError, match="sequence of 3 positions is longer than block_size=2"):
        check_token_batch(tokens, vocab_size=4, block_size=2)
    with pytest.raises(ValueError, match=r"prompt: token id 3 is outside \[0, vocab_size=3\)"):
        check_token_batch(tokens, vocab_size=3, name="prompt")
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        check_token_batch(tokens.float(), vocab_size=4)


def test_check_attention_mask_returns_bool_and_refuses_bad_values_and_empty_rows():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    mask = check_attention_mask(torch.tensor([[1, 1, 0], [0, 1, 1]]), tokens)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, False], [False, True, True]]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\)"):
        check_attention_mask(torch.ones(2, 2, dtype=torch.long), tokens)
    with pytest.raises(TypeError, match="bool or integer"):
        check_attention_mask(torch.ones(2, 3), tokens)
    with pytest.raises(ValueError, match="only 0 \\(padding\\) and 1"):
        check_attention_mask(torch.full((2, 3), 2), tokens)
    with pytest.raises(ValueError, match="row 1 has no real token"):
        check_attention_mask(torch.tensor([[1, 0, 0], [0, 0, 0]]), tokens)


def test_check_shapes_names_the_missing_the_unexpected_and_the_misshapen_key():
    expected = {"a": (2,), "b": (1, 3)}
    check_shapes({"a": torch.zeros(2), "b": torch.zeros(1, 3)}, expected, what="state")
    with pytest.raises(KeyError, match=r"state for this config: missing 1 key \['b'\]"):
        check_shapes({"a": torch.zeros(2)}, expected, what="state")
    with pytest.raises(KeyError, match=r"s for this config: 1 unexpected key \['c'\]"):
        check_shapes(
            {"a": torch.zeros(2), "b": torch.zeros(1, 3), "c": torch.zeros(1)}, expected, what="s"
        )
    with pytest.raises(ValueError, match=r"'b' has shape \(3,\), expected \(1, 3\)"):
        check_shapes({"a": torch.zeros(2), "b": torch.zeros(3)}, expected, what="state")
    with shape_checks(False), pytest.raises(TypeError, match="'a' is a list, not a torch.Tensor"):
        check_shapes({"a": [0, 0], "b": torch.zeros(1, 3)}, expected, what="state")


def test_check_one_dtype_and_device_names_the_odd_tensor_and_allows_autocast_mixes():
    tensors = {"w": torch.zeros(2), "b": torch.zeros(2)}
    check_one_dtype_and_device(tensors, reference="w", what="params")
    with pytest.raises(TypeError, match="params: 'b' has dtype torch.int64; params must be float"):
        check_one_dtype_and_device({**tensors, "b": torch.zeros(2, dtype=torch.long)}, reference="w", what="params")  # fmt: skip
    mixed = {**tensors, "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match="'b' has dtype torch.float64 but 'w' has torch.float32"):
        check_one_dtype_and_device(mixed, reference="w", what="params")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_one_dtype_and_device(mixed, reference="w", what="params")
