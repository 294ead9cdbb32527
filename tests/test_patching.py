"""Patching sweeps, attribution patching, path patching and gradients at sites: against the
plain hook loop, hand-written references and TransformerLens's `patching` module."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt_fn
from gpt_fn import hf
from gpt_fn import hooks as interventions
from gpt_fn.hooks import site_axes
from gpt_fn.patching import activation_patch, attribution_patch, path_patch, run_with_grads
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.usefixtures("one_thread")

# Patched runs stacked along the batch of one forward against one run each: the same sums,
# blocked differently by the GEMMs of another row count (a few fp32 ulps of logits of order
# 1); the bound.
ATOL = 1e-5
CONFIG = gpt_fn.GPTConfig(vocab_size=101, block_size=16, n_layer=3, n_head=3, n_embd=24)
HEAD_SITES = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z")


def sharp_params() -> gpt_fn.Params:
    """A random init whose attention depends on its input: `init_params`' small q/k weights
    give near-uniform patterns, under which patching q, k, scores or pattern moves the metric
    by only a few ATOL (a wrong head or position would pass)."""
    params = gpt_fn.init_params(CONFIG, seed=0)
    return {
        name: value * 8 if name.endswith("attn.c_attn.weight") else value
        for name, value in params.items()
    }


@pytest.fixture(scope="module")
def params():
    return sharp_params()


@pytest.fixture(scope="module")
def pair():
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=generator)
    corrupted = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=generator)
    return clean, corrupted


def logit_diff(logits):
    """The last position's logit of token 5 minus token 7, averaged over the batch."""
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def hook_loop(params, clean, corrupted, site, by):
    """The reference: one full forward of `corrupted` per component, `hooks.patch` from the
    clean cache."""
    names = [f"h.{i}.{site}" for i in range(CONFIG.n_layer)]
    _, cache = gpt_fn.run_with_cache(params, clean, CONFIG, names=names)
    head_axis, position_axis = site_axes(names[0])
    seq = cache[names[0]].shape[position_axis]
    n_head = None if head_axis is None else cache[names[0]].shape[head_axis]
    ranges = {
        "layer": [],
        "position": [range(seq)],
        "head": [range(n_head or 0)],
        "head_position": [range(seq), range(n_head or 0)],
    }[by]
    out = torch.zeros(CONFIG.n_layer, *(len(r) for r in ranges))
    for layer, name in enumerate(names):
        for index in itertools.product(*ranges):
            if by == "head_position":
                chosen = {"positions": [index[0]], "heads": [index[1]]}
            else:
                chosen = {"position": {"positions": list(index)}, "head": {"heads": list(index)}}
                chosen = chosen.get(by, {})
            hooks = interventions.patch(name, cache[name], **chosen)
            out[(layer, *index)] = logit_diff(
                gpt_fn.forward(params, corrupted, CONFIG, hooks=hooks)
            )
    return out


# Every kind of site and every sweep, each at least once (TransformerLens's tests below add
# the rest of its functions).
SWEEPS = [
    ("resid_pre", "layer"),
    ("resid_pre", "position"),
    ("attn.out", "position"),
    ("mlp.post", "layer"),
    ("attn.q", "head"),
    ("attn.k", "head_position"),
    ("attn.v", "position"),
    ("attn.scores", "head"),
    ("attn.pattern", "head_position"),
    ("attn.z", "head_position"),
    ("attn.result", "head"),
    ("ln_2.scale", "position"),
]


@pytest.mark.parametrize(("site", "by"), SWEEPS)
def test_activation_patch_equals_the_hook_loop(params, pair, site, by):
    clean, corrupted = pair
    with shape_checks(False):
        expected = hook_loop(params, clean, corrupted, site, by)
    # chunk=4 splits a layer's components into chunks of uneven sizes (6 and 18 are no multiple).
    got = activation_patch(params, clean, corrupted, CONFIG, logit_diff, site=site, by=by, chunk=4)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_chunk_size_changes_nothing_but_memory(params, pair):
    clean, corrupted = pair
    runs = [
        activation_patch(
            params, clean, corrupted, CONFIG, logit_diff, site="attn.z", by=by, chunk=c
        )
        for by in ("head_position",)
        for c in (1, 7, None)  # None: every run of a layer at once at this size
    ]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], atol=ATOL, rtol=0)


