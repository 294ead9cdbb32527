"""Smoke tests of experiments/: each script's `main` in quick mode writes sane results.

The scripts are loaded from their files (experiments/ is a folder of scripts, not a package;
the `experiments.conventions` they share imports because pytest puts the repository root on
the path) and run in-process into `tmp_path`, sharing one prepared copy of the Shakespeare
corpus. Timings are recorded by the experiments but never asserted here.
"""

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

import gpt_fn
from gpt_fn import hf, optim
from gpt_fn.checkpoint import load_series
from gpt_fn.rundir import read_metrics
from gpt_fn.tokenizer import single_token

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# ln(50304): the loss of a uniform guess over the padded GPT-2 vocabulary, where every
# quick run starts; a few steps cannot move far from it.
UNIFORM_LOSS = math.log(50304)


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"experiments.{name}", EXPERIMENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """The scripts set torch's thread count (and gpt2_logits seeds torch's global generator)
    as a command should; the tests after these must not inherit either."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "shakespeare"


def read_results(out: Path, name: str) -> dict:
    assert (out / f"{name}.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name and results["quick"] is True
    return results


# SDPA's CPU flash kernel has no vmap batching rule: torch warns and loops, as the script says.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_ensemble_vmap_trains_like_separate_runs(tmp_path, data_dir):
    experiment = load("ensemble_vmap")
    out = tmp_path / "ensemble"
    result = experiment.main(["--quick", "--out", str(out), "--data-dir", str(data_dir)])
    assert read_results(out, "ensemble_vmap")["kernels"].keys() == {"sdpa", "manual"}
    assert result["within_tolerance"]
    for entry in result["kernels"].values():
        losses = torch.tensor(entry["vmap_losses"])
        assert losses.shape == (result["steps"], result["models"])
        assert torch.isfinite(losses).all() and (losses - UNIFORM_LOSS).abs().max() < 1.0
        assert entry["max_abs_loss_diff"] <= experiment.LOSS_TOLERANCE
        # Members differ in init and data: their losses are not copies of each other.
        assert (losses[:, 0] != losses[:, 1]).any()
        # Same eval rows, trained params equal up to fp32 noise: same val loss per member.
        assert entry["vmap_val_loss"] == pytest.approx(entry["sequential_val_loss"], abs=1e-4)
        assert entry["vmap_ms_per_step"] > 0 and entry["sequential_ms_per_step"] > 0


def test_vmapped_step_equals_a_step_per_member(tiny_config):
    experiment = load("ensemble_vmap")
    optimizer = optim.adamw(1e-2)
    step = experiment.make_step(tiny_config, optimizer, "manual")
    members = [gpt_fn.init_params(tiny_config, seed=seed) for seed in (0, 1)]
    x = torch.randint(
        0, tiny_config.vocab_size, (2, 3, 8), generator=torch.Generator().manual_seed(0)
    )
    y = x.roll(-1, dims=-1)
    dims = {name: None if name == "step" else 0 for name in optimizer.init(members[0])}
    stacked = experiment.stack(members)
    state = torch.func.vmap(optimizer.init, out_dims=dims)(stacked)
    new, new_state, losses = torch.func.vmap(step, in_dims=(0, dims, 0, 0), out_dims=(0, dims, 0))(
        stacked, state, x, y
    )
    assert new_state["step"].shape == ()  # one counter for the ensemble
    for i, params in enumerate(members):
        alone, _, loss = step(params, optimizer.init(params), x[i], y[i])
        # fp32: batched matmuls may sum in another order; Adam's first step is lr * sign(g)
        # for most entries, so params differ by far less than lr = 1e-2.
        torch.testing.assert_close(losses[i], loss, rtol=0, atol=1e-5)
        for name, value in new.items():
            torch.testing.assert_close(value[i], alone[name], rtol=0, atol=1e-4)


def test_attention_kernels_give_the_same_training_curve(tmp_path, data_dir):
    experiment = load("attention_kernels")
    out = tmp_path / "kernels"
    result = experiment.main(["--quick", "--out", str(out), "--data-dir", str(data_dir)])
    assert read_results(out, "attention_kernels")["runs"].keys() == {"sdpa", "manual"}
    for kernel in ("sdpa", "manual"):
        run = result["runs"][kernel]
        assert len(run["loss"]) == result["settings"]["max_steps"]
        assert all(abs(loss - UNIFORM_LOSS) < 1.0 for loss in run["loss"] + run["val_loss"])
        assert run["tokens_per_s_median"] > 0 and result["attention_layer_ms"][kernel] > 0
        assert (out / kernel / "metrics.jsonl").is_file()
    # The kernels round differently (fp32) and nothing else differs between the runs.
    assert result["max_abs_train_loss_diff"] < 1e-4
    assert result["max_abs_val_loss_diff"] < 1e-4


def test_lr_schedules_sweep_runs_every_shape(tmp_path, data_dir):
    experiment = load("lr_schedules")
    out = tmp_path / "schedules"
    result = experiment.main(
        ["--quick", "--seeds", "2", "--out", str(out), "--data-dir", str(data_dir)]
    )
    assert read_results(out, "lr_schedules")["ranking"] == result["ranking"]
    assert set(result["ranking"]) == set(experiment.schedules(1e-3, 10))
    peak = result["peak_lr"]
    for name, run in result["runs"].items():
        assert len(run["lr"]) == result["steps"]
        assert [len(losses) for losses in run["train_loss_by_seed"]] == [result["steps"]] * 2
        assert max(run["lr"]) <= peak * (1 + 1e-12), name  # float rounding at the peak
        assert run["val_steps"][0] == 0 and run["val_steps"][-1] == result["steps"]
        assert all(abs(v - UNIFORM_LOSS) < 1.0 for v in run["val_loss"]), name
        assert run["final_val_loss"] == pytest.approx(sum(run["final_val_loss_by_seed"]) / 2)
    # For a seed every schedule starts from the same init: the same val loss before step 1;
    # the two seeds' inits differ.
    first_evals = {
        tuple(row[0] for row in run["val_loss_by_seed"]) for run in result["runs"].values()
    }
    assert len(first_evals) == 1 and len(set(first_evals.pop())) == 2
    assert result["runs"]["constant"]["lr"] == [peak] * result["steps"]


def test_schedules_have_their_shapes():
    experiment = load("lr_schedules")
    peak, steps = 1e-3, 100
    shapes = experiment.schedules(peak, steps)
    for name in ("warmup + constant", "warmup + linear decay", "warmup-stable-decay"):
        assert shapes[name](0) == 0.0 and shapes[name](10) == pytest.approx(peak), name
    for name in ("warmup + cosine", "warmup + linear decay", "warmup-stable-decay"):
        assert shapes[name](steps) == pytest.approx(peak / 10), name
    assert shapes["cosine, no warmup"](0) == peak
    # warmup-stable-decay holds the peak until the last fifth, then falls linearly.
    assert shapes["warmup-stable-decay"](79) == shapes["warmup-stable-decay"](80) == peak
    assert shapes["warmup-stable-decay"](90) == pytest.approx((peak + peak / 10) / 2)


def test_linear_decay_interpolates_and_validates():
    linear_decay = load("lr_schedules").linear_decay
    schedule = linear_decay(1.0, 0.5, 4)
    assert [schedule(s) for s in range(6)] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    with pytest.raises(ValueError, match="final_lr"):
        linear_decay(0.1, 0.2, 4)
    with pytest.raises(ValueError, match="decay_steps"):
        linear_decay(0.2, 0.1, 0)
    with pytest.raises(ValueError, match="init_lr"):
        linear_decay(float("nan"), 0.1, 4)
    with pytest.raises(ValueError, match="step"):
        schedule(-1)


def test_gpt2_logits_match_transformers_for_both_kernels(tmp_path):
    out = tmp_path / "logits"
    result = load("gpt2_logits").main(["--quick", "--out", str(out)])
    assert read_results(out, "gpt2_logits")["comparisons"].keys() == {"eager", "sdpa"}
    for by_kernel in result["comparisons"].values():
        assert by_kernel.keys() == {"sdpa", "manual"}
        for entry in by_kernel.values():
            # Random weights give logits of order 1: fp32 rounding is ~1e-7 of that.
            assert entry["max_abs_diff"] < 1e-5
            assert entry["argmax_agreement"] == 1.0


def test_gpt2_logits_reads_weights_from_a_directory(tmp_path):
    config = gpt_fn.GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)
    hf.save(gpt_fn.init_params(config, seed=3), config, tmp_path / "weights")
    out = tmp_path / "logits"
    result = load("gpt2_logits").main(
        ["--quick", "--weights", str(tmp_path / "weights"), "--out", str(out)]
    )
    assert result["weights"] == str(tmp_path / "weights")
    assert result["config"] == config.to_dict()
    assert max(e["max_abs_diff"] for k in result["comparisons"].values() for e in k.values()) < 1e-5


def test_speculative_decoding_measures_both_decoders_and_the_k_sweep(tmp_path, data_dir):
    experiment = load("speculative_decoding")
    out = tmp_path / "speculative"
    result = experiment.main(["--quick", "--out", str(out), "--data-dir", str(data_dir)])
    assert read_results(out, "speculative_decoding")["k"] == result["k"] == 4
    settings = result["measurements"]["settings"]
    assert {(e["batch"], e["mode"]) for e in settings} == {
        (b, m) for b in experiment.BATCHES for m in experiment.MODES
    }
    for entry in settings:
        assert entry["tokens_per_s"]["plain"] > 0 and entry["tokens_per_s"]["speculative"] > 0
        assert 0 <= entry["acceptance_rate"] <= 1 and entry["predicted_speedup"] > 0
        if entry["mode"] == "greedy":  # the target's greedy tokens, row for row
            assert entry["identical_rows"] == max(experiment.BATCHES)
    assert {e["k"] for e in result["k_sweep"]} == {1, 2}
    assert (out / "target" / "metrics.jsonl").is_file() and (out / "draft").is_dir()
    # One token per round (nothing accepted) at 3 target steps' cost; five for free.
    assert experiment.predicted_speedup(1.0, 4, 0.5) == pytest.approx(1 / 3)
    assert experiment.predicted_speedup(5.0, 4, 0.0) == 5


@pytest.mark.parametrize(
    "name",
    [
        "ensemble_vmap",
        "attention_kernels",
        "lr_schedules",
        "gpt2_logits",
        "speculative_decoding",
        "sae_features",
        "ioi_patching",
    ],
)
def test_every_experiment_takes_the_shared_options(name, capsys, tmp_path):
    experiment = load(name)
    options = ["--quick", "--seed", "3", "--out", str(tmp_path)]
    if name not in ("gpt2_logits", "ioi_patching"):  # no prepared tokens read
        options += ["--data-dir", str(tmp_path / "data")]
    # --threads 0 is refused after the other options parse, before anything runs.
    with pytest.raises(SystemExit):
        experiment.main([*options, "--threads", "0"])
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_induction_heads_scores_every_head_and_ablates(tmp_path):
    experiment = load("induction_heads")
    out = tmp_path / "induction"
    result = experiment.main(["--quick", "--out", str(out)])
    assert read_results(out, "induction_heads")["steps"] == 30
    scores = torch.tensor(result["induction_scores"])
    assert scores.shape == (2, 4) and bool(((scores >= 0) & (scores <= 1)).all())
    assert (
        len(result["induction_heads"]) == 2 and result["induction_heads"] != result["control_heads"]
    )
    assert all(math.isfinite(v) for v in result["loss"].values())


def test_repeated_sequences_copy_a_segment_of_varying_length():
    experiment = load("induction_heads")
    repeats = experiment.repeated_sequences(64, torch.Generator().manual_seed(0))
    assert len(set(repeats.period.tolist())) > 5  # no fixed offset to copy by position
    for tokens, period in zip(repeats.tokens, repeats.period.tolist(), strict=True):
        assert torch.equal(tokens[period : 2 * period], tokens[:period])
    first, copy = experiment.copy_masks(repeats)
    assert not bool((first & copy).any())


def test_training_dynamics_reads_a_series_with_one_vmapped_call(tmp_path, data_dir):
    experiment = load("training_dynamics")
    out = tmp_path / "dynamics"
    result = experiment.main(["--quick", "--out", str(out), "--data-dir", str(data_dir)])
    assert read_results(out, "training_dynamics")["steps"] == [1, 2, 4]
    run = out / "run"
    # The vmapped val loss of the last kept step is the training loop's own eval of that step
    # (the same batches; the loop's fused sdpa against manual attention here: ~1e-6).
    logged = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert result["val_loss"][-1] == pytest.approx(logged[-1], abs=1e-5)
    assert all(abs(v - UNIFORM_LOSS) < 0.2 for v in result["val_loss"])
    # The induction score (attention_mass on induction_keys) is the mean attention of the
    # copy's queries t to key t - L + 1.
    series = load_series(run)
    length = series.model_config.block_size // 2
    repeated = experiment.copies(experiment.COPIES, length, torch.Generator().manual_seed(0))
    params = {k: v[0] for k, v in series.params.items()}
    _, cache = gpt_fn.run_with_cache(params, repeated, series.model_config)
    pattern = cache["h.0.attn.pattern"]  # (batch, head, query, key)
    expected = torch.stack(
        [pattern[:, :, t, t - length + 1] for t in range(length, 2 * length)], dim=-1
    ).mean((0, 2))
    torch.testing.assert_close(torch.tensor(result["induction_scores"][0][0]), expected)
    again = experiment.main(["--quick", "--out", str(tmp_path / "again"), "--run", str(run)])
    assert again["val_loss"] == result["val_loss"] and again["steps"] == result["steps"]


def test_attribution_patching_maps_every_head(tmp_path):
    experiment = load("attribution_patching")
    out = tmp_path / "attribution"
    result = experiment.main(["--quick", "--out", str(out)])
    assert read_results(out, "attribution_patching")["examples"] == 16
    for name in ("activation_patching", "attribution_patching"):
        assert torch.tensor(result[name]).shape == (2, 4)
    assert -1 <= result["pearson"] <= 1 and result["clean_metric"] > result["corrupted_metric"]


def test_ioi_patching_maps_heads_and_positions_of_weights_from_a_directory(tmp_path):
    experiment = load("ioi_patching")
    config = gpt_fn.GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=32)
    params = gpt_fn.init_params(config, seed=5)
    hf.save(params, config, tmp_path / "weights")
    out = tmp_path / "ioi"
    result = experiment.main(["--quick", "--hf", str(tmp_path / "weights"), "--out", str(out)])
    assert read_results(out, "ioi_patching")["model"].startswith("GPT-2 weights from")
    assert (out / "resid_pre.png").stat().st_size > 0
    seq = len(result["tokens"])
    assert torch.tensor(result["heads"]).shape == (config.n_layer, config.n_head)
    assert torch.tensor(result["resid_pre"]).shape == (config.n_layer, seq)
    # The corrupted prompts are the clean ones with the answers swapped: the metric flips.
    assert result["corrupted_logit_difference"] == pytest.approx(
        -result["clean_logit_difference"], abs=1e-6
    )
    # The stream entering block 0 is the embedding, which clean and corrupted share except at
    # the names (positions 1, 3 and 9): patching any other position there changes nothing.
    resid = torch.tensor(result["resid_pre"])
    unchanged = [p for p in range(seq) if p not in (1, 3, 9)]
    torch.testing.assert_close(
        resid[0, unchanged],
        torch.full((len(unchanged),), result["corrupted_logit_difference"]),
        rtol=0, atol=1e-6,
    )  # fmt: skip
    # A random model's gap is noise: the maps stay raw; the top head agrees with a hooked run.
    assert result["heads_restored"] is None and result["top_head_check"]["max_abs_diff"] < 1e-5
    # The DLA rows (heads, remainder, ln_f.bias) sum to the clean logit difference: 1e-5 on a
    # sum of ~10 fp32 terms.
    assert result["dla_total"] == pytest.approx(result["clean_logit_difference"], abs=1e-5)
    assert torch.tensor(result["dla_heads"]).shape == (config.n_layer, config.n_head)
    assert (out / "dla_heads.png").stat().st_size > 0


def test_ioi_training_batches_ask_for_the_name_said_once():
    experiment = load("ioi_patching")
    x, y = experiment.training_batch(16, torch.Generator().manual_seed(0))
    names = [single_token(n) for n in experiment.NAMES]
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        first, second, repeated = row[1], row[3], row[9]  # "When A and B ..., B gave ..."
        assert {first, second} <= set(names) and first != second and repeated == second
        assert target[-1] == first and set(target[:-1]) == {-100}  # only the answer is scored


def test_ioi_toy_model_trains_on_the_answer_alone():
    experiment = load("ioi_patching")
    params, losses = experiment.train_toy(3, seed=0)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # a few steps from ln(50257) already move towards the names
    assert set(params) == set(gpt_fn.init_params(experiment.TOY_CONFIG, seed=0))


def test_per_example_grads_equal_the_loop(tmp_path, data_dir):
    experiment = load("per_example_grads")
    out = tmp_path / "per_example"
    result = experiment.main(["--quick", "--out", str(out), "--data-dir", str(data_dir)])
    assert read_results(out, "per_example_grads")["batch"] == 4
    for entry in result["kernels"].values():
        # fp32 sums in another grouping (batched matmuls): far below the gradients' ~1e-2.
        assert entry["max_abs_grad_diff"] < 1e-6 and entry["max_abs_norm_diff"] < 1e-5
        assert len(entry["norms"]) == 4 and min(entry["norms"]) > 0


def test_muon_vs_adamw_runs_both_optimizers_through_the_training_loop(tmp_path, data_dir):
    experiment = load("muon_vs_adamw")
    out = tmp_path / "muon"
    result = experiment.main(
        ["--quick", "--out", str(out), "--data-dir", str(data_dir), "--adamw-lrs", "1e-3",
         "--muon-lrs", "0.02"]
    )  # fmt: skip
    assert read_results(out, "muon_vs_adamw")["steps"] == 3
    assert {r["optimizer"] for r in result["runs"]} == {"adamw", "muon"}
    for run in result["runs"]:
        assert run["val_steps"][-1] == 3 and abs(run["final_val_loss"] - UNIFORM_LOSS) < 1.0
        assert (out / f"{run['optimizer']}-{run['lr']:g}" / "metrics.jsonl").is_file()


def test_sae_features_measures_every_sae_and_reads_features(tmp_path, data_dir):
    experiment = load("sae_features")
    out = tmp_path / "sae"
    result = experiment.main(["--quick", "--out", str(out), "--data-dir", str(data_dir)])
    assert read_results(out, "sae_features")["site"] == result["site"] == "h.0.resid_post"
    assert {(e["d_sae"], e["k"]) for e in result["saes"]} == {(64, 2), (64, 4), (128, 2), (128, 4)}
    for entry in result["saes"]:
        assert 0 < entry["l0"] <= entry["k"] and entry["explained_variance"] <= 1
        assert math.isfinite(entry["ce_loss_recovered"])
    assert len(result["features"]) == experiment.FEATURES
    assert all(example["text"] for entry in result["features"] for example in entry["top"])
