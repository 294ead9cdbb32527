"""Readouts on caches and weight processing: each against TransformerLens's own function on the
same weights, the identities they rest on, and their errors.

TransformerLens side: `TransformerBridge` in compatibility mode over our params saved as an HF
GPT-2 (`hf.save`; 2 layers, 64 wide, 4 heads), random weights with LayerNorm gains and all
biases moved away from 1/0, so every fold and bias term counts. Tolerance 1e-5 (as
`test_transformer_lens.py`): the same fp32 math summed in other groupings; logits of order 10
get 1e-4 where noted.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn import GPTConfig, analysis, hf
from gpt_fn.model import forward, init_params, run_with_cache
from gpt_fn.shapes import shape_checks

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
# Odd head count and width, as conftest's tiny_config (hypothesis tests take no fixtures).
TINY = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)


def perturbed(params):
    """Nonzero biases and LayerNorm gains away from 1, so each fold and bias term is tested."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, value in params.items():
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
            value = value + 0.2 * torch.randn(value.shape, generator=g)
        out[name] = value
    return out


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A small GPT-2 saved for TransformerLens, its tokens and our full cache."""
    config = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=4, n_embd=64)
    params = perturbed(init_params(config, seed=0))
    directory = tmp_path_factory.mktemp("gpt2")
    hf.save(params, config, directory)
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = run_with_cache(params, tokens, config)
    return directory, params, config, tokens, logits, cache


@pytest.fixture(scope="module")
def bridge(transformer_lens_bridge):
    def boot(directory, **processing):
        model = transformer_lens_bridge(directory, disable_warnings=True, **processing)
        model.set_use_attn_result(True)
        return model

    return boot


@pytest.fixture(scope="module")
def tl(gpt2, bridge):
    directory, *_, tokens, _, _ = gpt2
    model = bridge(directory, no_processing=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, cache


@pytest.fixture(scope="module")
def tl_processed(gpt2, bridge):
    """TransformerLens with its default processing: fold_ln, center_writing_weights,
    center_unembed, fold_value_biases."""
    directory, *_, tokens, _, _ = gpt2
    model = bridge(directory)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, cache


# --- against TransformerLens -----------------------------------------------------------------


@pytest.mark.parametrize("layer", [None, 0, 1])
@pytest.mark.parametrize("incl_mid", [False, True])
@pytest.mark.parametrize("pos", [None, -1, slice(2, 5)])
def test_accumulated_resid_equals_transformer_lens(gpt2, tl, layer, incl_mid, pos):
    _, _, config, _, _, cache = gpt2
    stack, labels = analysis.accumulated_resid(
        cache, config, layer=layer, incl_mid=incl_mid, pos=pos
    )
    theirs, their_labels = tl[1].accumulated_resid(
        layer=layer, incl_mid=incl_mid, pos_slice=pos, return_labels=True
    )
    assert labels == their_labels
    torch.testing.assert_close(stack, theirs, atol=ATOL, rtol=0)
    if layer is not None:  # before the last block TransformerLens uses the frozen scale too
        normed, _ = analysis.accumulated_resid(
            cache, config, layer=layer, incl_mid=incl_mid, pos=pos, apply_ln=True
        )
        theirs = tl[1].accumulated_resid(
            layer=layer, incl_mid=incl_mid, pos_slice=pos, apply_ln=True
        )
        torch.testing.assert_close(normed, theirs, atol=ATOL, rtol=0)


def test_the_final_layer_norm_recomputed_equals_transformer_lens(gpt2, tl):
    _, params, config, _, _, cache = gpt2
    # TransformerLens recomputes the final LayerNorm, gain and bias included.
    normed, _ = analysis.accumulated_resid(cache, config, apply_ln=True, ln="recompute")
    theirs = tl[1].accumulated_resid(apply_ln=True)
    torch.testing.assert_close(
        normed * params["ln_f.weight"] + params["ln_f.bias"], theirs, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("mode", ["all", "attn", "mlp"])
@pytest.mark.parametrize("layer", [None, 1])
def test_decompose_resid_equals_transformer_lens(gpt2, tl, mode, layer):
    _, _, config, _, _, cache = gpt2
    stack, labels = analysis.decompose_resid(
        cache, config, layer=layer, mode=mode, embeds="split", apply_ln=True, pos=-1
    )
    theirs, their_labels = tl[1].decompose_resid(
        layer=layer, mode=mode, apply_ln=True, pos_slice=-1, return_labels=True
    )
    assert ["tok_embed", *labels[1:]] == ["tok_embed", *their_labels[1:]]
    assert labels[:2] == ["tok_embed", "pos_embed"] and their_labels[:2] == ["embed", "pos_embed"]
    torch.testing.assert_close(stack, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [None, 1])
def test_head_results_equal_transformer_lens(gpt2, tl, layer):
    _, params, config, _, _, cache = gpt2
    from_z = {k: v for k, v in cache.items() if not k.endswith("attn.result")}
    for i in range(config.n_layer):
        computed = analysis.head_results(params, from_z, config, layer=i)
        torch.testing.assert_close(computed, cache[f"h.{i}.attn.result"], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            computed, tl[1][f"blocks.{i}.attn.hook_result"], atol=ATOL, rtol=0
        )
    stack, labels = analysis.stack_head_results(
        params, from_z, config, layer=layer, incl_remainder=True, apply_ln=True, pos=slice(1, 4)
    )
    theirs, their_labels = tl[1].stack_head_results(
        layer=-1 if layer is None else layer,
        incl_remainder=True,
        apply_ln=True,
        pos_slice=slice(1, 4),
        return_labels=True,
    )
    assert labels == their_labels and labels[-1] == "remainder"
    torch.testing.assert_close(stack, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "at, layer, mlp_input",
    [("h.1.ln_1", 1, False), ("h.0.ln_1", 0, False), ("h.1.ln_2", 1, True), ("ln_f", None, False)],
)
def test_apply_ln_to_stack_frozen_equals_transformer_lens(gpt2, tl, at, layer, mlp_input):
    _, _, config, _, _, cache = gpt2
    stack, _ = analysis.decompose_resid(cache, config, pos=slice(0, 6))
    ours = analysis.apply_ln_to_stack(stack, cache, config, at=at, pos=slice(0, 6))
    theirs = tl[1].apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=slice(0, 6))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_logit_lens_recomputed_equals_transformer_lens(gpt2, tl):
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    _, params, config, _, logits, cache = gpt2
    ours, labels = analysis.logit_lens(params, cache, config, ln="recompute", incl_mid=True)
    theirs = logit_lens(tl[1], incl_mid=True, positions=None)
    assert labels == theirs.labels
    # Logits of order 10 from a 64-wide dot product: a few fp32 ulps of the sum.
    torch.testing.assert_close(ours, theirs.readout.values, atol=1e-4, rtol=0)


def processed(params, config):
    """Our four processing steps in TransformerLens's order."""
    folded = analysis.fold_layer_norm(params, config)
    centred = analysis.center_unembed(analysis.center_writing_weights(folded, config), config)
    return analysis.fold_value_biases(centred, config)