PARAMS = sharp_params()  # hypothesis tests take no fixtures


@settings(max_examples=12, deadline=None)
@given(
    sweep=st.sampled_from(SWEEPS),
    chunk=st.sampled_from([1, 5, None]),
    seed=st.integers(0, 2**16),
)
def test_patching_a_run_with_its_own_activations_changes_nothing(sweep, chunk, seed):
    site, by = sweep
    tokens = torch.randint(
        0, CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(seed)
    )
    base = logit_diff(gpt_fn.forward(PARAMS, tokens, CONFIG))
    with shape_checks(False):
        patched = activation_patch(
            PARAMS, tokens, tokens, CONFIG, logit_diff, site=site, by=by, chunk=chunk
        )
        estimate = attribution_patch(PARAMS, tokens, tokens, CONFIG, logit_diff, site=site, by=by)
    # Stacked runs against one, and (at attn.scores/pattern) attention computed explicitly
    # against the fused kernel: a few fp32 ulps.
    for got in (patched, estimate):
        torch.testing.assert_close(got, torch.full_like(got, float(base)), atol=ATOL, rtol=0)


# --- attribution patching and gradients at sites -------------------------------------------

# Per case: which axes of the product grad * (clean - corrupted) the result keeps, in order.
ATTRIBUTION = {
    ("resid_pre", "position"): (1,),
    ("mlp.out", "layer"): (),
    ("attn.z", "head"): (2,),
    ("attn.z", "head_position"): (1, 2),
    ("attn.q", "head"): (2,),
    ("attn.scores", "head_position"): (2, 1),  # query position, then head
}


@pytest.mark.parametrize(("site", "by"), list(ATTRIBUTION))
def test_attribution_patch_is_the_first_order_term_of_torch_func_grad(params, pair, site, by):
    clean, corrupted = pair
    names = [f"h.{i}.{site}" for i in range(CONFIG.n_layer)]
    _, clean_cache = gpt_fn.run_with_cache(params, clean, CONFIG, names=names)
    _, corrupt_cache = gpt_fn.run_with_cache(params, corrupted, CONFIG, names=names)

    def metric_of_deltas(deltas):
        added = {name: (lambda a, d=deltas[name]: a + d) for name in names}
        return logit_diff(gpt_fn.forward(params, corrupted, CONFIG, hooks=added))

    zeros = {name: torch.zeros_like(corrupt_cache[name]) for name in names}
    with shape_checks(False):
        grads = torch.func.grad(metric_of_deltas)(zeros)
        base = logit_diff(gpt_fn.forward(params, corrupted, CONFIG))
    kept = ATTRIBUTION[site, by]
    expected = []
    for name in names:
        change = clean_cache[name] - corrupt_cache[name]
        change = change.nan_to_num(nan=0.0)  # -inf - -inf at masked scores: nothing changes
        product = grads[name] * change
        summed = [axis for axis in range(product.ndim) if axis not in kept]
        total = product.sum(summed) if summed else product
        if kept == (2, 1):
            total = total.T
        expected.append(base + total)
    got = attribution_patch(params, clean, corrupted, CONFIG, logit_diff, site=site, by=by)
    # One backward either way, summed in another order: a few fp32 ulps.
    torch.testing.assert_close(got, torch.stack(expected), atol=ATOL, rtol=0)


