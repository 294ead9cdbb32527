"""The lm-evaluation-harness adapter against lm-eval's own `hf` model, offline.

One random GPT-2 (GPT-2's tokenizer, so lm-eval's `hf` model can read it) is saved twice: as
a gpt_fn checkpoint with the vocabulary padded to 50304, and exported with `hf.save`, cropped
to the tokenizer's 50257 ids. Three local tasks (YAML over jsonl files written here) cover
`loglikelihood` (multiple choice), `loglikelihood_rolling` (perplexity) and `generate_until`;
`lm_eval.simple_evaluate` runs each model over them once per module.
"""

import json
import math
import os
import runpy
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gpt_fn import GPTConfig, cli, hf, init_params, sampling  # noqa: E402
from gpt_fn import eval as evaluation  # noqa: E402
from gpt_fn.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from gpt_fn.harness import GPTFnLM  # noqa: E402
from gpt_fn.hooks import load_hooks  # noqa: E402
from gpt_fn.tokenizer import EOT_TOKEN, gpt2  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Per request, both sum fp32 log-probs of the same tokens from models that agree to ~1e-6
# per token (test_hf.py); a rolling document sums ~150 of them. Measured: <= 3e-6 per
# multiple-choice request, 2.5e-5 on a rolling sum of -983.
LOGPROB = {"rel": 1e-6, "abs": 1e-4}
CONTEXTS = [
    "The cat sat on the",
    "She opened the door and ",  # a trailing space moves into the continuation
    "",  # an empty context is <|endoftext|>
    "Café owners in Paris said that",
    "ROMEO:\nBut, soft! what light through yonder window breaks? It is the east, and",
    "In 1492, a sailor",
]
ENDINGS = [
    ["mat.", "moon today", "piano and sang", "dog"],
    ["walked in.", "flew away", "é café", "x"],
    ["Hello there.", "Goodbye", "¿Qué?", "a b c d e f"],
    ["the coffee was cold.", "prices rose", "naïve", "ok"],
    ["Juliet is the sun.", "it rains", "the moon", "nothing at all here"],
    ["sailed west.", "sat", "found nothing", "went home to sleep"],
]
DOCUMENTS = [
    ("Hello world. It is a fine day, and the sun is out over the hills. " * 6).strip(),
    "A short text.",
    "Naïve café — ñ and Æ in one line.\nAnd a second line after it.",
]
TASKS = ["toy_mc", "toy_wiki", "toy_gen"]
MAX_GEN_TOKS = 12


