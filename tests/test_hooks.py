"""Activation sites and hooks: names, errors, exactness, the cache's identities, interventions,
and composition with grad, vmap and compile."""

import pytest
import torch
import torch.nn.functional as F

import gpt_fn
from gpt_fn import hooks as interventions
from gpt_fn import optim
from gpt_fn.model import forward, init_params, loss, run_with_cache
from gpt_fn.shapes import shape_checks
from gpt_fn.sites import BLOCK_SITES, EXPLICIT_ATTENTION_SITES, ON_REQUEST_SITES, site_names

pytestmark = pytest.mark.usefixtures("one_thread")

# Sums of the same terms in another grouping (an explicit softmax instead of the fused kernel,
# a batched matmul under vmap): a few fp32 ulps of activations of order 1-10.
ATOL = 1e-5


@pytest.fixture
def params(tiny_config):
    return init_params(tiny_config, seed=0)


@pytest.fixture
def tokens(tiny_config):
    return torch.randint(
        0, tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3)
    )


def identity(x):
    return x


# --- names and errors ----------------------------------------------------------------------


def test_every_site_of_a_config_is_listed_in_forward_order(tiny_config):
    sites = site_names(tiny_config)
    assert sites[:3] == ("tok_embed", "pos_embed", "embed")
    assert sites[-3:] == ("ln_f.scale", "ln_f", "logits")
    assert len(sites) == 6 + tiny_config.n_layer * len(BLOCK_SITES)
    assert sites[3:7] == ("h.0.resid_pre", "h.0.ln_1.scale", "h.0.ln_1", "h.0.attn.q")
    assert "h.1.mlp.post" in sites and "h.1.attn.result" in sites
    assert "h.2.resid_pre" not in sites


def test_unknown_sites_bad_hooks_and_wrong_shapes_are_named(params, tokens, tiny_config):
    with pytest.raises(ValueError, match="unknown activation site 'h.0.attn.zz'"):
        forward(params, tokens, tiny_config, hooks={"h.0.attn.zz": identity})
    with pytest.raises(ValueError, match="unknown activation site 'h.2.resid_pre'"):
        forward(params, tokens, tiny_config, hooks={"h.2.resid_pre": identity})
    with shape_checks(False):
        with pytest.raises(TypeError, match="hook at 'h.0.ln_1' is not callable"):
            forward(params, tokens, tiny_config, hooks={"h.0.ln_1": 3})
        with pytest.raises(TypeError, match="hooks must be a mapping"):
            forward(params, tokens, tiny_config, hooks=[identity])
    with pytest.raises(ValueError, match="hook at 'h.1.attn.z' returned shape \\(2, 9, 24\\)"):
        forward(params, tokens, tiny_config, hooks={"h.1.attn.z": lambda z: z.flatten(2)})
    with pytest.raises(TypeError, match="hook at 'h.0.mlp.pre' returned a NoneType"):
        forward(params, tokens, tiny_config, hooks={"h.0.mlp.pre": lambda x: None})


@pytest.mark.parametrize(
    ("hook", "pattern"),
    [
        (lambda x: x.double(), "returned dtype torch.float64; it must keep the activation's "
         "torch.float32"),
        (lambda x: x.long(), "returned dtype torch.int64"),
        (lambda x: torch.empty_like(x, device="meta"), "returned a tensor on meta; it must stay "
         "on the activation's device, cpu"),
    ],
)  # fmt: skip
def test_a_hook_that_changes_the_dtype_or_device_is_named(params, tokens, tiny_config, hook,
                                                           pattern):  # fmt: skip
    with pytest.raises(TypeError, match=f"the hook at 'h.1.resid_mid' {pattern}"):
        forward(params, tokens, tiny_config, hooks={"h.1.resid_mid": hook})


# --- exactness and the cache's identities ------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_identity_hooks_give_bit_identical_logits(params, tokens, tiny_config, attention):
    plain = forward(params, tokens, tiny_config, attention=attention)
    # The sites computed on request switch to an explicit path (attention, c_proj, LayerNorm).
    sites = [s for s in site_names(tiny_config) if not s.endswith(ON_REQUEST_SITES)]
    if attention == "manual":
        sites += [s for s in site_names(tiny_config) if s.endswith(EXPLICIT_ATTENTION_SITES)]
    hooked = forward(
        params, tokens, tiny_config, attention=attention, hooks=dict.fromkeys(sites, identity)
    )
    assert torch.equal(plain, hooked)
    _, cache = run_with_cache(params, tokens, tiny_config, attention=attention, names=sites)
    assert torch.equal(cache["logits"], plain)