def test_logit_attrs_equal_transformer_lens_on_processed_weights(gpt2, tl_processed):
    # Their processing folds ln_f's gain into an untied, centred unembedding; ours applies the
    # gain in logit_attrs and centres the tied head with center_unembed.
    _, params, config, tokens, _, cache = gpt2
    answer, wrong = tokens[:, -1], tokens[:, 0]
    stack, _ = analysis.decompose_resid(cache, config, embeds="split", pos=-1)
    normed = analysis.apply_ln_to_stack(stack, cache, config, pos=-1)
    their_stack = tl_processed[1].decompose_resid(pos_slice=-1)
    difference = analysis.logit_attrs(params, normed, answer, config, incorrect=wrong)
    theirs = tl_processed[1].logit_attrs(their_stack, answer, wrong, pos_slice=-1)
    torch.testing.assert_close(difference, theirs, atol=ATOL, rtol=0)
    single = analysis.logit_attrs(processed(params, config), normed, answer, config)
    their_single = tl_processed[1].logit_attrs(their_stack, answer, pos_slice=-1)
    torch.testing.assert_close(single, their_single, atol=ATOL, rtol=0)


@pytest.mark.parametrize("by", ["component", "head", "layer"])
def test_direct_logit_attribution_equals_transformer_lens(gpt2, tl_processed, by):
    from transformer_lens.tools.analysis.direct_logit_attribution import (
        direct_logit_attribution,
    )

    # Processed params, so that each head's value bias sits in c_proj's bias as in theirs.
    _, params, config, tokens, _, _ = gpt2
    params = processed(params, config)
    with torch.no_grad():
        _, cache = run_with_cache(params, tokens, config)
    answer, wrong = tokens[:, -1], tokens[:, 0]
    for incorrect in (wrong, None):
        ours, labels = analysis.direct_logit_attribution(
            params, cache, answer, config, by=by, incorrect=incorrect
        )
        theirs = direct_logit_attribution(
            tl_processed[0],
            answer_tokens=answer,
            incorrect_tokens=incorrect,
            unit=by,
            cache=tl_processed[1],
        )
        ours, labels = ours[:-1], labels[:-1]  # their processing folds ln_f's bias into b_U
        if by == "component":  # their "embed" and "pos_embed" are our one "embed"
            theirs_rows = torch.cat(
                [theirs.attribution[:2].sum(0, keepdim=True), theirs.attribution[2:]]
            )
            assert labels == ["embed", *theirs.labels[2:]]
        else:
            theirs_rows = theirs.attribution
            assert labels == theirs.labels
        torch.testing.assert_close(ours, theirs_rows, atol=ATOL, rtol=0)