def spread_params(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights of std 1/sqrt(n_embd): random predictions that depend on the context, and
    greedy generations that wander instead of repeating one token."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, value in init_params(config, seed=seed).items():
        noise = torch.randn(value.shape, generator=generator)
        if name.endswith(".bias"):
            params[name] = 0.05 * noise
        elif value.ndim == 1:
            params[name] = 1.0 + 0.1 * noise
        else:
            params[name] = noise / math.sqrt(config.n_embd)
    return params


def task_yaml(name: str, data: str, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("harness")
    config = GPTConfig(vocab_size=50304, block_size=48, n_layer=2, n_head=2, n_embd=32)
    params = spread_params(config, seed=0)
    save_checkpoint(root / "ckpt", Checkpoint(params, {}, 7, config, {}))
    cropped = GPTConfig(**{**config.to_dict(), "vocab_size": 50257})
    cropped_params = {**params, "wte.weight": params["wte.weight"][:50257].clone()}
    hf.save(cropped_params, cropped, root / "hf")

    items = [
        {"ctx": c, "endings": e, "label": i % 4}
        for i, (c, e) in enumerate(zip(CONTEXTS, ENDINGS, strict=True))
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    # Generation prompts: the contexts but the empty one (lm-eval's hf model generates from a
    # row of padding there, gpt_fn from <|endoftext|>).
    prompts = [{"ctx": c, "endings": e} for c, e in zip(CONTEXTS, ENDINGS, strict=True) if c]
    (root / "gen.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    docs = "".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS)
    (root / "wiki.jsonl").write_text(docs)
    # A stop string the model really produces, so generation stops mid-way (and across a
    # token boundary where the text has one): take it from the model's own greedy output.
    prompt = gpt2().encode(CONTEXTS[0])
    (row,) = sampling.generate(
        cropped_params, [prompt], cropped, max_new_tokens=MAX_GEN_TOKS, greedy=True
    )
    generated = gpt2().decode(row[len(prompt) :])
    stop = generated[len(generated) // 2 : len(generated) // 2 + 2]
    assert stop.strip() and generated.index(stop) > 0, generated

    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        task_yaml(
            "toy_mc",
            root / "mc.jsonl",
            'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\n'
            'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
            "  - metric: acc_bytes\n",
        )
    )
    (tasks / "wiki.yaml").write_text(
        task_yaml(
            "toy_wiki",
            root / "wiki.jsonl",
            'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n",
        )
    )
    (tasks / "gen.yaml").write_text(
        task_yaml(
            "toy_gen",
            root / "gen.jsonl",
            'output_type: generate_until\ndoc_to_text: "{{ctx}}"\n'
            'doc_to_target: "{{endings[0]}}"\ngeneration_kwargs:\n'
            f"  until: [{json.dumps(stop)}]\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n",
        )
    )
    # Without lm-eval's thousands of built-in task YAMLs: indexing them takes ~7 s.
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    runs = {}
    for name, model, args in [
        ("hf", "hf", f"pretrained={root / 'hf'},dtype=float32"),
        ("gpt_fn", "gpt_fn", f"checkpoint={root / 'ckpt'}"),
    ]:
        runs[name] = lm_eval.simple_evaluate(
            model=model,
            model_args=args,
            tasks=TASKS,
            task_manager=manager,
            batch_size=3,
            device="cpu",
            log_samples=True,
        )
    return {"root": root, "runs": runs, "stop": stop, "params": params, "config": config}


def responses(run, task):
    return [sample["filtered_resps"] for sample in run["samples"][task]]


def test_gpt_fn_is_registered_with_lm_eval():
    assert get_model("gpt_fn") is GPTFnLM and get_model("gpt-fn") is GPTFnLM


def test_multiple_choice_scores_equal_lm_evals_hf_model(setup):
    ours, theirs = setup["runs"]["gpt_fn"], setup["runs"]["hf"]
    for ours_item, theirs_item in zip(
        responses(ours, "toy_mc"), responses(theirs, "toy_mc"), strict=True
    ):
        for (logprob, greedy), (expected, expected_greedy) in zip(
            ours_item, theirs_item, strict=True
        ):
            assert logprob == pytest.approx(expected, **LOGPROB)
            assert greedy == expected_greedy
    for metric in ("acc,none", "acc_norm,none", "acc_bytes,none"):
        assert ours["results"]["toy_mc"][metric] == theirs["results"]["toy_mc"][metric]


def test_rolling_perplexities_equal_lm_evals_hf_model(setup):
    ours, theirs = setup["runs"]["gpt_fn"], setup["runs"]["hf"]
    our_sums = [r[0] if isinstance(r, list | tuple) else r for r in responses(ours, "toy_wiki")]
    their_sums = [r[0] if isinstance(r, list | tuple) else r for r in responses(theirs, "toy_wiki")]
    # The first document is longer than the model's window: several rolling windows.
    assert len(gpt2().encode(DOCUMENTS[0])) > 2 * setup["config"].block_size
    assert our_sums == pytest.approx(their_sums, **LOGPROB)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        ours_value = ours["results"]["toy_wiki"][metric]
        assert ours_value == pytest.approx(theirs["results"]["toy_wiki"][metric], rel=1e-6)


def test_generations_equal_lm_evals_hf_model_and_stop_at_the_stop_string(setup):
    ours, theirs = setup["runs"]["gpt_fn"], setup["runs"]["hf"]
    our_texts = [r[0] if isinstance(r, list) else r for r in responses(ours, "toy_gen")]
    their_texts = [r[0] if isinstance(r, list) else r for r in responses(theirs, "toy_gen")]
    assert our_texts == their_texts
    # The first prompt's generation was cut before the stop string it produced.
    assert our_texts[0] and setup["stop"] not in our_texts[0]
    assert all(len(gpt2().encode(t)) <= MAX_GEN_TOKS for t in our_texts)


def test_gpt_fn_eval_multiple_choice_equals_lm_evals_hf_model(setup):
    """`gpt_fn.eval.multiple_choice` (what `gpt-fn eval --choices` runs) over the jsonl file
    scores as lm-eval's `hf` model does the same items as a multiple-choice task."""
    items = evaluation.read_choices(setup["root"] / "mc.jsonl")
    result = evaluation.multiple_choice(
        setup["params"], items, setup["config"], batch_size=5, vocab_size=50257
    )
    theirs = setup["runs"]["hf"]
    expected = [[ll for ll, _ in item] for item in responses(theirs, "toy_mc")]
    for ours_item, theirs_item in zip(result.logprobs, expected, strict=True):
        assert list(ours_item) == pytest.approx(theirs_item, **LOGPROB)
    assert result.acc == theirs["results"]["toy_mc"]["acc,none"]
    assert result.acc_norm == theirs["results"]["toy_mc"]["acc_norm,none"]
    assert result.acc_bytes == theirs["results"]["toy_mc"]["acc_bytes,none"]


def test_a_hf_directory_scores_as_the_checkpoint_does(setup):
    request = Instance(
        request_type="loglikelihood",
        doc={},
        arguments=("The cat sat on the", " mat."),
        idx=0,
    )
    from_checkpoint = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu")
    from_hf = GPTFnLM(hf=str(setup["root"] / "hf"), device="cpu", batch_size="4")
    (ours,), (theirs,) = (lm.loglikelihood([request]) for lm in (from_checkpoint, from_hf))
    assert ours[0] == pytest.approx(theirs[0], abs=1e-5) and ours[1] == theirs[1]
    assert from_hf.max_length == 48 and from_hf.batch_size == 4
    assert from_checkpoint.get_model_info()["model_source"].startswith("checkpoint=")


def test_generation_never_picks_a_padded_vocabulary_id(setup):
    params = dict(setup["params"])
    wte = params["wte.weight"].clone()
    wte[50257:] = wte[:50257].abs().max() * 50  # padded rows that would win every argmax
    lm = GPTFnLM(params={**params, "wte.weight": wte}, config=setup["config"], device="cpu")
    request = Instance(
        request_type="generate_until",
        doc={},
        arguments=("Hello", {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}),
        idx=0,
    )
    (text,) = lm.generate_until([request])
    # What the model without the padded rows generates (an argmax at a padded id would have
    # no text at all: tiktoken cannot decode it).
    cropped = GPTConfig(**{**setup["config"].to_dict(), "vocab_size": 50257})
    prompt = gpt2().encode("Hello")
    (row,) = sampling.generate(
        {**params, "wte.weight": wte[:50257]}, [prompt], cropped, max_new_tokens=5, greedy=True
    )
    assert text == gpt2().decode(row[len(prompt) :]).split("\n\n")[0] and text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "exactly one of model_args checkpoint=DIR or hf=DIR"),
        ({"checkpoint": "a", "hf": "b"}, "exactly one of"),
        ({"checkpoint": "CKPT", "pretrained": "gpt2"}, r"unknown model_args \['pretrained'\]"),
        ({"checkpoint": "CKPT", "batch_size": "auto"}, "batch_size=auto is not supported"),
        ({"checkpoint": "CKPT", "max_length": 49}, "max_length=49 is more than the model's"),
        ({"checkpoint": "CKPT", "dtype": "float64"}, "dtype must be auto or one of"),
        ({"checkpoint": "CKPT", "device": "gpu"}, "unknown device 'gpu'"),
        ({"checkpoint": "missing"}, "no checkpoint at"),
        ({"checkpoint": "CKPT", "hooks": "no_such_lab:f"}, "cannot import no_such_lab"),
        ({"checkpoint": "CKPT", "hooks": {"h.2.ln_1": abs}}, "unknown activation site 'h.2.ln_1'"),
    ],
)
def test_bad_model_args_are_named(setup, args, message):
    args = {k: (str(setup["root"] / "ckpt") if v == "CKPT" else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        GPTFnLM.create_from_arg_obj(args, {} if "device" in args else {"device": "cpu"})


def test_generation_kwargs_gpt_fn_cannot_honour_are_refused(setup):
    lm = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu")
    request = Instance(
        request_type="generate_until",
        doc={},
        arguments=("Hi", {"until": ["."], "max_gen_toks": 3, "num_beams": 4}),
        idx=0,
    )
    with pytest.raises(ValueError, match=r"unsupported generation kwargs \['num_beams'\]"):
        lm.generate_until([request])
    sampled = Instance(
        request_type="generate_until",
        doc={},
        arguments=("Hi", {"until": ["."], "max_gen_toks": 3, "do_sample": True, "top_k": 5}),
        idx=0,
    )
    # Sampling is seeded: the same adapter seed gives the same text.
    first = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu", seed=3)
    second = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu", seed=3)
    assert first.generate_until([sampled]) == second.generate_until([sampled])


def run_args(setup, out):
    return [
        "--model", "gpt_fn", "--model_args", f"checkpoint={setup['root'] / 'ckpt'}",
        "--tasks", "toy_wiki", "--include_path", str(setup["root"] / "tasks"),
        "--device", "cpu", "--batch_size", "3", "--output_path", str(out),
    ]  # fmt: skip


def written_results(out):
    (path,) = out.rglob("results*.json")
    return json.loads(path.read_text())["results"]["toy_wiki"]


def test_gpt_fn_lm_eval_is_lm_evals_cli_with_gpt_fn_registered(
    setup, tmp_path, capsys, monkeypatch
):
    # lm-eval's CLI indexes its built-in tasks (~7 s); these tests need only the local ones.
    init = TaskManager.__init__
    monkeypatch.setattr(
        TaskManager,
        "__init__",
        lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "include_defaults": False}),
    )
    argv = list(sys.argv)
    assert cli.main(["lm-eval", *run_args(setup, tmp_path / "out")]) == 0
    assert sys.argv == argv  # lm-eval's CLI reads and edits sys.argv; it is put back
    expected = setup["runs"]["gpt_fn"]["results"]["toy_wiki"]
    assert written_results(tmp_path / "out")["bits_per_byte,none"] == pytest.approx(
        expected["bits_per_byte,none"], rel=1e-12
    )
    assert "toy_wiki" in capsys.readouterr().out  # lm-eval's results table


@pytest.mark.filterwarnings("ignore:'gpt_fn.harness' found in sys.modules:RuntimeWarning")
def test_python_m_gpt_fn_harness_is_lm_evals_cli_with_gpt_fn_registered(monkeypatch):
    """`python -m gpt_fn.harness ARGS` runs the module as __main__, which hands ARGS to the
    importable module's `main` (so `gpt_fn` is registered once, by that import); `main` is
    what the test above runs end to end."""
    import gpt_fn.harness

    calls = []
    monkeypatch.setattr(gpt_fn.harness, "main", lambda argv=None: calls.append(sys.argv[1:]))
    monkeypatch.setattr(sys, "argv", ["gpt_fn/harness.py", "--model", "gpt_fn", "--tasks", "x"])
    runpy.run_module("gpt_fn.harness", run_name="__main__")
    assert calls == [["--model", "gpt_fn", "--tasks", "x"]]
    assert get_model("gpt_fn") is gpt_fn.harness.GPTFnLM  # not a second class from __main__


def test_the_prefix_token_is_gpt2s_end_of_text(setup):
    lm = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu")
    assert lm.prefix_token_id == lm.eot_token_id == EOT_TOKEN
    assert lm.tok_decode([EOT_TOKEN, *gpt2().encode("Hi")]) == "Hi"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_lm_evals_default_cuda_device_falls_back_to_the_cpu_as_its_hf_model_does(setup, caplog):
    # lm-eval's CLI passes device="cuda:0" when --device is not given.
    lm = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cuda:0", dtype="auto")
    assert lm.device == torch.device("cpu") and "CUDA is not available" in caplog.text
    assert lm.params["wte.weight"].dtype == torch.float32


def test_a_requests_max_length_bounds_prompt_and_new_tokens_as_lm_evals_hf_model_does(setup):
    """lm-eval's `hf` model hands a request's `max_length` to HF's `generate`: the prompt and
    the new tokens make at most that many, whatever `max_gen_toks` says."""
    theirs = get_model("hf").create_from_arg_string(
        f"pretrained={setup['root'] / 'hf'},dtype=float32", {"batch_size": 1, "device": "cpu"}
    )
    ours = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu", batch_size=1)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 2, "max_length": 4, "do_sample": False}
    prompts = ["Hello", "The cat", "In 1492"]  # 1, 2 and 3 tokens
    requests = [
        Instance(request_type="generate_until", doc={}, arguments=(p, kwargs), idx=i)
        for i, p in enumerate(prompts)
    ]
    texts = ours.generate_until(requests)
    assert texts == theirs.generate_until(requests)
    # "Hello" is 1 token: 3 new ones, more than max_gen_toks' 2.
    two = {key: value for key, value in kwargs.items() if key != "max_length"}
    (shorter,) = ours.generate_until(
        [Instance(request_type="generate_until", doc={}, arguments=("Hello", two), idx=0)]
    )
    assert texts[0].startswith(shorter) and len(texts[0]) > len(shorter)
    too_long = Instance(
        request_type="generate_until",
        doc={},
        arguments=("one two three four", kwargs),
        idx=0,
    )
    with pytest.raises(ValueError, match="max_length=4 leaves no room to generate"):
        ours.generate_until([too_long])


def test_batch_size_in_model_args_wins_over_the_batch_size_lm_evals_cli_passes(setup):
    # What lm-eval's CLI calls: its --batch_size (1 unless given) always comes along.
    cli_flags = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    checkpoint = setup["root"] / "ckpt"
    lm = GPTFnLM.create_from_arg_string(f"checkpoint={checkpoint},batch_size=4", cli_flags)
    assert lm.batch_size == 4
    assert GPTFnLM.create_from_arg_string(f"checkpoint={checkpoint}", cli_flags).batch_size == 1
    with pytest.raises(ValueError, match="batch_size=auto is not supported"):
        GPTFnLM.create_from_arg_string(f"checkpoint={checkpoint},batch_size=auto", cli_flags)


def test_gpt_fn_lm_eval_takes_batch_size_in_model_args(setup, tmp_path, capsys, monkeypatch):
    init = TaskManager.__init__
    monkeypatch.setattr(
        TaskManager,
        "__init__",
        lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "include_defaults": False}),
    )
    args = run_args(setup, tmp_path / "out")
    model_args = args.index("--model_args") + 1
    args[model_args] += ",batch_size=auto"
    assert cli.main(["lm-eval", *args]) == 1
    assert "gpt-fn lm-eval: error: gpt_fn model: batch_size=auto is not supported" in (
        capsys.readouterr().err
    )
    args[model_args] = args[model_args].replace("auto", "4")
    assert cli.main(["lm-eval", *args]) == 0
    (results,) = (tmp_path / "out").rglob("results*.json")
    assert json.loads(results.read_text())["config"]["model_args"]["batch_size"] == 4