def test_asking_for_the_pattern_of_one_layer_leaves_the_others_fused(params, tokens, tiny_config):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", counting)
        logits, cache = run_with_cache(params, tokens, tiny_config, names=["h.1.attn.pattern"])
    assert len(calls) == tiny_config.n_layer - 1  # layer 1 ran explicitly
    assert list(cache) == ["h.1.attn.pattern"]  # only what was asked for is kept
    torch.testing.assert_close(logits, forward(params, tokens, tiny_config), atol=ATOL, rtol=0)


def test_the_cache_is_self_consistent(params, tokens, tiny_config):
    _, c = run_with_cache(params, tokens, tiny_config)
    d = tiny_config.n_embd
    positions = torch.arange(tokens.shape[1])
    torch.testing.assert_close(
        c["embed"], params["wte.weight"][tokens] + params["wpe.weight"][positions]
    )
    for i in range(tiny_config.n_layer):
        h = f"h.{i}."
        torch.testing.assert_close(c[h + "resid_mid"], c[h + "resid_pre"] + c[h + "attn.out"])
        torch.testing.assert_close(c[h + "resid_post"], c[h + "resid_mid"] + c[h + "mlp.out"])
        z = c[h + "attn.z"].flatten(2)
        out = F.linear(z, params[h + "attn.c_proj.weight"], params[h + "attn.c_proj.bias"])
        torch.testing.assert_close(c[h + "attn.out"], out, atol=ATOL, rtol=0)
        torch.testing.assert_close(c[h + "mlp.post"], F.gelu(c[h + "mlp.pre"], approximate="tanh"))
        pattern = c[h + "attn.pattern"]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert bool((pattern.triu(diagonal=1) == 0).all())  # causal: no query sees the future
        torch.testing.assert_close(pattern, c[h + "attn.scores"].softmax(-1))
        assert c[h + "attn.q"].shape == (2, 9, tiny_config.n_head, d // tiny_config.n_head)
        if i + 1 < tiny_config.n_layer:
            assert torch.equal(c[h + "resid_post"], c[f"h.{i + 1}.resid_pre"])
    torch.testing.assert_close(c["logits"], c["ln_f"] @ params["wte.weight"].T, atol=ATOL, rtol=0)


def test_the_sites_computed_on_request_recompose_their_neighbours(tiny_config):
    params = init_params(tiny_config, seed=0)
    g = torch.Generator().manual_seed(0)
    for name in params:  # nonzero biases and gains other than 1, so each term is exercised
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
            params[name] = params[name] + 0.1 * torch.randn(params[name].shape, generator=g)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=g)
    logits, c = run_with_cache(params, tokens, tiny_config)
    torch.testing.assert_close(logits, forward(params, tokens, tiny_config), atol=ATOL, rtol=0)
    assert torch.equal(c["tok_embed"] + c["pos_embed"], c["embed"])
    torch.testing.assert_close(c["pos_embed"][1], params["wpe.weight"][:9])
    norms = [
        (f"h.{i}.{ln}", f"h.{i}.{site}")
        for i in range(2)
        for ln, site in (("ln_1", "resid_pre"), ("ln_2", "resid_mid"))
    ] + [("ln_f", "h.1.resid_post")]
    for ln, source in norms:
        x = c[source]
        assert c[ln + ".scale"].shape == (2, 9, 1)
        torch.testing.assert_close(
            c[ln + ".scale"], (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        )
        weight, bias = params[ln + ".weight"], params[ln + ".bias"]
        normed = (x - x.mean(-1, keepdim=True)) / c[ln + ".scale"] * weight + bias
        torch.testing.assert_close(c[ln], normed, atol=ATOL, rtol=0)
    for i in range(2):
        result = c[f"h.{i}.attn.result"]
        assert result.shape == (2, 9, tiny_config.n_head, tiny_config.n_embd)
        out = result.sum(2) + params[f"h.{i}.attn.c_proj.bias"]  # heads plus the bias: attn.out
        torch.testing.assert_close(out, c[f"h.{i}.attn.out"], atol=ATOL, rtol=0)


def test_hooks_at_the_sites_on_request_change_what_flows_on(params, tokens, tiny_config):
    frozen = {"ln_f.scale": lambda s: torch.ones_like(s)}  # LayerNorm without its division
    _, c = run_with_cache(
        params, tokens, tiny_config, names=["h.1.resid_post", "ln_f"], hooks=frozen
    )
    x = c["h.1.resid_post"]
    torch.testing.assert_close(c["ln_f"], (x - x.mean(-1, keepdim=True)) * params["ln_f.weight"])
    silenced = interventions.patch("h.0.attn.result", torch.zeros(()), heads=[1])
    _, c = run_with_cache(
        params, tokens, tiny_config, names=["h.0.attn.result", "h.0.attn.out"], hooks=silenced
    )
    kept = c["h.0.attn.result"][:, :, [0, 2]].sum(2) + params["h.0.attn.c_proj.bias"]
    torch.testing.assert_close(c["h.0.attn.out"], kept, atol=ATOL, rtol=0)
    ablated = forward(params, tokens, tiny_config, hooks=interventions.ablate_heads(0, [1]))
    torch.testing.assert_close(
        forward(params, tokens, tiny_config, hooks=silenced), ablated, atol=ATOL, rtol=0
    )
    no_pos = forward(params, tokens, tiny_config, hooks={"pos_embed": torch.zeros_like})
    embed_only = {"embed": lambda e: params["wte.weight"][tokens]}
    assert torch.equal(no_pos, forward(params, tokens, tiny_config, hooks=embed_only))


def test_names_as_a_predicate_keep_only_the_matching_sites(params, tokens, tiny_config):
    _, cache = run_with_cache(
        params, tokens, tiny_config, names=lambda name: name.endswith("resid_post")
    )
    assert list(cache) == [f"h.{i}.resid_post" for i in range(tiny_config.n_layer)]
    with pytest.raises(ValueError, match="unknown activation site 'h.0.resid'"):
        run_with_cache(params, tokens, tiny_config, names=["h.0.resid"])


def test_names_as_one_string_is_that_site(params, tokens, tiny_config):
    _, cache = run_with_cache(params, tokens, tiny_config, names="embed")
    _, listed = run_with_cache(params, tokens, tiny_config, names=["embed"])
    assert list(cache) == ["embed"] and torch.equal(cache["embed"], listed["embed"])
    with pytest.raises(ValueError, match="unknown activation site 'h.0.resid'"):
        run_with_cache(params, tokens, tiny_config, names="h.0.resid")


def test_a_cache_records_what_flows_on_after_a_users_hook(params, tokens, tiny_config):
    doubled = {"h.0.mlp.out": lambda x: 2 * x}
    _, plain = run_with_cache(params, tokens, tiny_config, names=["h.0.mlp.out"])
    _, hooked = run_with_cache(params, tokens, tiny_config, names=["h.0.mlp.out"], hooks=doubled)
    torch.testing.assert_close(hooked["h.0.mlp.out"], 2 * plain["h.0.mlp.out"])


def test_a_logits_hook_reaches_the_loss(params, tokens, tiny_config):
    ban_all_but_zero = {"logits": lambda x: torch.where(torch.arange(x.shape[-1]) == 0, x, -1e4)}
    targets = torch.zeros_like(tokens)
    assert loss(params, tokens, targets, tiny_config, hooks=ban_all_but_zero) < 1e-3


# --- interventions ---------------------------------------------------------------------------


def test_zero_and_mean_ablation_replace_only_the_named_heads(params, tokens, tiny_config):
    _, clean = run_with_cache(params, tokens, tiny_config, names=["h.1.attn.z"])
    z = clean["h.1.attn.z"]
    hooks = interventions.ablate_heads(1, [2])
    _, zeroed = run_with_cache(params, tokens, tiny_config, names=["h.1.attn.z"], hooks=hooks)
    assert bool((zeroed["h.1.attn.z"][:, :, 2] == 0).all())
    assert torch.equal(zeroed["h.1.attn.z"][:, :, :2], z[:, :, :2])
    means = z.mean(dim=(0, 1))
    hooks = interventions.ablate_heads(1, [0, 2], means=means)
    _, averaged = run_with_cache(params, tokens, tiny_config, names=["h.1.attn.z"], hooks=hooks)
    torch.testing.assert_close(averaged["h.1.attn.z"][:, :, 0], means[0].expand(2, 9, -1))
    assert torch.equal(averaged["h.1.attn.z"][:, :, 1], z[:, :, 1])


def test_patching_some_positions_and_heads_from_another_run(params, tokens, tiny_config):
    other = torch.flip(tokens, dims=[0])
    _, source = run_with_cache(params, other, tiny_config, names=["h.0.attn.z"])
    hooks = interventions.patch("h.0.attn.z", source["h.0.attn.z"], positions=[3, -1], heads=[1])
    _, patched = run_with_cache(params, tokens, tiny_config, names=["h.0.attn.z"], hooks=hooks)
    _, clean = run_with_cache(params, tokens, tiny_config, names=["h.0.attn.z"])
    got, src, base = patched["h.0.attn.z"], source["h.0.attn.z"], clean["h.0.attn.z"]
    for position in range(9):
        for head in range(tiny_config.n_head):
            expected = src if (position in (3, 8) and head == 1) else base
            assert torch.equal(got[:, position, head], expected[:, position, head])
    with pytest.raises(ValueError, match="heads= needs a site with a head axis"):
        interventions.patch("h.0.resid_pre", source["h.0.attn.z"], heads=[1])
    with pytest.raises(ValueError, match="head 5 is outside the 3 at 'h.0.attn.z'"):
        forward(
            params, tokens, tiny_config, hooks=interventions.patch("h.0.attn.z", src, heads=[5])
        )


@pytest.mark.parametrize(
    "part, head_axis",
    [("attn.q", 2), ("attn.k", 2), ("attn.v", 2), ("attn.z", 2), ("attn.result", 2)]
    + [("attn.scores", 1), ("attn.pattern", 1)],
)
def test_patching_a_head_replaces_it_on_the_sites_head_axis(
    params, tokens, tiny_config, part, head_axis
):
    site = f"h.1.{part}"
    _, clean = run_with_cache(params, tokens, tiny_config, names=[site])
    hooks = interventions.patch(site, torch.full((), 7.0), heads=[1])
    _, patched = run_with_cache(params, tokens, tiny_config, names=[site], hooks=hooks)
    assert bool((patched[site].select(head_axis, 1) == 7).all())
    for head in (0, 2):
        assert torch.equal(
            patched[site].select(head_axis, head), clean[site].select(head_axis, head)
        )


def test_steering_adds_the_vector_where_asked_and_merge_runs_hooks_in_order(
    params, tokens, tiny_config
):
    vector = torch.randn(tiny_config.n_embd, generator=torch.Generator().manual_seed(0))
    site = "h.0.resid_post"
    _, clean = run_with_cache(params, tokens, tiny_config, names=[site])
    steer = interventions.add_vector(site, vector, positions=[0], scale=2.0)
    _, steered = run_with_cache(params, tokens, tiny_config, names=[site], hooks=steer)
    torch.testing.assert_close(steered[site][:, 0], clean[site][:, 0] + 2 * vector)
    assert torch.equal(steered[site][:, 1:], clean[site][:, 1:])
    twice = interventions.merge(steer, interventions.add_vector(site, vector, scale=-2.0))
    _, undone = run_with_cache(params, tokens, tiny_config, names=[site], hooks=twice)
    torch.testing.assert_close(undone[site][:, 0], clean[site][:, 0], atol=ATOL, rtol=0)


# --- composition: grad, vmap, compile, per-example gradients --------------------------------


def _metric(params, tokens, config, delta, site):
    logits = forward(params, tokens, config, hooks={site: lambda x: x + delta})
    return logits[:, -1, 7].sum() - logits[:, -1, 11].sum()


def test_attribution_by_grad_of_an_additive_delta_matches_finite_differences(
    params, tokens, tiny_config
):
    site = "h.0.resid_mid"  # block 1's attention carries every position to the last one
    delta = torch.zeros(2, 9, tiny_config.n_embd, dtype=torch.float64)
    params64 = {k: v.double() for k, v in params.items()}  # fp64: clean finite differences
    grad = torch.func.grad(lambda d: _metric(params64, tokens, tiny_config, d, site))(delta)
    eps = 1e-6
    for index in [(0, 8, 3), (1, 4, 10), (1, 8, 0)]:
        bump = delta.clone()
        bump[index] = eps
        up = _metric(params64, tokens, tiny_config, bump, site)
        bump[index] = -eps
        down = _metric(params64, tokens, tiny_config, bump, site)
        assert float(grad[index]) == pytest.approx(float(up - down) / (2 * eps), abs=1e-6)
    assert float(grad[:, :8].abs().sum()) > 0  # earlier positions reach the last through attention


def test_vmap_over_deltas_equals_running_them_one_by_one(params, tokens, tiny_config):
    site = "h.0.attn.out"
    deltas = torch.randn(4, tiny_config.n_embd, generator=torch.Generator().manual_seed(1))
    batched = torch.func.vmap(lambda d: _metric(params, tokens, tiny_config, d, site))(deltas)
    one_by_one = torch.stack([_metric(params, tokens, tiny_config, d, site) for d in deltas])
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-5)