def test_processed_params_give_transformer_lens_processed_activations(gpt2, tl_processed):
    _, params, config, tokens, _, _ = gpt2
    with torch.no_grad():
        logits, ours = run_with_cache(processed(params, config), tokens, config)
    theirs = tl_processed[1]
    for i in range(config.n_layer):
        for site, hook in [
            ("ln_1", "ln1.hook_normalized"),
            ("ln_2", "ln2.hook_normalized"),
            ("attn.q", "attn.hook_q"),
            ("attn.v", "attn.hook_v"),
            ("attn.z", "attn.hook_z"),
            ("attn.result", "attn.hook_result"),
            ("attn.out", "hook_attn_out"),
            ("mlp.pre", "mlp.hook_pre"),
            ("mlp.out", "hook_mlp_out"),
        ]:
            torch.testing.assert_close(
                ours[f"h.{i}.{site}"], theirs[f"blocks.{i}.{hook}"], atol=ATOL, rtol=0
            )
        # Their W_E is centred as well (untied head): our stream minus its mean is theirs.
        resid = ours[f"h.{i}.resid_post"]
        torch.testing.assert_close(
            resid - resid.mean(-1, keepdim=True),
            theirs[f"blocks.{i}.hook_resid_post"],
            atol=ATOL,
            rtol=0,
        )
    # Both heads centred over the vocabulary and holding ln_f's gain: the same logits.
    with torch.no_grad():
        their_logits = tl_processed[0](tokens)
    torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=0)


# --- identities ------------------------------------------------------------------------------


def small_run(seed):
    params = perturbed(init_params(TINY, seed=seed))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (2, 7), generator=g)
    logits, cache = run_with_cache(params, tokens, TINY)
    return params, tokens, logits, cache


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), layer=st.integers(0, 2))
def test_the_decomposition_and_the_head_stack_sum_to_the_residual_stream(seed, layer):
    params, _, _, cache = small_run(seed)
    stream = cache["h.1.resid_post"] if layer == 2 else cache[f"h.{layer}.resid_pre"]
    if layer > 0:
        parts, _ = analysis.decompose_resid(cache, TINY, layer=layer, embeds="split")
        torch.testing.assert_close(parts.sum(0), stream, atol=ATOL, rtol=0)
    heads, _ = analysis.stack_head_results(params, cache, TINY, layer=layer, incl_remainder=True)
    torch.testing.assert_close(heads.sum(0), stream, atol=ATOL, rtol=0)
    if layer > 0:  # a block's heads plus its c_proj bias are its attention output
        out = analysis.head_results(params, cache, TINY, layer=layer - 1).sum(2)
        bias = params[f"h.{layer - 1}.attn.c_proj.bias"]
        torch.testing.assert_close(out + bias, cache[f"h.{layer - 1}.attn.out"], atol=ATOL, rtol=0)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), by=st.sampled_from(["component", "head"]))
