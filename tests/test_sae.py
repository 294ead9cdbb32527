"""SAEs: definitions of encode/decode/losses, splicing and feature interventions, training K
SAEs from one model pass (equal to K separate runs), metrics, and the on-disk format."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fn import GPTConfig, forward, init_params, run_with_cache
from gpt_fn.sae import (
    SAEConfig,
    SAETrainSettings,
    ablate_features,
    decode,
    encode,
    evaluate_sae,
    init_sae,
    load_sae,
    sae_loss,
    save_sae,
    splice,
    steer_feature,
    train_sae,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32)
SITE = "h.0.resid_post"


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CONFIG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, 2000).astype(np.uint16)


def trained_like(config: SAEConfig, seed: int = 0) -> dict:
    """An SAE with nonzero biases and thresholds, as after training."""
    sae = init_sae(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    sae["b_enc"] = torch.randn(config.d_sae, generator=g) * 0.1
    sae["b_dec"] = torch.randn(config.d_in, generator=g) * 0.1
    if "threshold" in sae:
        sae["threshold"] = torch.rand(config.d_sae, generator=g) * 0.1
    return sae


# --- definitions ----------------------------------------------------------------------------


def test_init_gives_saelens_names_shapes_and_decoder_norms():
    for kind, k, norm in (("standard", None, 0.1), ("topk", 4, 1.0), ("jumprelu", None, 0.1)):
        config = SAEConfig(d_in=8, d_sae=20, kind=kind, k=k)
        sae = init_sae(config, seed=0)
        expected = {"W_enc": (8, 20), "b_enc": (20,), "W_dec": (20, 8), "b_dec": (8,)}
        if kind == "jumprelu":
            expected["threshold"] = (20,)
        assert {name: tuple(v.shape) for name, v in sae.items()} == expected
        assert torch.allclose(sae["W_dec"].norm(dim=1), torch.full((20,), norm))
        assert torch.equal(sae["W_enc"], sae["W_dec"].T)
        assert torch.equal(init_sae(config, seed=0)["W_dec"], sae["W_dec"])


def test_encode_and_decode_follow_saelens_definitions():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    standard = SAEConfig(d_in=8, d_sae=20)
    sae = trained_like(standard)
    pre = (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]
    assert torch.equal(encode(sae, x, standard), F.relu(pre))
    features = encode(sae, x, standard)
    assert torch.equal(decode(sae, features, standard), features @ sae["W_dec"] + sae["b_dec"])
    jump = SAEConfig(d_in=8, d_sae=20, kind="jumprelu")
    sae = trained_like(jump)
    pre = (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]
    assert torch.equal(encode(sae, x, jump), pre * (pre > sae["threshold"]))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_topk_keeps_the_k_largest_pre_activations_relud(k, seed):
    config = SAEConfig(d_in=8, d_sae=12, kind="topk", k=k)
    sae = trained_like(config, seed)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    pre = (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]
    features = encode(sae, x, config)
    assert ((features != 0).sum(-1) <= k).all()
    kth = pre.topk(k, dim=-1).values[:, -1:]
    assert torch.equal(features, torch.where(pre >= kth, F.relu(pre), 0.0))


def test_jumprelu_threshold_gradient_is_the_straight_through_estimate():
    config = SAEConfig(d_in=8, d_sae=20, kind="jumprelu", sparsity_coefficient=2.0, bandwidth=0.5)
    sae = {name: v.requires_grad_() for name, v in trained_like(config).items()}
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    loss, _ = sae_loss(sae, x, config)
    (grad,) = torch.autograd.grad(loss.sparsity, sae["threshold"])
    pre = ((x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]).detach()
    window = ((pre - sae["threshold"].detach()).abs() < 0.25).float()
    # d L0 / d threshold = -(1 / bandwidth) * (tokens in the window) / batch, times the coefficient
    assert torch.allclose(grad, -2.0 * window.sum(0) / 0.5 / 6, atol=1e-6)
    assert float(loss.sparsity.detach()) == pytest.approx(
        2.0 * float((pre > sae["threshold"]).sum()) / 6
    )


def test_standard_loss_is_mse_plus_decoder_weighted_l1():
    config = SAEConfig(d_in=8, d_sae=20, sparsity_coefficient=0.3)
    sae = trained_like(config)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    loss, features = sae_loss(sae, x, config)
    mse = (decode(sae, features, config) - x).pow(2).sum(-1).mean()
    l1 = (features * sae["W_dec"].norm(dim=1)).sum(-1).mean()
    assert torch.allclose(loss.loss, mse + 0.3 * l1)


def test_topk_aux_loss_counts_only_when_features_are_dead():
    config = SAEConfig(d_in=8, d_sae=20, kind="topk", k=3)
    sae = trained_like(config)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert float(sae_loss(sae, x, config)[0].aux) == 0.0
    dead = torch.zeros(20, dtype=torch.bool)
    dead[5:15] = True
    assert float(sae_loss(sae, x, config, dead=dead)[0].aux) > 0.0


def test_topk_loss_and_gradients_equal_the_dense_definition():
    config = SAEConfig(d_in=8, d_sae=20, kind="topk", k=3, aux_coefficient=0.5)
    sae = {name: v.requires_grad_() for name, v in trained_like(config).items()}
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(20, dtype=torch.bool)
    dead[::3] = True

    def dense(sae):  # the definitions written out, every feature dense (Gao et al. 2024)
        pre = (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]
        top = pre.topk(3, dim=-1)
        features = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        reconstruction = features @ sae["W_dec"] + sae["b_dec"]
        mse = (reconstruction - x).pow(2).sum(-1).mean()
        k_aux = min(4, int(dead.sum()))  # d_in // 2
        aux_top = pre.masked_fill(~dead, -float("inf")).topk(k_aux, dim=-1)
        revived = torch.zeros_like(pre).scatter(-1, aux_top.indices, F.relu(aux_top.values))
        error = (x - reconstruction).detach()
        aux = (revived @ sae["W_dec"] - error).pow(2).sum(-1).mean()
        return mse + 0.5 * min(int(dead.sum()) / 4, 1.0) * aux

    loss, _ = sae_loss(sae, x, config, dead=dead)
    expected = dense(sae)
    ours = torch.autograd.grad(loss.loss, list(sae.values()))
    theirs = torch.autograd.grad(expected, list(sae.values()))
    # The same products summed in another order (k rows gathered vs a dense matmul): fp32 ulps.
    assert torch.allclose(loss.loss, expected, atol=1e-6)
    for name, a, b in zip(sae, ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_bad_configs_and_saes_raise_one_clear_error():
    with pytest.raises(ValueError, match="needs k"):
        SAEConfig(d_in=8, d_sae=20, kind="topk")
    with pytest.raises(ValueError, match="more than the SAE's"):
        SAEConfig(d_in=8, d_sae=4, kind="topk", k=5)
    with pytest.raises(ValueError, match="kind"):
        SAEConfig(d_in=8, d_sae=4, kind="gated")
    config = SAEConfig(d_in=8, d_sae=20)
    with pytest.raises(ValueError, match="'W_dec' has shape"):
        splice(SITE, {**init_sae(config, seed=0), "W_dec": torch.zeros(20, 9)}, config)
    no_bias = {name: value for name, value in init_sae(config, seed=0).items() if name != "b_dec"}
    with pytest.raises(KeyError, match=r"missing 1 key \['b_dec'\]; 1 unexpected key \['scale'\]"):
        splice(SITE, {**no_bias, "scale": torch.ones(20)}, config)


# --- splicing -------------------------------------------------------------------------------


def test_splice_replaces_the_site_by_the_reconstruction(params, tokens):
    config = SAEConfig(d_in=32, d_sae=64)
    sae = trained_like(config)
    _, clean = run_with_cache(params, tokens, CONFIG, names=[SITE])
    _, spliced = run_with_cache(
        params, tokens, CONFIG, names=[SITE], hooks=splice(SITE, sae, config)
    )
    x = clean[SITE]
    assert torch.equal(spliced[SITE], decode(sae, encode(sae, x, config), config))


def test_splice_with_the_error_term_leaves_the_model_exactly_unchanged(params, tokens):
    config = SAEConfig(d_in=32, d_sae=64)
    hooks = splice(SITE, trained_like(config), config, error_term=True)
    assert torch.equal(
        forward(params, tokens, CONFIG, hooks=hooks), forward(params, tokens, CONFIG)
    )


def test_ablating_features_with_the_error_term_removes_just_their_decoder_rows(params, tokens):
    config = SAEConfig(d_in=32, d_sae=64)
    sae = trained_like(config)
    _, clean = run_with_cache(params, tokens, CONFIG, names=[SITE])
    hooks = ablate_features(SITE, sae, config, [3, 10])
    _, ablated = run_with_cache(params, tokens, CONFIG, names=[SITE], hooks=hooks)
    features = encode(sae, clean[SITE], config)
    removed = features[..., [3, 10]] @ sae["W_dec"][[3, 10]]
    # x + (decode(f without 3, 10) - decode(f)): the same sum in another order, a few ulps
    assert torch.allclose(ablated[SITE], clean[SITE] - removed, atol=1e-6)


def test_steering_adds_the_scaled_decoder_row_and_heads_sites_flatten(params, tokens):
    site = "h.1.attn.z"  # batch seq n_head d_head, read as d_in = n_head * d_head
    config = SAEConfig(d_in=32, d_sae=64)
    sae = trained_like(config)
    _, clean = run_with_cache(params, tokens, CONFIG, names=[site])
    hooks = steer_feature(site, sae, config, 7, scale=3.0)
    _, steered = run_with_cache(params, tokens, CONFIG, names=[site], hooks=hooks)
    delta = (steered[site] - clean[site]).flatten(2)
    assert torch.allclose(delta, (3.0 * sae["W_dec"][7]).expand_as(delta), atol=1e-6)
    spliced = forward(params, tokens, CONFIG, hooks=splice(site, sae, config, error_term=True))
    assert torch.equal(spliced, forward(params, tokens, CONFIG))


def test_a_splice_whose_d_in_does_not_fit_the_site_names_both(params, tokens):
    config = SAEConfig(d_in=128, d_sae=64)
    with pytest.raises(ValueError, match=r"d_in=128 but 'h.0.resid_post' has 32"):
        forward(params, tokens, CONFIG, hooks=splice(SITE, init_sae(config, seed=0), config))
    with pytest.raises(ValueError, match="outside the SAE's 64 features"):
        ablate_features(SITE, init_sae(config, seed=0), config, [64])


# --- training -------------------------------------------------------------------------------

SETTINGS = SAETrainSettings(
    steps=50,
    batch_size=32,
    model_batch_size=2,
    block_size=8,
    buffer_batches=2,
    lr=1e-3,
    dead_after=5,
)


def test_training_k_saes_at_once_equals_k_separate_runs(params, data):
    configs = [
        SAEConfig(d_in=32, d_sae=64, sparsity_coefficient=1e-3),
        SAEConfig(d_in=32, d_sae=48, kind="topk", k=4),
        SAEConfig(d_in=32, d_sae=64, kind="jumprelu", sparsity_coefficient=1e-3),
    ]
    together = train_sae(params, CONFIG, SITE, data, configs, settings=SETTINGS)
    start = [init_sae(c, seed=SETTINGS.seed + i) for i, c in enumerate(configs)]
    for i, config in enumerate(configs):
        (alone,) = train_sae(
            params, CONFIG, SITE, data, [config], settings=SETTINGS, saes=[start[i]]
        )
        for name, value in alone.items():
            assert (together[i][name] - value).abs().max() <= 1e-6, (i, name)
    assert torch.allclose(together[1]["W_dec"].norm(dim=1), torch.ones(48))


def test_training_lowers_the_loss_and_logs_every_step(params, data):
    config = SAEConfig(d_in=32, d_sae=64, sparsity_coefficient=1e-3)
    logs = []
    train_sae(params, CONFIG, SITE, data, [config], settings=SETTINGS, log=logs.append)
    assert [log.step for log in logs] == list(range(50))
    first, last = logs[0].losses[0].mse, logs[-1].losses[0].mse
    assert float(last) < 0.75 * float(first)


def test_training_an_sae_that_does_not_fit_the_site_fails_at_once(params, data):
    with pytest.raises(ValueError, match="d_in=16 cannot read 'h.0.mlp.pre', which has 128"):
        train_sae(params, CONFIG, "h.0.mlp.pre", data, [SAEConfig(d_in=16, d_sae=8)])
    with pytest.raises(ValueError, match="unknown activation site"):
        train_sae(params, CONFIG, "h.0.mlp", data, [SAEConfig(d_in=16, d_sae=8)])


def test_evaluating_an_sae_that_does_not_fit_the_site_is_the_same_error(params, tokens):
    sae_config = SAEConfig(d_in=16, d_sae=8)
    sae = init_sae(sae_config, seed=0)
    with pytest.raises(ValueError, match="d_in=16 cannot read 'h.0.mlp.pre', which has 128"):
        evaluate_sae(params, CONFIG, "h.0.mlp.pre", sae, sae_config, tokens)
    with pytest.raises(ValueError, match="unknown activation site"):
        evaluate_sae(params, CONFIG, "h.0.mlp", sae, sae_config, tokens)


# --- metrics --------------------------------------------------------------------------------


def test_a_lossless_sae_scores_perfect_fidelity(params, tokens):
    # [I, -I] encoder and [I; -I] decoder: relu(x) - relu(-x) = x exactly.
    config = SAEConfig(d_in=32, d_sae=64)
    eye = torch.eye(32)
    sae = {
        "W_enc": torch.cat([eye, -eye], 1),
        "b_enc": torch.zeros(64),
        "W_dec": torch.cat([eye, -eye], 0),
        "b_dec": torch.zeros(32),
    }
    metrics = evaluate_sae(params, CONFIG, SITE, sae, config, tokens)
    assert metrics.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert metrics.mse == pytest.approx(0.0, abs=1e-10)
    assert metrics.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert metrics.ce_loss_spliced == pytest.approx(metrics.ce_loss_clean, abs=1e-5)
    assert 0 < metrics.l0 <= 32 and metrics.dead_features <= 64


def test_a_zero_sae_recovers_nothing(params, tokens):
    config = SAEConfig(d_in=32, d_sae=8)
    sae = {name: torch.zeros_like(v) for name, v in init_sae(config, seed=0).items()}
    metrics = evaluate_sae(params, CONFIG, SITE, sae, config, tokens)
    assert metrics.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert metrics.l0 == 0 and metrics.dead_features == 8


# --- files ----------------------------------------------------------------------------------


def test_save_and_load_round_trip_every_kind(tmp_path):
    for kind, k in (("standard", None), ("topk", 4), ("jumprelu", None)):
        config = SAEConfig(d_in=8, d_sae=20, kind=kind, k=k, sparsity_coefficient=0.5)
        sae = trained_like(config)
        save_sae(tmp_path / kind, sae, config, site="h.1.attn.z")
        loaded, loaded_config, site = load_sae(tmp_path / kind)
        assert loaded_config == config and site == "h.1.attn.z"
        assert all(torch.equal(loaded[name], sae[name]) for name in sae)


def test_loading_a_folder_without_an_sae_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae(tmp_path)