def test_attribution_patch_tracks_activation_patch_near_the_corrupted_run(params, pair):
    # A clean run one token away from the corrupted one: small changes at most sites, where a
    # first-order estimate is close (not equal: the line is not straight).
    clean, corrupted = pair
    near = corrupted.clone()
    near[:, 2] = clean[:, 2]
    exact = activation_patch(params, near, corrupted, CONFIG, logit_diff, site="attn.z", by="head")
    estimate = attribution_patch(
        params, near, corrupted, CONFIG, logit_diff, site="attn.z", by="head"
    )
    base = logit_diff(gpt_fn.forward(params, corrupted, CONFIG))
    effect, estimated = exact - base, estimate - base
    assert effect.abs().max() > 1e-4  # the patch does something
    assert torch.corrcoef(torch.stack([effect.flatten(), estimated.flatten()]))[0, 1] > 0.9


def test_run_with_grads_equals_torch_func_grad_through_the_callers_hooks(params, pair):
    tokens = pair[0]
    hooks = {"h.1.attn.z": lambda z: 2 * z}  # runs first; the gradient sees it
    names = ["h.0.resid_post", "h.1.attn.z", "h.2.mlp.pre"]
    value, cache, grads = run_with_grads(
        params, tokens, CONFIG, logit_diff, names=names, hooks=hooks
    )
    _, plain_cache = gpt_fn.run_with_cache(params, tokens, CONFIG, names=names, hooks=hooks)

    def metric_of_delta(delta, name):
        added = interventions.merge(hooks, {name: lambda a: a + delta})
        return logit_diff(gpt_fn.forward(params, tokens, CONFIG, hooks=added))

    with shape_checks(False):
        for name in names:
            expected = torch.func.grad(metric_of_delta)(torch.zeros_like(cache[name]), name)
            torch.testing.assert_close(grads[name], expected, atol=ATOL, rtol=0)
            assert torch.equal(cache[name], plain_cache[name])
    assert not value.requires_grad and value == metric_of_delta(0.0, names[0])


# --- path patching -------------------------------------------------------------------------


def two_passes(params, clean, corrupted, senders, receivers):
    """Path patching as two hooked full forwards (the reference)."""
    z_names = [f"h.{i}.attn.z" for i in range(CONFIG.n_layer)]
    _, clean_z = gpt_fn.run_with_cache(params, clean, CONFIG, names=z_names)
    _, corrupt_z = gpt_fn.run_with_cache(params, corrupted, CONFIG, names=z_names)
    freeze = [interventions.patch(name, corrupt_z[name]) for name in z_names]
    send = [
        interventions.patch(f"h.{i}.attn.z", clean_z[f"h.{i}.attn.z"], heads=[h])
        for i, h in senders
    ]
    _, recorded = gpt_fn.run_with_cache(
        params, corrupted, CONFIG, names=list(receivers), hooks=interventions.merge(*freeze, *send)
    )
    receive = [
        interventions.patch(site, recorded[site], heads=heads) for site, heads in receivers.items()
    ]
    logits = gpt_fn.forward(params, corrupted, CONFIG, hooks=interventions.merge(*receive))
    return logit_diff(logits)


PATHS = [
    ([(0, 1), (0, 2)], {"h.1.attn.q": [0], "h.2.attn.k": [1, 2]}),
    ([(0, 0), (1, 2)], {"h.2.attn.v": [0], "h.2.resid_mid": None}),
    ([(1, 0)], {"ln_f": None}),
]