def test_direct_logit_attribution_sums_to_the_logit_difference(seed, by):
    params, tokens, logits, cache = small_run(seed)
    answer, wrong = tokens[:, 0], tokens[:, 1]
    attrs, labels = analysis.direct_logit_attribution(
        params, cache, answer, TINY, by=by, incorrect=wrong
    )
    assert labels[-1] == "ln_f.bias" and attrs.shape == (len(labels), 2)
    last = logits[:, -1]
    difference = last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])
    # Logits of order 1-10 summed from ~10-20 rows in another order than the model: fp32 ulps.
    torch.testing.assert_close(attrs.sum(0), difference[:, 0], atol=1e-4, rtol=0)
    single, _ = analysis.direct_logit_attribution(params, cache, answer, TINY, by=by)
    torch.testing.assert_close(
        single.sum(0), last.gather(1, answer[:, None])[:, 0], atol=1e-4, rtol=0
    )


def test_attribution_by_layer_plus_the_bias_is_the_frozen_logit_lens():
    params, tokens, _, cache = small_run(5)
    answer, wrong = tokens[:, 0], tokens[:, 1]
    attrs, labels = analysis.direct_logit_attribution(
        params, cache, answer, TINY, by="layer", incorrect=wrong
    )
    lens, lens_labels = analysis.logit_lens(params, cache, TINY, incl_mid=True, pos=-1)
    assert labels == [*lens_labels, "ln_f.bias"]
    difference = lens[:, [0, 1], answer] - lens[:, [0, 1], wrong]
    # Logits of order 1-10 summed in another order than the lens: fp32 ulps.
    torch.testing.assert_close(attrs[:-1] + attrs[-1], difference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ln", ["frozen", "recompute"])
def test_the_logit_lens_last_row_is_the_models_logits(ln):
    params, _, logits, cache = small_run(0)
    lens, labels = analysis.logit_lens(params, cache, TINY, ln=ln)
    assert labels == ["0_pre", "1_pre", "final_post"] and lens.shape == (3, *logits.shape)
    torch.testing.assert_close(lens[-1], logits, atol=ATOL, rtol=0)
    at_last, _ = analysis.logit_lens(params, cache, TINY, ln=ln, pos=-1)
    torch.testing.assert_close(at_last, lens[:, :, -1], atol=ATOL, rtol=0)


def test_frozen_and_recomputed_layer_norms_differ_before_the_last_layer():
    params, _, _, cache = small_run(0)
    frozen, _ = analysis.logit_lens(params, cache, TINY, ln="frozen")
    recomputed, _ = analysis.logit_lens(params, cache, TINY, ln="recompute")
    assert not torch.allclose(frozen[0], recomputed[0], atol=1e-3)
    # Frozen: the first stream divided by the final stream's scale, by hand.
    x = cache["h.0.resid_pre"]
    hidden = (x - x.mean(-1, keepdim=True)) / cache["ln_f.scale"] * params["ln_f.weight"]
    expected = (hidden + params["ln_f.bias"]) @ params["wte.weight"].T
    torch.testing.assert_close(frozen[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "process",
    [
        analysis.fold_layer_norm,
        analysis.center_writing_weights,
        analysis.center_unembed,
        analysis.fold_value_biases,
        processed,
    ],
    ids=["fold_layer_norm", "center_writing_weights", "center_unembed", "fold_value_biases", "all"],
)
def test_processed_params_give_the_same_log_probs(process):
    params, tokens, logits, _ = small_run(3)
    changed = process(params, TINY)
    assert set(changed) == set(params) and changed is not params
    after = forward(changed, tokens, TINY)
    torch.testing.assert_close(after.log_softmax(-1), logits.log_softmax(-1), atol=ATOL, rtol=0)
    shift = after - logits  # one constant per position (0 but for center_unembed)
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), atol=ATOL, rtol=0)


