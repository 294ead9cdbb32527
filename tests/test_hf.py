"""GPT-2 weights both ways against `transformers.GPT2LMHeadModel` with random (seeded) weights.

The HF reference runs with eager attention (the textbook softmax(QK^T/sqrt(d))V), built once
per module for each shape. Every parameter, LayerNorm gains and biases included, is drawn at
random so that a dropped or misplaced tensor changes the logits.
"""

import functools
import json
import math
import sys
import time
from dataclasses import dataclass

import huggingface_hub.constants
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import gpt_fn
from gpt_fn import GPTConfig, init_params, param_shapes
from gpt_fn.hf import (
    check_hf_state_dict,
    config_from_hf,
    config_to_hf_dict,
    from_hf_state_dict,
    load,
    save,
    to_hf_state_dict,
)

# Both sides compute the same fp32 math in a different order (fused QKV vs per-head matmuls,
# SDPA vs eager softmax, einsum vs bmm), so logits (std ~1, max ~5) differ by float rounding
# accumulated over up to 12 layers: measured <= 4e-6. A layout bug (a missed transpose, a head
# split the wrong way, a dropped bias) moves them by 1e-2 or more.
LOGITS_ATOL = 1e-4

CASES = {
    "gpt2-small": GPTConfig.from_preset("gpt2"),  # 12 layers, 768 wide, 12 heads, 50257 vocab
    "odd-3-heads": GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24),
    "odd-5-heads": GPTConfig(vocab_size=253, block_size=32, n_layer=3, n_head=5, n_embd=40),
}
GREEDY_NEW_TOKENS = 20


def hf_config(config: GPTConfig) -> GPT2Config:
    # No end-of-text token: generate() would stop early where random weights pick it.
    return GPT2Config(
        **{**config_to_hf_dict(config), "bos_token_id": None, "eos_token_id": None},
        attn_implementation="eager",
    )


