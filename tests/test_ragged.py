"""Ragged batches and the preallocated KV cache: every row decodes what its prompt decodes alone.

Covers padded forward passes, left-padded generation (equal to HF `generate` with an
attention mask), per-row cropping past block_size, in-place and pure decode steps, fan-out,
stop strings, steering during generation, the compiled decode step, and the errors.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

import gpt_fn
from gpt_fn import hf
from gpt_fn import hooks as interventions
from gpt_fn.eval import token_scores
from gpt_fn.nn.padding import pad
from gpt_fn.sampling import (
    PAD,
    beam_search,
    cut_at_stop,
    decode_step,
    decode_step_,
    generate,
    prefill,
)
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.usefixtures("one_thread")

# A padded row and the same row alone sum the same terms in other groupings (a masked kernel
# over more keys): a few fp32 ulps of logits of order 1-10, as the 1e-5 bound allows.
ATOL = 1e-5
CONFIG = gpt_fn.GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)


def _params(config=CONFIG):
    params = gpt_fn.init_params(config, seed=0)
    # Wider logit gaps than a plain random init, so greedy paths are far from ties.
    return {
        **params,
        "wte.weight": params["wte.weight"] * 10,
        "wpe.weight": params["wpe.weight"] * 100,
    }


PARAMS = _params()
prompts = st.lists(
    st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=10),
    min_size=1,
    max_size=4,
)
slow = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@slow
@given(rows=prompts)
def test_every_row_of_a_padded_forward_gives_its_logits_alone(rows):
    for side in ("left", "right"):
        tokens, mask = pad(rows, side=side)
        logits = gpt_fn.forward(PARAMS, tokens, CONFIG, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = gpt_fn.forward(PARAMS, torch.tensor([row]), CONFIG)[0]
            torch.testing.assert_close(logits[i][mask[i]], alone, atol=ATOL, rtol=0)


@slow
@given(rows=prompts, new=st.integers(1, 12))
def test_every_row_of_a_ragged_batch_generates_its_greedy_tokens_alone(rows, new):
    batched = generate(PARAMS, rows, CONFIG, max_new_tokens=new, greedy=True)
    for row, out in zip(rows, batched, strict=True):
        assert out == generate(PARAMS, [row], CONFIG, max_new_tokens=new, greedy=True)[0]


@slow
@given(rows=prompts, seed=st.integers(0, 2**32))
def test_a_rows_samples_depend_on_the_seed_and_its_row_not_on_padding(rows, seed):
    batched = generate(PARAMS, rows, CONFIG, max_new_tokens=6, seed=seed)
    for i, row in enumerate(rows):
        # The same prompt in every row, so row i needs no padding at all.
        unpadded = generate(PARAMS, [row] * len(rows), CONFIG, max_new_tokens=6, seed=seed)
        assert batched[i] == unpadded[i]


def test_a_left_padded_tensor_with_its_mask_equals_token_lists():
    rows = [[5, 6, 7, 8], [9], [3, 4]]
    tokens, mask = pad(rows, side="left")
    as_tensor = generate(PARAMS, tokens, CONFIG, attention_mask=mask, max_new_tokens=5, greedy=True)
    as_lists = generate(PARAMS, rows, CONFIG, max_new_tokens=5, greedy=True)
    assert as_tensor[:, :4].tolist() == tokens.tolist()  # the prompts come back as given
    assert [row[-5:] for row in as_lists] == as_tensor[:, 4:].tolist()


def test_rows_past_block_size_are_cropped_each_on_its_own():
    rows = [list(range(1, 15)), [7, 8], list(range(20, 29))]
    new = 2 * CONFIG.block_size
    batched = generate(PARAMS, rows, CONFIG, max_new_tokens=new, greedy=True)
    cached_alone = [generate(PARAMS, [r], CONFIG, max_new_tokens=new, greedy=True)[0] for r in rows]
    assert batched == cached_alone
    uncached = generate(PARAMS, rows, CONFIG, max_new_tokens=new, greedy=True, use_cache=False)
    assert uncached == batched
    # The definition: nanoGPT's loop, each row on its own last block_size tokens.
    for row, out in zip(rows, batched, strict=True):
        tokens = list(row)
        for _ in range(new):
            window = torch.tensor([tokens[-CONFIG.block_size :]])
            tokens.append(int(gpt_fn.forward(PARAMS, window, CONFIG)[0, -1].argmax()))
        assert out == tokens


def test_left_padded_greedy_tokens_equal_hf_generate_with_an_attention_mask():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=101, n_positions=16, n_layer=2, n_head=3, n_embd=24,
                   initializer_range=0.3)
    ).eval()  # fmt: skip
    params = hf.from_hf_state_dict(model.state_dict(), hf.config_from_hf(model.config))
    rows = [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42]]
    tokens, mask = pad(rows, side="left")
    new = CONFIG.block_size - tokens.shape[1]
    ours = generate(params, tokens, CONFIG, attention_mask=mask, max_new_tokens=new, greedy=True)
    with torch.no_grad():
        theirs = model.generate(
            tokens, attention_mask=mask.long(), do_sample=False, max_new_tokens=new,
            min_new_tokens=new, pad_token_id=0,
        )  # fmt: skip
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 5:].flatten().tolist())) > 6  # a real path, not one repeated token


def test_the_cache_is_preallocated_and_decode_step_in_place_equals_the_pure_one():
    state = prefill(PARAMS, [[1, 2, 3], [4]], CONFIG, capacity=12)
    buffers = [k.data_ptr() for k in state.cache.keys]
    pure = in_place = state
    for token in ([5, 6], [7, 8], [9, 10]):
        token = torch.tensor(token)
        pure = decode_step(PARAMS, pure, token, CONFIG)
        in_place = decode_step_(PARAMS, in_place, token, CONFIG)
        torch.testing.assert_close(pure.logits, in_place.logits, atol=0, rtol=0)
    # No torch.cat, no new buffers: every step wrote into the prefill's tensors.
    assert [k.data_ptr() for k in in_place.cache.keys] == buffers
    assert in_place.cache.capacity == 12 and in_place.cache.lengths.tolist() == [6, 6]
    assert in_place.tokens[1].tolist() == [PAD, PAD, 4, 6, 8, 10]


def test_a_step_attends_over_the_filled_slots_whatever_the_capacity():
    widths = []

    def record(pattern):
        widths.append(pattern.shape[-1])
        return pattern

    states = [prefill(PARAMS, [[1, 2, 3], [4]], CONFIG, capacity=c) for c in (4, 16)]
    for token in ([5, 6], [7, 8], [9, 10]):
        token = torch.tensor(token)
        states = [decode_step_(PARAMS, s, token, CONFIG) for s in states]
        # The same keys in the same slots: a larger buffer changes nothing, not even a bit.
        torch.testing.assert_close(states[0].logits, states[1].logits, atol=0, rtol=0)
        widths.clear()
        decode_step(PARAMS, states[1], token, CONFIG, hooks={"h.0.attn.pattern": record})
        # Keys are read up to the longest row's new token: a slice of the 16-slot buffer.
        assert widths == [int(states[1].cache.lengths.max()) + 1]
    # The 4-slot cache ran out of room and grew to the next bucket (block_size caps it).
    assert [s.cache.capacity for s in states] == [16, 16]


def test_a_grown_cache_keeps_its_slots_and_refuses_to_shrink():
    state = prefill(PARAMS, [[1, 2, 3], [4]], CONFIG, capacity=3)
    grown = state.cache.grown(8)
    buffers = zip(state.cache.keys + state.cache.values, grown.keys + grown.values, strict=True)
    for old, new in buffers:
        assert torch.equal(new[:, :, :3], old) and not new[:, :, 3:].any()
    assert torch.equal(grown.lengths, state.cache.lengths)
    with pytest.raises(ValueError, match="capacity must be .*>= 3"):
        state.cache.grown(2)


def test_num_samples_prefill_once_and_sample_like_the_repeated_batch(monkeypatch):
    from gpt_fn.sampling import decoding

    calls = []
    real = decoding.prefill_state
    monkeypatch.setattr(decoding, "prefill_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [[1, 2, 3], [9]]
    fanned = generate(PARAMS, rows, CONFIG, max_new_tokens=6, seed=5, num_samples=3)
    assert len(calls) == 1  # the prompts ran once, however many samples
    repeated = generate(
        PARAMS, [r for r in rows for _ in range(3)], CONFIG, max_new_tokens=6, seed=5
    )
    assert fanned == repeated
    assert len({tuple(r) for r in fanned[:3]}) > 1  # the samples of one prompt differ


class LetterTokenizer:
    """Token i decodes to one letter, so stop strings are easy to place across tokens."""

    n_vocab = 101  # the model's every id has a letter

    def decode_single_token_bytes(self, token: int) -> bytes:
        return bytes([ord("a") + token % 26])


def test_a_row_stops_when_its_text_contains_a_stop_string_across_tokens():
    rows = [[1, 2], [3]]
    free = generate(PARAMS, rows, CONFIG, max_new_tokens=10, greedy=True)
    text = "".join(chr(ord("a") + t % 26) for t in free[0][2:])
    stop = text[3:5]  # two letters made by two tokens: the stop spans a token boundary
    stopped = generate(
        PARAMS,
        rows,
        CONFIG,
        max_new_tokens=10,
        greedy=True,
        stop=[stop],
        tokenizer=LetterTokenizer(),
    )
    first = text.find(stop)
    assert stopped[0] == free[0][: 2 + first + len(stop)]  # cut right after the stop string
    other = "".join(chr(ord("a") + t % 26) for t in free[1][1:])
    if stop not in other:
        assert stopped[1] == free[1]  # the other row went on
    assert cut_at_stop("ROMEO:\nhi\n\nJULIET", ["\n\n", "THE END"]) == "ROMEO:\nhi\n\n"


def test_steering_during_cached_generation_equals_uncached_generation():
    steer = interventions.add_vector("h.0.resid_post", torch.linspace(-3, 3, CONFIG.n_embd))
    rows = [[1, 2, 3], [9, 8]]
    cached = generate(PARAMS, rows, CONFIG, max_new_tokens=20, greedy=True, hooks=steer)
    uncached = generate(
        PARAMS, rows, CONFIG, max_new_tokens=20, greedy=True, hooks=steer, use_cache=False
    )
    assert cached == uncached
    assert cached != generate(PARAMS, rows, CONFIG, max_new_tokens=20, greedy=True)


def test_the_cached_decode_step_compiles_once_for_every_step(plain_python):
    plain_python("""