def test_folding_leaves_unit_gains_zero_biases_and_centred_writes():
    params, _, _, _ = small_run(4)
    folded = analysis.fold_layer_norm(params, TINY)
    centred = analysis.center_writing_weights(params, TINY)
    values = analysis.fold_value_biases(params, TINY)
    d = TINY.n_embd
    for i in range(TINY.n_layer):
        for norm in ("ln_1", "ln_2"):
            assert torch.equal(folded[f"h.{i}.{norm}.weight"], torch.ones(d))
            assert torch.equal(folded[f"h.{i}.{norm}.bias"], torch.zeros(d))
        assert bool((folded[f"h.{i}.attn.c_attn.weight"].mean(1).abs() < 1e-6).all())
        assert bool((centred[f"h.{i}.mlp.c_proj.weight"].mean(0).abs() < 1e-6).all())
        assert torch.equal(values[f"h.{i}.attn.c_attn.bias"][2 * d :], torch.zeros(d))
    assert torch.equal(folded["ln_f.weight"], params["ln_f.weight"])  # tied head: left alone
    assert torch.equal(centred["wte.weight"], params["wte.weight"])
    assert params["h.0.ln_1.weight"].ne(1).any()  # the inputs are untouched


# --- errors ----------------------------------------------------------------------------------


def test_a_missing_site_is_named_with_how_to_record_it():
    params, tokens, _, _ = small_run(0)
    _, partial = run_with_cache(params, tokens, TINY, names=["h.0.resid_pre"])
    with pytest.raises(ValueError, match=r"needs 'h.1.resid_pre'.*names=\['h.1.resid_pre'"):
        analysis.accumulated_resid(partial, TINY)
    with pytest.raises(ValueError, match=r"needs 'h.0.attn.z' \(or 'h.0.attn.result'\)"):
        analysis.head_results(params, partial, TINY, layer=0)
    stack, _ = analysis.accumulated_resid(partial, TINY, layer=0)
    with pytest.raises(ValueError, match=r"apply_ln_to_stack\(ln='frozen'\) needs 'ln_f.scale'"):
        analysis.apply_ln_to_stack(stack, partial, TINY)


def test_bad_arguments_get_one_clear_error():
    params, tokens, _, cache = small_run(0)
    with pytest.raises(ValueError, match="layer must be an int in 0..2"):
        analysis.accumulated_resid(cache, TINY, layer=3)
    with pytest.raises(ValueError, match="unknown LayerNorm 'h.0.ln_3'"):
        analysis.apply_ln_to_stack(cache["embed"][None], cache, TINY, at="h.0.ln_3")
    with shape_checks(False), pytest.raises(ValueError, match="unknown ln 'frozn'; choose one"):
        analysis.logit_lens(params, cache, TINY, ln="frozn")  # without beartype, our own check
    with pytest.raises(ValueError, match="pos 9 is outside the 7 positions"):
        analysis.decompose_resid(cache, TINY, pos=9)
    stack, _ = analysis.decompose_resid(cache, TINY, pos=-1)
    with pytest.raises(ValueError, match="pass the pos= the stack was cut with"):
        analysis.apply_ln_to_stack(stack, cache, TINY)
    normed = analysis.apply_ln_to_stack(stack, cache, TINY, pos=-1)
    with shape_checks(False), pytest.raises(ValueError, match=r"tokens has shape \(2, 7\); the"):
        analysis.logit_attrs(params, normed, tokens, TINY)  # beartype names it too, differently
    with pytest.raises(ValueError, match="incorrect: token id"):
        analysis.logit_attrs(params, normed, tokens[:, 0], TINY, incorrect=tokens[:, 0] + 500)