# --- under interventions (hooks=) -----------------------------------------------------------

STEERING = """
from gpt_fn.hooks import add_vector


def steer(params, config):
    return add_vector("h.1.resid_post", 4.0 * params["wte.weight"][7])
"""


@pytest.fixture(scope="module")
def steering(setup):
    """The hooks spec of a steering vector (4x token 7's embedding added after block 1), and
    that vector."""
    path = setup["root"] / "steering.py"
    path.write_text(STEERING)
    return f"{path}:steer", 4.0 * setup["params"]["wte.weight"][7]


def requests_of(kind, arguments):
    return [
        Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)
    ]


def test_steered_scores_equal_lm_evals_hf_model_with_a_forward_hook_adding_the_vector(
    setup, steering
):
    spec, vector = steering
    # --model_args as lm-eval's CLI passes them.
    ours = GPTFnLM.create_from_arg_string(
        f"checkpoint={setup['root'] / 'ckpt'},hooks={spec}", {"device": "cpu", "batch_size": 3}
    )
    assert ours.get_model_info()["model_hooks"] == spec
    theirs = get_model("hf")(
        pretrained=str(setup["root"] / "hf"), dtype="float32", device="cpu", batch_size=3
    )

    def add(module, inputs, output):
        if isinstance(output, tuple):  # transformers 4.x: (hidden_states, present, ...)
            return (output[0] + vector, *output[1:])
        return output + vector

    theirs.model.transformer.h[1].register_forward_hook(add)
    pairs = [(c, " " + e) for c, endings in zip(CONTEXTS, ENDINGS, strict=True) for e in endings]
    steered = ours.loglikelihood(requests_of("loglikelihood", pairs), disable_tqdm=True)
    expected = theirs.loglikelihood(requests_of("loglikelihood", pairs), disable_tqdm=True)
    # fp32 sums of a few log-probs from models that agree to ~1e-6 per token (test_hf.py);
    # measured: <= 5.7e-6.
    for (logprob, greedy), (want, want_greedy) in zip(steered, expected, strict=True):
        assert logprob == pytest.approx(want, abs=1e-5) and greedy == want_greedy
    plain = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu", batch_size=3)
    unsteered = plain.loglikelihood(requests_of("loglikelihood", pairs), disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(steered, unsteered, strict=True)) > 0.1
    documents = [(d,) for d in DOCUMENTS]
    rolling = ours.loglikelihood_rolling(requests_of("loglikelihood_rolling", documents))
    want = theirs.loglikelihood_rolling(requests_of("loglikelihood_rolling", documents))
    assert rolling == pytest.approx(want, **LOGPROB)  # ~150-token sums: 4.6e-5 on -1193


def test_steered_generation_is_sampling_generate_under_the_same_hooks(setup, steering):
    spec, _ = steering
    lm = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu", hooks=spec)
    plain = GPTFnLM(checkpoint=str(setup["root"] / "ckpt"), device="cpu")
    prompts = ["Hello", CONTEXTS[0]]
    kwargs = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    requests = requests_of("generate_until", [(p, kwargs) for p in prompts])
    texts = lm.generate_until(requests, disable_tqdm=True)
    cropped = GPTConfig(**{**setup["config"].to_dict(), "vocab_size": 50257})
    params = {**setup["params"], "wte.weight": setup["params"]["wte.weight"][:50257]}
    hooks = load_hooks(spec, params, cropped)
    for prompt, text in zip(prompts, texts, strict=True):
        tokens = gpt2().encode(prompt)
        (row,) = sampling.generate(
            params, [tokens], cropped, max_new_tokens=8, greedy=True, hooks=hooks
        )
        assert text == gpt2().decode(row[len(tokens) :]).split("\n\n")[0]
    assert texts != plain.generate_until(requests, disable_tqdm=True)