@pytest.mark.parametrize(("senders", "receivers"), PATHS)
def test_path_patch_equals_two_hooked_passes(params, pair, senders, receivers):
    clean, corrupted = pair
    with shape_checks(False):
        expected = two_passes(params, clean, corrupted, senders, receivers)
    got = path_patch(
        params, clean, corrupted, CONFIG, logit_diff, senders=senders, receivers=receivers
    )
    # The same computation from a cached prefix instead of from the embedding: bit for bit
    # but for the grouping of ops in the stacked freeze (a few ulps at most).
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_path_patch_into_the_next_residual_stream_is_activation_patching(params, pair):
    # Every head of block 0 sending to everything after it: the same as patching block 0's
    # head outputs outright.
    clean, corrupted = pair
    senders = [(0, head) for head in range(CONFIG.n_head)]
    path = path_patch(
        params, clean, corrupted, CONFIG, logit_diff, senders=senders,
        receivers={"h.1.resid_pre": None},
    )  # fmt: skip
    patched = activation_patch(params, clean, corrupted, CONFIG, logit_diff, site="attn.z")
    torch.testing.assert_close(path, patched[0], atol=ATOL, rtol=0)


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_is_named_in_one_line(params, pair):
    clean, corrupted = pair
    args = (params, clean, corrupted, CONFIG, logit_diff)
    with pytest.raises(
        ValueError, match="site must name a site of every block .* got 'h.1.attn.z'"
    ):
        activation_patch(*args, site="h.1.attn.z")
    with pytest.raises(
        ValueError, match="by= needs a site with a head axis|by='head' needs a site"
    ):
        activation_patch(*args, site="resid_pre", by="head")
    with (
        shape_checks(False),
        pytest.raises(ValueError, match="unknown by= sweep .neuron.; choose one of .layer."),
    ):
        attribution_patch(*args, site="resid_pre", by="neuron")  # the annotation's Literal
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        activation_patch(*args, site="resid_pre", chunk=0)
    # (the shape checker, when on, names the mismatch first: `batch seq` twice)
    with (
        shape_checks(False),
        pytest.raises(ValueError, match="clean has shape \\(2, 6\\) but corrupted \\(2, 5\\)"),
    ):
        activation_patch(params, clean, corrupted[:, :5], CONFIG, logit_diff, site="resid_pre")
    per_row = lambda logits: logits[:, -1, 5]  # noqa: E731
    for call in (
        lambda: activation_patch(params, clean, corrupted, CONFIG, per_row, site="resid_pre"),
        lambda: attribution_patch(params, clean, corrupted, CONFIG, per_row, site="resid_pre"),
        lambda: run_with_grads(params, clean, CONFIG, per_row, names=["h.0.resid_pre"]),
    ):
        with pytest.raises(ValueError, match="metric must return a scalar .* got \\(2,\\)"):
            call()
    with pytest.raises(ValueError, match="unknown activation site 'h.0.attn.zz'"):
        run_with_grads(params, clean, CONFIG, logit_diff, names=["h.0.attn.zz"])
    with shape_checks(False), pytest.raises(TypeError, match="metric must be a function of"):
        activation_patch(params, clean, corrupted, CONFIG, 3, site="resid_pre")
    paths = {"senders": [(1, 0)], "receivers": {"h.2.attn.q": [0]}}
    for bad, message in (
        ({"senders": [(3, 0)]}, "sender layer 3 is outside the model's 3"),
        ({"senders": [(0, 3)]}, "sender head 3 is outside the model's 3"),
        ({"senders": [1]}, "each sender must be a \\(layer, head\\) pair"),
        ({"receivers": {"h.1.attn.q": [0]}}, "receiver 'h.1.attn.q' is not after the last"),
        ({"receivers": {"h.2.attn.z": [0]}}, "receiver 'h.2.attn.z': head outputs are frozen"),
        ({"receivers": {"pos_embed": None}}, "receiver 'pos_embed' is not after the last"),
        ({"receivers": {"h.2.resid_pre": [0]}}, "receiver 'h.2.resid_pre' has no head axis"),
        ({"receivers": {"h.2.attn.qq": None}}, "unknown activation site 'h.2.attn.qq'"),
    ):
        with shape_checks(False), pytest.raises(ValueError, match=message):
            path_patch(*args, **{**paths, **bad})


# --- against TransformerLens ---------------------------------------------------------------