import torch, gpt_fn
from gpt_fn import sampling
torch._dynamo.config.error_on_recompile = True
config = gpt_fn.GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)
params = gpt_fn.init_params(config, seed=0)
rows = [[1, 2, 3], [9]]
eager = sampling.generate(params, rows, config, max_new_tokens=12, greedy=True)
compiled = sampling.generate(params, rows, config, max_new_tokens=12, greedy=True, compile=True)
assert compiled == eager, (compiled, eager)
""")


def test_the_compiled_step_attends_the_filled_slots_and_compiles_once_per_batch_size(
    plain_python,
):
    # Dynamo's tracing and guards decide when a step recompiles, whatever the backend: a
    # backend that records each graph and runs it eagerly counts the same compilations as
    # inductor, without its code generation.
    plain_python("""
import torch, gpt_fn
from gpt_fn import sampling
graphs = []
def record(graph, example_inputs):
    graphs.append((graph, example_inputs))
    return graph.forward
compile = torch.compile
torch.compile = lambda fn, **options: compile(fn, **{**options, "backend": record})
config = gpt_fn.GPTConfig(vocab_size=101, block_size=256, n_layer=1, n_head=2, n_embd=16)
params = gpt_fn.init_params(config, seed=0)
rows = [[1, 2, 3], [9]]
options = dict(max_new_tokens=130, greedy=True)  # 3 + 129 slots: buckets of 64, 128, 256
eager = sampling.generate(params, rows, config, **options)
compiled = sampling.generate(params, rows, config, **options, compile=True)
assert compiled == eager, (compiled, eager)
# One graph for every length and capacity: the step is given the slots it attends (a view of
# the cache's buffers), their count symbolic; first the 3-token prompt and its next token's
# slot, not the 64-slot bucket. (Inductor adds one for a view of whole buffers: the next test.)
assert len(graphs) == 1, len(graphs)
graph, example_inputs = graphs[0]
slots = [
    node.meta["example_value"].shape[2]
    for node in graph.graph.nodes
    if node.op == "placeholder" and getattr(node.meta["example_value"], "ndim", 0) == 4
]
assert len(slots) == 2 and all(isinstance(n, torch.SymInt) for n in slots), slots
assert [t.shape[2] for t in example_inputs if getattr(t, "ndim", 0) == 4] == [4, 4]
# Eight more batch sizes: 9 compiled steps, past dynamo's default limit of 8.
for batch in range(3, 11):
    sampling.generate(params, [[5, 6, 7]] * batch, config, max_new_tokens=2, greedy=True, compile=True)