def random_hf_model(config: GPTConfig, seed: int) -> GPT2LMHeadModel:
    """A HF model whose every parameter comes from a seeded generator.

    Gains are near 1 and biases non-zero, so a dropped or misplaced tensor shows. Weights have
    std 1/sqrt(n_embd): blocks mix tokens enough for greedy decoding to wander (at GPT-2's 0.02
    a small model repeats one token, which would make the greedy test weak).
    """
    with torch.device("meta"):  # skip HF's initialisation (seconds for GPT-2 small): all replaced
        model = GPT2LMHeadModel(hf_config(config))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=generator)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            state[name] = 0.05 * noise
        else:
            state[name] = noise / math.sqrt(config.n_embd)
    del state["lm_head.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # lm_head is wte again, as HF builds it
    assert model.lm_head.weight is model.transformer.wte.weight
    return model.eval()


def random_params(config: GPTConfig, seed: int) -> gpt_fn.Params:
    """Our init with every gain and bias perturbed too."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: value + 0.05 * torch.randn(value.shape, generator=generator)
        for name, value in init_params(config, seed=seed).items()
    }


def tokens_for(config: GPTConfig, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (2, seq), generator=generator)


def hf_logits(model: GPT2LMHeadModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@dataclass(frozen=True)
class Case:
    config: GPTConfig
    model: GPT2LMHeadModel  # random weights, eager attention, eval mode
    params: gpt_fn.Params  # converted from `model`
    tokens: torch.Tensor  # (2, min(32, block_size))
    hf_logits: torch.Tensor  # model's logits of `tokens`


@functools.cache
def build_case(name: str) -> Case:
    # Cached rather than a parametrized module fixture: tests that take a subset of the cases
    # would make pytest rebuild GPT-2 small (the slow part) more than once.
    config = CASES[name]
    model = random_hf_model(config, seed=0)
    tokens = tokens_for(config, seq=min(32, config.block_size))
    params = from_hf_state_dict(model.state_dict(), config)
    return Case(config, model, params, tokens, hf_logits(model, tokens))


@pytest.fixture(scope="module", autouse=True)
def release_cases():
    yield
    build_case.cache_clear()  # GPT-2 small is ~1 GB with its converted copy


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return build_case(request.param)


# --- configs ------------------------------------------------------------------------------


def test_config_from_hf_reads_config_object_and_config_json_dict():
    hf = GPT2Config(vocab_size=101, n_positions=16, n_embd=24, n_layer=2, n_head=3)
    hf.layer_norm_epsilon = 1e-6
    expected = GPTConfig(
        vocab_size=101, block_size=16, n_layer=2, n_head=3, n_embd=24, layer_norm_eps=1e-6
    )
    assert config_from_hf(hf) == expected
    assert config_from_hf(json.loads(hf.to_json_string())) == expected
    # A sparse config.json takes GPT2Config's defaults, as transformers does.
    assert config_from_hf({"model_type": "gpt2", "n_layer": 2}) == GPTConfig(n_layer=2)


def test_config_from_hf_reads_the_hub_gpt2_config_json():
    # openai-community/gpt2's config.json (abridged): legacy n_ctx, extra fields, 0.1 dropouts.
    hub = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "resid_pdrop": 0.1,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    }
    assert config_from_hf(hub) == GPTConfig.from_preset("gpt2")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("activation_function", "relu"),
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("add_cross_attention", True),
        ("tie_word_embeddings", False),
        ("n_inner", 100),
        ("model_type", "gpt_neo"),
    ],
)
def test_config_from_hf_rejects_unsupported_setting_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_hf({**config_to_hf_dict(CASES["odd-3-heads"]), field: value})


def test_config_from_hf_takes_dropout_from_the_caller_not_hf():
    hf = config_to_hf_dict(CASES["odd-3-heads"]) | {"resid_pdrop": 0.3, "attn_pdrop": 0.3}
    assert config_from_hf(hf).dropout == 0.0
    assert config_from_hf(hf, dropout=0.1).dropout == 0.1


def test_config_to_hf_dict_is_a_complete_gpt2_config_that_round_trips():
    config = GPTConfig(vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=64)
    fields = config_to_hf_dict(config)
    assert fields["model_type"] == "gpt2" and fields["architectures"] == ["GPT2LMHeadModel"]
    assert set(GPT2Config.__annotations__) <= set(fields)
    hf = GPT2Config(**fields)
    assert all(getattr(hf, name) == value for name, value in fields.items())
    assert config_from_hf(fields) == config
    assert config_from_hf(hf) == config


def test_bias_free_configs_have_no_gpt2_equivalent():
    no_bias = GPTConfig(vocab_size=101, block_size=16, n_layer=1, n_head=3, n_embd=24, bias=False)
    with pytest.raises(ValueError, match="bias"):
        config_to_hf_dict(no_bias)
    with pytest.raises(ValueError, match="bias"):
        to_hf_state_dict(init_params(no_bias, seed=0), no_bias)


# --- HF -> ours: logits and greedy text -----------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_logits_match_hf(case, attention):
    ours = gpt_fn.forward(case.params, case.tokens, case.config, attention=attention)
    assert ours.shape == case.hf_logits.shape
    assert (ours - case.hf_logits).abs().max().item() <= LOGITS_ATOL
    # Logits of order 1, so the tolerance is small against them.
    assert case.hf_logits.std().item() > 0.5


def greedy(params, config, prompt, new_tokens, attention):
    """Argmax decoding, re-running the full context each step (no KV cache)."""
    tokens = prompt
    for _ in range(new_tokens):
        logits = gpt_fn.forward(params, tokens, config, attention=attention)
        tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


# odd-3-heads' 16-position block cannot hold a prompt plus 20 new tokens. GPT-2 small runs
# one kernel only: 20 full-context forwards of a 124M model are the slowest part of this file,
# and test_logits_match_hf already holds both kernels to HF there.
@pytest.mark.parametrize(
    ("name", "attention"),
    [("gpt2-small", "sdpa"), ("odd-5-heads", "sdpa"), ("odd-5-heads", "manual")],
)
def test_greedy_continuation_matches_hf_generate(name, attention):
    case = build_case(name)
    prompt = tokens_for(case.config, seq=4, seed=1)
    ours = greedy(case.params, case.config, prompt, GREEDY_NEW_TOKENS, attention)
    with torch.no_grad():
        theirs = case.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=GREEDY_NEW_TOKENS,
            pad_token_id=0,
        )
    assert theirs.shape == (2, 4 + GREEDY_NEW_TOKENS)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 4:].tolist())) > 2  # a wandering continuation, not one token repeated


# --- ours -> HF -------------------------------------------------------------------------------


def hf_model_from_state_dict(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT2LMHeadModel:
    with torch.device("meta"):  # skip HF's own initialisation: every tensor is assigned next
        model = GPT2LMHeadModel(hf_config(config))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("name", ["odd-3-heads", "odd-5-heads"])
def test_exported_params_give_same_logits_in_hf(name):
    config = CASES[name]
    params = random_params(config, seed=3)
    model = hf_model_from_state_dict(config, to_hf_state_dict(params, config))
    tokens = tokens_for(config, seq=config.block_size, seed=2)
    ours = gpt_fn.forward(params, tokens, config)
    assert (ours - hf_logits(model, tokens)).abs().max().item() <= LOGITS_ATOL


def test_exporting_converted_gpt2_small_rebuilds_the_hf_model_bit_for_bit():
    case = build_case("gpt2-small")
    model = hf_model_from_state_dict(case.config, to_hf_state_dict(case.params, case.config))
    assert torch.equal(hf_logits(model, case.tokens), case.hf_logits)


def test_to_hf_state_dict_transposes_conv1d_ties_head_and_is_contiguous():
    config = CASES["odd-5-heads"]
    params = random_params(config, seed=0)
    state = to_hf_state_dict(params, config)
    assert set(state) == {"transformer." + n for n in params} | {"lm_head.weight"}
    assert all(t.is_contiguous() for t in state.values())
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        name = f"h.1.{layer}.weight"
        assert torch.equal(state["transformer." + name], params[name].t())
    assert torch.equal(state["transformer.wpe.weight"], params["wpe.weight"])


@pytest.mark.parametrize("name", ["odd-3-heads", "odd-5-heads"])
def test_save_then_from_pretrained_gives_same_logits(name, tmp_path):
    config = CASES[name]
    params = random_params(config, seed=4)
    save(params, config, tmp_path / "model")
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    assert written["model_type"] == "gpt2" and written["architectures"] == ["GPT2LMHeadModel"]
    assert "lm_head.weight" not in load_file(tmp_path / "model" / "model.safetensors")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "model", attn_implementation="eager")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    tokens = tokens_for(config, seq=config.block_size, seed=5)
    ours = gpt_fn.forward(params, tokens, config)
    assert (ours - hf_logits(model, tokens)).abs().max().item() <= LOGITS_ATOL


# --- round trips and bad state dicts ----------------------------------------------------------

small_configs = st.builds(
    lambda heads, d_head, layers, vocab, block: GPTConfig(
        vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads, n_embd=heads * d_head
    ),
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 130),
    st.integers(1, 20),
)


@settings(max_examples=25, deadline=None)
@given(config=small_configs, seed=st.integers(0, 2**16))
def test_from_hf_inverts_to_hf_exactly(config, seed):
    params = random_params(config, seed=seed)
    back = from_hf_state_dict(to_hf_state_dict(params, config), config)
    assert list(back) == list(params)
    assert all(torch.equal(back[name], params[name]) for name in params)


def test_to_hf_inverts_from_hf_exactly(case):
    state = case.model.state_dict()
    again = to_hf_state_dict(case.params, case.config)
    assert set(again) == set(state)
    assert all(torch.equal(again[key], state[key]) for key in state)


def test_from_hf_accepts_unprefixed_keys_and_skips_mask_buffers():
    config = CASES["odd-3-heads"]
    state = to_hf_state_dict(random_params(config, seed=0), config)
    # The layout of OpenAI's original checkpoint on the Hub: no prefix, no head, mask buffers.
    original = {k.removeprefix("transformer."): v for k, v in state.items() if "lm_head" not in k}
    for i in range(config.n_layer):
        original[f"h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
        original[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    params = from_hf_state_dict(original, config)
    assert list(params) == list(param_shapes(config))
    assert torch.equal(params["h.1.mlp.c_fc.weight"], original["h.1.mlp.c_fc.weight"].t())


def test_missing_key_raises_naming_it():
    config = CASES["odd-3-heads"]
    state = to_hf_state_dict(random_params(config, seed=0), config)
    del state["transformer.h.1.mlp.c_proj.bias"]
    with pytest.raises(KeyError, match=r"h\.1\.mlp\.c_proj\.bias"):
        from_hf_state_dict(state, config)


def test_wrong_shape_raises_naming_the_key():
    config = CASES["odd-3-heads"]
    state = to_hf_state_dict(random_params(config, seed=0), config)
    # Our (out, in) layout where HF expects Conv1D's (in, out): the classic conversion bug.
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t()
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight.*\(72, 24\).*\(24, 72\)"):
        check_hf_state_dict(state, config)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight"):
        from_hf_state_dict(state, config)


def test_unexpected_key_untied_head_and_duplicate_prefix_raise():
    config = CASES["odd-3-heads"]
    state = to_hf_state_dict(random_params(config, seed=0), config)
    with pytest.raises(KeyError, match=r"h\.2\.ln_1\.weight"):
        from_hf_state_dict({**state, "transformer.h.2.ln_1.weight": torch.ones(24)}, config)
    with pytest.raises(ValueError, match="lm_head"):
        from_hf_state_dict({**state, "lm_head.weight": torch.zeros(101, 24)}, config)
    with pytest.raises(ValueError, match=r"wpe\.weight"):
        from_hf_state_dict({**state, "wpe.weight": state["transformer.wpe.weight"]}, config)


# --- load / save directories ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A `save_pretrained` directory of a small random model, and that model."""
    config = CASES["odd-5-heads"]
    model = random_hf_model(config, seed=7)
    directory = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(directory)
    return directory, model


def test_load_reads_a_save_pretrained_directory(pretrained_dir):
    directory, model = pretrained_dir
    params, config = load(directory)
    assert config == CASES["odd-5-heads"]
    tokens = tokens_for(config, seq=config.block_size)
    assert (gpt_fn.forward(params, tokens, config) - hf_logits(model, tokens)).abs().max() <= (
        LOGITS_ATOL
    )


def test_load_reads_pytorch_model_bin_with_original_key_layout(pretrained_dir, tmp_path):
    # transformers 5 always writes safetensors, so write the legacy .bin checkpoint ourselves,
    # in OpenAI's layout: no prefix, no lm_head, with the attention-mask buffers.
    directory, model = pretrained_dir
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    del state["lm_head.weight"]
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    params, config = load(tmp_path)
    expected, _ = load(directory)
    assert all(torch.equal(params[name], expected[name]) for name in expected)


def test_load_reads_sharded_safetensors(tmp_path):
    config = CASES["odd-5-heads"]
    model = random_hf_model(config, seed=8)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    params, _ = load(tmp_path)
    expected = from_hf_state_dict(model.state_dict(), config)
    assert all(torch.equal(params[name], expected[name]) for name in expected)


def test_load_casts_to_dtype(pretrained_dir):
    params, _ = load(pretrained_dir[0], dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())


def test_save_then_load_round_trips_exactly(tmp_path):
    config = CASES["odd-3-heads"]
    params = random_params(config, seed=9)
    save(params, config, tmp_path)
    loaded, loaded_config = load(tmp_path)
    assert loaded_config == config
    assert all(torch.equal(loaded[name], params[name]) for name in params)


def test_load_hub_name_offline_fails_quickly_and_clearly(monkeypatch, tmp_path):
    # huggingface_hub reads these at import time, so patch its constants, not only the env;
    # an empty cache makes sure nothing cached can answer.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no local directory called "gpt2"
    start = time.monotonic()
    with pytest.raises(OSError, match=r"'gpt2' is not a local directory.*Hugging Face Hub"):
        load("gpt2")
    assert time.monotonic() - start < 30, "offline load must fail, not hang"


def test_load_hub_name_with_an_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    # Without HF_HUB_OFFLINE, huggingface_hub itself would retry for ~25 s, printing each try.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(OSError, match=r"'gpt2' is not a local directory.*cannot reach 127.0.0.1"):
        load("gpt2")
    assert time.monotonic() - start < 10


def test_load_names_truncated_weights_and_an_index_without_a_weight_map(pretrained_dir, tmp_path):
    directory = pretrained_dir[0]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    weights = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="index.json has no weight_map"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a list, not a JSON object"):
        load(tmp_path)


def test_save_writes_gpt2s_tokenizer_when_the_vocab_holds_it(tmp_path):
    from transformers import AutoTokenizer

    from gpt_fn.tokenizer import gpt2

    config = GPTConfig(vocab_size=50304, block_size=32, n_layer=1, n_head=2, n_embd=16)
    save(random_params(config, seed=0), config, tmp_path / "padded")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "padded")
    text = "ROMEO:\n  What's <|endoftext|> this\tthé 🤖 1234"
    assert tokenizer(text)["input_ids"] == gpt2().encode(text, allowed_special="all")
    assert tokenizer.eos_token_id == 50256 and tokenizer.model_max_length == 32
    small = CASES["odd-3-heads"]  # a 101-token vocabulary: GPT-2's tokenizer does not fit
    save(random_params(small, seed=0), small, tmp_path / "small")
    assert not (tmp_path / "small" / "vocab.json").exists()


def test_load_hub_name_without_huggingface_hub_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="pip install huggingface_hub"):
        load("gpt2")


def test_load_missing_path_and_incomplete_directory_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load("./nowhere/at/all")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf_dict(CASES["odd-3-heads"])))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path)
    with pytest.raises(NotADirectoryError):
        load(tmp_path / "config.json")
