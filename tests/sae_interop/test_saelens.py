"""SAELens interop: a folder SAELens writes loads here and encodes/decodes as SAELens does; a
folder gpt_fn writes loads in SAELens. Runs in its own venv (`pip install -e ".[sae-interop]"`,
`GPT_FN_SAE_INTEROP=1 python -m pytest tests/sae_interop`; .ci/run does both)."""

import functools
import json

import pytest
import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from benchmarks import sae as benchmark
from gpt_fn import GPTConfig
from gpt_fn.sae import SAEConfig, decode, encode, init_sae, load_sae, save_sae

# The same fp32 matmuls in the same order on the same inputs; 1e-6 leaves room for a
# different BLAS blocking between SAELens's nn.Parameter path and ours.
ATOL = 1e-6
D_IN, D_SAE = 16, 40


def saelens_sae(kind: str):
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            if name == "threshold":
                param.abs_()
    return sae


def inputs() -> torch.Tensor:
    return torch.randn(4, 7, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_a_folder_saelens_writes_encodes_and_decodes_as_saelens(tmp_path, kind):
    reference = saelens_sae(kind)
    reference.save_model(tmp_path)
    sae, config, _ = load_sae(tmp_path)
    assert config.kind == kind and (config.k == 5) == (kind == "topk")
    x = inputs()
    with torch.no_grad():
        features = reference.encode(x)
        reconstruction = reference.decode(features)
    ours = encode(sae, x, config)
    assert (ours - features).abs().max() <= ATOL
    assert (decode(sae, ours, config) - reconstruction).abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_a_folder_gpt_fn_writes_loads_in_saelens(tmp_path, kind):
    config = SAEConfig(d_in=D_IN, d_sae=D_SAE, kind=kind, k=5 if kind == "topk" else None)
    sae = init_sae(config, seed=0)
    generator = torch.Generator().manual_seed(2)
    sae["b_enc"] = torch.randn(D_SAE, generator=generator) * 0.1
    sae["b_dec"] = torch.randn(D_IN, generator=generator) * 0.1
    save_sae(tmp_path, sae, config, site="h.2.resid_post")
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == kind
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = inputs()
    with torch.no_grad():
        features = loaded.encode(x)
        reconstruction = loaded.decode(features)
    ours = encode(sae, x, config)
    assert (ours - features).abs().max() <= ATOL
    assert (decode(sae, ours, config) - reconstruction).abs().max() <= ATOL


def test_the_benchmark_times_both_trainers_for_k_1_and_4():
    toy = GPTConfig(vocab_size=101, block_size=64, n_layer=3, n_head=2, n_embd=32)
    results = benchmark.run(quick=True, threads=1, config=toy)
    assert [row["K"] for row in results["rows"]] == [1, 4]
    assert all(row["gpt_fn"] > 0 and row["SAELens"] > 0 for row in results["rows"])
    assert "| 4 |" in benchmark.markdown(results)


def test_the_benchmarks_command_writes_the_runners_files(tmp_path, monkeypatch, capsys):
    """`python benchmarks/sae.py --out DIR` as every benchmark's command: sae.json (with the
    keys every result has) and sae.md, the table also printed."""
    toy = GPTConfig(vocab_size=101, block_size=64, n_layer=3, n_head=2, n_embd=32)
    monkeypatch.setattr(benchmark, "run", functools.partial(benchmark.run, config=toy))
    benchmark.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "sae.json").read_text())
    assert result["benchmark"] == "sae" and result["torch"] == torch.__version__
    assert result["config"] == toy.to_dict() and result["threads"] == 1
    table = (tmp_path / "sae.md").read_text()
    assert "| 4 |" in table and table in capsys.readouterr().out
