"""Cached activations equal TransformerLens's on the same GPT-2 weights.

TransformerLens 4.x wraps the HF model (`TransformerBridge.boot_transformers(dir)`);
`enable_compatibility_mode(no_processing=True)` exposes the classic hook names while keeping
HF's numerics (no weight folding or centering), so both sides compute GPT-2 in fp32 from the
same checkpoint, with the kernels in different groupings.

Tolerance 1e-5, the issue's bound, on GPT-2 small's shapes (12 layers, 768 wide, random
weights saved with `save_pretrained`): the largest difference measured was 2.4e-6, at the keys
(attention and LayerNorm reductions summed in another order, growing slowly with depth).
"""

import pytest
import torch

pytest.importorskip("transformer_lens")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gpt_fn import GPTConfig, hf, run_with_cache  # noqa: E402

ATOL = 1e-5
# Our site and their hook; every site has TransformerLens's axis order.
MATCHING = {
    "resid_pre": "hook_resid_pre",
    "ln_1.scale": "ln1.hook_scale",
    "attn.q": "attn.hook_q",
    "attn.k": "attn.hook_k",
    "attn.v": "attn.hook_v",
    "attn.scores": "attn.hook_attn_scores",
    "attn.pattern": "attn.hook_pattern",
    "attn.z": "attn.hook_z",
    "attn.result": "attn.hook_result",
    "attn.out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "ln_2.scale": "ln2.hook_scale",
    "mlp.pre": "mlp.hook_pre",
    "mlp.post": "mlp.hook_post",
    "mlp.out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
# Outside the blocks: their `hook_embed` is the token embedding alone.
TOP_MATCHING = {
    "tok_embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "ln_f.scale": "ln_final.hook_scale",
}


@pytest.fixture(scope="module")
def both(tmp_path_factory, transformer_lens_bridge):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)  # GPT-2 small, random weights
    params, config = hf.load(directory)
    bridge = transformer_lens_bridge(directory, no_processing=True)
    bridge.set_use_attn_result(True)  # their per-head results, off by default like ours
    tokens = torch.randint(
        0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        logits, ours = run_with_cache(params, tokens, config)
        their_logits, theirs = bridge.run_with_cache(tokens)
    return config, logits, ours, their_logits, theirs


def test_logits_agree(both):
    _, logits, _, their_logits, _ = both
    torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("site", list(MATCHING))
def test_every_layers_activation_agrees(both, site):
    config, _, ours, _, theirs = both
    assert isinstance(config, GPTConfig)
    hook = MATCHING[site]
    for i in range(config.n_layer):
        expected = theirs[f"blocks.{i}.{hook}"]
        got = ours[f"h.{i}.{site}"]
        if site == "attn.scores":  # both put -inf where a query may not look
            assert torch.equal(torch.isinf(got), torch.isinf(expected))
            got, expected = got.nan_to_num(neginf=0.0), expected.nan_to_num(neginf=0.0)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"h.{i}.{site}")


@pytest.mark.parametrize("site", list(TOP_MATCHING))
def test_the_activations_outside_the_blocks_agree(both, site):
    _, _, ours, _, theirs = both
    torch.testing.assert_close(ours[site], theirs[TOP_MATCHING[site]], atol=ATOL, rtol=0)