assert len(graphs) == 9, len(graphs)
""")


def test_the_inductor_step_compiles_twice_when_the_attended_slots_fill_the_cache(plain_python):
    # The attended slots are a view of part of the buffers until they fill them: inductor
    # compiles the non-contiguous view and the whole (contiguous) buffer apart, and no more.
    plain_python("""
import torch, gpt_fn
from torch._dynamo.utils import counters
from gpt_fn import sampling
config = gpt_fn.GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)
params = gpt_fn.init_params(config, seed=0)
rows = [[1, 2, 3], [9]]
options = dict(max_new_tokens=16, greedy=True)  # the 16-slot cache fills, then the crop
eager = sampling.generate(params, rows, config, **options)
compiled = sampling.generate(params, rows, config, **options, compile=True)
assert compiled == eager, (compiled, eager)
assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
""")


def test_bad_masks_and_too_small_caches_are_named():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with shape_checks(False):  # our own checks, as a user without the test-time hook meets them
        with pytest.raises(ValueError, match="attention_mask has shape \\(2, 2\\), the tokens"):
            gpt_fn.forward(
                PARAMS, tokens, CONFIG, attention_mask=torch.ones(2, 2, dtype=torch.long)
            )
        with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
            gpt_fn.forward(PARAMS, tokens, CONFIG, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
        gpt_fn.forward(PARAMS, tokens, CONFIG, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="only 0 \\(padding\\) and 1"):
        gpt_fn.forward(PARAMS, tokens, CONFIG, attention_mask=torch.full((2, 3), 2))
    right_padded = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="must pad on the left"):
        generate(PARAMS, tokens, CONFIG, attention_mask=right_padded, max_new_tokens=2, greedy=True)
    with pytest.raises(ValueError, match="need 3 cache slots per row, more than capacity=2"):
        prefill(PARAMS, tokens, CONFIG, capacity=2)
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        generate(PARAMS, [[1], []], CONFIG, max_new_tokens=2, greedy=True)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1.5, 2.0]], "row 0 holds torch.float32 values, not integer token ids"),
        ([[1, 2], [3, 4.0]], "row 1 holds torch.float32 values"),
        ([[True, False]], "row 0 holds torch.bool values"),
        ([[[1]]], "row 0 must be a flat list of token ids, got 2 levels of nesting"),
        ([1, 2], "row 0 must be a list of integer token ids, got int"),
        (["ab"], "row 0 must be a list of integer token ids, got str"),
        ([[1, "a"]], "row 0 is not a list of integer token ids"),
    ],
)
def test_token_lists_of_non_integers_or_wrong_nesting_are_refused_by_every_entry_point(
    rows, message
):
    entry_points = [
        lambda: gpt_fn.forward(PARAMS, rows, CONFIG),
        lambda: gpt_fn.loss(PARAMS, rows, rows, CONFIG),
        lambda: gpt_fn.run_with_cache(PARAMS, rows, CONFIG, names=["ln_f"]),
        lambda: token_scores(PARAMS, rows, CONFIG),
        lambda: generate(PARAMS, rows, CONFIG, max_new_tokens=1, greedy=True),
        lambda: beam_search(PARAMS, rows, CONFIG, 2, max_new_tokens=1),
        lambda: prefill(PARAMS, rows, CONFIG),
    ]
    with shape_checks(False):  # our own check, as a user without the test-time hook meets it
        for run in entry_points:
            with pytest.raises(ValueError, match=message):
                run()
    tokens, mask = pad([(1, 2), [3]], side="left")  # tuples are token lists too
    assert tokens.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[True, True], [False, True]]