# TransformerLens's function, our site and sweep (every head site in its axis order).
TRANSFORMER_LENS = {
    "get_act_patch_resid_pre": ("resid_pre", "position"),
    "get_act_patch_resid_mid": ("resid_mid", "position"),
    "get_act_patch_attn_out": ("attn.out", "position"),
    "get_act_patch_mlp_out": ("mlp.out", "position"),
    "get_act_patch_attn_head_out_all_pos": ("attn.z", "head"),
    "get_act_patch_attn_head_out_by_pos": ("attn.z", "head_position"),
    "get_act_patch_attn_head_q_all_pos": ("attn.q", "head"),
    "get_act_patch_attn_head_q_by_pos": ("attn.q", "head_position"),
    "get_act_patch_attn_head_k_all_pos": ("attn.k", "head"),
    "get_act_patch_attn_head_k_by_pos": ("attn.k", "head_position"),
    "get_act_patch_attn_head_v_all_pos": ("attn.v", "head"),
    "get_act_patch_attn_head_v_by_pos": ("attn.v", "head_position"),
    "get_act_patch_attn_head_pattern_all_pos": ("attn.pattern", "head"),
    "get_act_patch_attn_head_pattern_by_pos": ("attn.pattern", "head_position"),
}


@pytest.fixture(scope="module")
def lens(tmp_path_factory, transformer_lens_bridge):
    """Our params and a TransformerLens bridge of the same random GPT-2-shaped weights (as in
    test_transformer_lens.py, at a tiny size: 3 layers, 3 heads, 24 wide)."""
    pytest.importorskip("transformer_lens")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2-tiny")
    shape = {"vocab_size": 101, "n_positions": 16, "n_embd": 24, "n_layer": 3, "n_head": 3}
    GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(directory)
    params, config = hf.load(directory)
    return params, config, transformer_lens_bridge(directory, no_processing=True)


@pytest.mark.parametrize("function", list(TRANSFORMER_LENS))
def test_activation_patch_equals_transformer_lens(lens, pair, function, monkeypatch):
    from transformer_lens import patching

    monkeypatch.setenv("TQDM_DISABLE", "1")  # its progress bar, once per patched run
    params, config, bridge = lens
    clean, corrupted = pair
    site, by = TRANSFORMER_LENS[function]
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        theirs = getattr(patching, function)(bridge, corrupted, clean_cache, logit_diff)
    ours = activation_patch(params, clean, corrupted, config, logit_diff, site=site, by=by)
    if site == "attn.pattern" and by == "head_position":
        ours = ours.transpose(1, 2)  # theirs: (layer, head, query position)
    # Both compute GPT-2 in fp32 with different kernel groupings (test_transformer_lens.py:
    # activations within 3e-6 at GPT-2 small's size); the bound.
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_run_with_grads_equals_transformer_lens_backward_hooks(lens, pair):
    params, config, bridge = lens
    tokens = pair[0]
    their_loss, theirs = bridge.run_with_cache(tokens, return_type="loss", incl_bwd=True)

    def next_token_loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    matching = {  # our site, their hook (the same axis order)
        "resid_pre": "hook_resid_pre",
        "attn.q": "attn.hook_q",
        "attn.v": "attn.hook_v",
        "attn.pattern": "attn.hook_pattern",
        "attn.z": "attn.hook_z",
        "attn.out": "hook_attn_out",
        "mlp.post": "mlp.hook_post",
        "resid_post": "hook_resid_post",
    }
    names = [f"h.{i}.{site}" for i in range(config.n_layer) for site in matching]
    value, cache, grads = run_with_grads(params, tokens, config, next_token_loss, names=names)
    torch.testing.assert_close(value, their_loss.detach(), atol=ATOL, rtol=0)
    for i in range(config.n_layer):
        for site, hook in matching.items():
            name = f"h.{i}.{site}"
            activation, grad = theirs[f"blocks.{i}.{hook}"], theirs[f"blocks.{i}.{hook}_grad"]
            # Both compute GPT-2 in fp32 with different kernel groupings; the bound
            # (gradients here are of order 1e-2, activations of order 1).
            torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=0, msg=name)
            torch.testing.assert_close(cache[name], activation, atol=ATOL, rtol=0, msg=name)