def test_forward_with_a_fixed_hooks_dict_compiles_without_graph_breaks(plain_python):
    # In a fresh interpreter: pytest's jaxtyping hook wraps every gpt_fn function in a checker
    # that dynamo cannot trace; users compile the plain functions.
    plain_python("""
import torch, gpt_fn
from gpt_fn import hooks as iv
config = gpt_fn.GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24)
params = gpt_fn.init_params(config, seed=0)
tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
steer = iv.merge(
    iv.ablate_heads(0, [1]),
    iv.add_vector("h.1.resid_pre", torch.ones(config.n_embd)),
    {"h.1.attn.pattern": lambda x: x},
)
expected = gpt_fn.forward(params, tokens, config, hooks=steer)
compiled = torch.compile(lambda p, t: gpt_fn.forward(p, t, config, hooks=steer), fullgraph=True)
torch.testing.assert_close(compiled(params, tokens), expected, atol=1e-5, rtol=0)
""")


def test_per_example_gradients_and_norms_equal_a_loop(params, tokens, tiny_config):
    x, y = tokens[:, :-1], tokens[:, 1:]

    def example_loss(p, xi, yi):
        return loss(p, xi[None], yi[None], tiny_config)

    grads, norms = optim.per_example_grads(example_loss, params, x, y)
    for i in range(2):
        alone = torch.func.grad(example_loss)(params, x[i], y[i])
        for name in alone:
            torch.testing.assert_close(grads[name][i], alone[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(norms[i], optim.global_norm(alone), atol=1e-5, rtol=1e-5)
    clipped, before = torch.func.vmap(lambda g: optim.clip_by_global_norm(g, 0.5))(grads)
    torch.testing.assert_close(before, norms)
    after = torch.func.vmap(optim.global_norm)(clipped)
    assert bool((after <= 0.5 + 1e-5).all())


def test_hooks_see_the_positions_of_each_call_during_generation(params, tiny_config):
    from gpt_fn import sampling

    seen = []

    def record(x):
        seen.append(x.shape[1])
        return x

    prompt = torch.randint(
        0, tiny_config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0)
    )
    sampling.generate(
        params, prompt, tiny_config, max_new_tokens=4, greedy=True, hooks={"h.0.ln_2": record}
    )
    assert seen == [5, 1, 1, 1]  # the prompt at prefill, then one position per step
    assert gpt_fn.site_names(tiny_config) == site_names(tiny_config)


# --- stop_at -------------------------------------------------------------------------------


def test_stop_at_returns_bitwise_the_full_runs_activations_up_to_the_site(
    params, tokens, tiny_config
):
    _, full = run_with_cache(params, tokens, tiny_config)
    sites = site_names(tiny_config)
    for index, site in enumerate(sites[:-1]):
        out, cache = run_with_cache(params, tokens, tiny_config, stop_at=site)
        assert torch.equal(out, full[site]), site
        assert list(cache) == list(sites[: index + 1])
        assert all(torch.equal(cache[name], full[name]) for name in cache), site


def test_stop_at_runs_no_later_site(params, tokens, tiny_config):
    def never(x):
        raise AssertionError("a site after stop_at ran")

    later = {"h.1.resid_pre": never, "ln_f": never, "logits": never}
    plain, _ = gpt_fn.model.transformer(params, tokens, tiny_config, stop_at="h.0.attn.z")
    hooked, _ = gpt_fn.model.transformer(
        params, tokens, tiny_config, hooks={**later, "h.0.mlp.pre": never}, stop_at="h.0.attn.z"
    )
    assert torch.equal(plain, hooked)
    assert plain.shape == (2, 9, tiny_config.n_head, tiny_config.d_head)


def test_stop_at_applies_the_hook_at_its_site_and_differentiates(params, tokens, tiny_config):
    out, _ = run_with_cache(
        params,
        tokens,
        tiny_config,
        names=[],
        stop_at="h.0.resid_post",
        hooks={"h.0.resid_post": torch.neg},
    )
    _, full = run_with_cache(params, tokens, tiny_config, names=["h.0.resid_post"])
    assert torch.equal(out, -full["h.0.resid_post"])
    grad = torch.func.grad(
        lambda w: gpt_fn.model.transformer(
            {**params, "h.0.mlp.c_fc.weight": w}, tokens, tiny_config, stop_at="h.0.mlp.post"
        )[0].sum()
    )(params["h.0.mlp.c_fc.weight"])
    assert grad.abs().sum() > 0


def test_stop_at_logits_is_the_full_run(params, tokens, tiny_config):
    out, _ = run_with_cache(params, tokens, tiny_config, names=[], stop_at="logits")
    assert torch.equal(out, forward(params, tokens, tiny_config))


def test_stop_at_errors_name_the_problem(params, tokens, tiny_config):
    with pytest.raises(ValueError, match="stop_at must be an activation site"):
        run_with_cache(params, tokens, tiny_config, stop_at="h.9.resid_post")
    with pytest.raises(ValueError, match="comes after stop_at"):
        run_with_cache(params, tokens, tiny_config, names=["h.1.mlp.out"], stop_at="h.0.ln_2")
    with pytest.raises(ValueError, match="comes after stop_at"):  # one site as a string
        run_with_cache(params, tokens, tiny_config, names="h.1.mlp.out", stop_at="h.0.ln_2")
    cache = gpt_fn.model.empty_cache(tiny_config, batch=2, capacity=16)
    with pytest.raises(ValueError, match="no KV cache"):
        gpt_fn.model.transformer(params, tokens, tiny_config, cache=cache, stop_at="embed")


# --- hooks named on a command line (module:function) ----------------------------------------

HOOKS_MODULE = """
from gpt_fn.hooks import ablate_heads, add_vector


def steer(params, config):
    return add_vector(f"h.{config.n_layer - 1}.resid_post", params["wte.weight"][7])


def ablate(params, config):
    return ablate_heads(0, [1])


def not_a_mapping(params, config):
    return [steer]


def unknown_site(params, config):
    return {"h.9.resid_post": lambda x: x}


def raises(params, config):
    raise RuntimeError("no vector for this model")


NOT_CALLABLE = 3
"""


def test_load_hooks_calls_module_function_with_the_params_and_config(
    params, tokens, tiny_config, tmp_path, monkeypatch
):
    (tmp_path / "lab_hooks.py").write_text(HOOKS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = forward(
        params,
        tokens,
        tiny_config,
        hooks=interventions.add_vector("h.1.resid_post", params["wte.weight"][7]),
    )
    for spec in ("lab_hooks:steer", f"{tmp_path / 'lab_hooks.py'}:steer"):
        hooks = interventions.load_hooks(spec, params, tiny_config)
        assert list(hooks) == ["h.1.resid_post"]
        assert torch.equal(forward(params, tokens, tiny_config, hooks=hooks), expected)
    monkeypatch.chdir(tmp_path)  # a file relative to the current folder
    assert list(interventions.load_hooks("lab_hooks.py:ablate", params, tiny_config)) == [
        "h.0.attn.z"
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lab_hooks", r"hooks must be given as module:function \(e\.g\. steer\.py:hooks\)"),
        ("lab_hooks:steer:x", "hooks must be given as module:function"),
        (":steer", "hooks must be given as module:function"),
        ("no_such_module_here:f", r"cannot import no_such_module_here \(ModuleNotFoundError"),
        ("missing.py:f", r"cannot import missing\.py \(FileNotFoundError: no such file"),
        ("broken.py:f", r"cannot import broken\.py \(SyntaxError"),
        ("lab_hooks.py:nope", r"lab_hooks\.py has no function 'nope'"),
        ("lab_hooks.py:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        ("lab_hooks.py:raises", r"raises\(params, config\) raised RuntimeError: no vector"),
        ("lab_hooks.py:not_a_mapping", "returned bad hooks: hooks must be a mapping"),
        ("lab_hooks.py:unknown_site", "returned bad hooks: unknown activation site 'h.9"),
    ],
)
def test_load_hooks_names_what_is_wrong_with_a_spec(
    params, tiny_config, tmp_path, monkeypatch, spec, message
):
    (tmp_path / "lab_hooks.py").write_text(HOOKS_MODULE)
    (tmp_path / "broken.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        interventions.load_hooks(spec, params, tiny_config)
    assert "\n" not in str(error.value)
