"""What activation hooks cost: `hooks=None` against hook-free code, and identity hooks everywhere.

Two workloads on a 4-layer, 256-wide GPT with GPT-2's vocabulary:

- a training step's forward + backward (`gpt_fn.loss`, batch 8 x 128 tokens);
- one cached decode step (batch 1, one token over a 144-slot KV cache, the LM head included).

For each, three contenders take turns in one process: the model's own code with `hooks=None`
(what every caller runs), a *plain* copy of the same computation written straight from the
`gpt_fn.nn` layers with no hook plumbing at all, and the model with an identity hook at
every site but those computed on request (`gpt_fn.sites.ON_REQUEST_SITES`: they switch a
layer to an explicit path, a different computation). `hooks=None` must cost nothing: its
ratio to plain is within noise (at most 1.02).

    python benchmarks/hooks.py [--quick] [--threads N] [--out DIR]
"""

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt_fn
from benchmarks.run import command_line, finish
from benchmarks.timing import cpu_threads, take_turns
from gpt_fn import model
from gpt_fn.nn import embed, layer_norm, linear_cross_entropy, mlp, self_attention
from gpt_fn.nn.padding import cache_attention_mask
from gpt_fn.sampling import decoding
from gpt_fn.sampling.head import decoding_head
from gpt_fn.shapes import shape_checks
from gpt_fn.sites import ON_REQUEST_SITES

CONFIG = gpt_fn.GPTConfig(vocab_size=50257, block_size=1024, n_layer=4, n_head=4, n_embd=256)
BATCH, SEQ = 8, 128
CAPACITY = 144  # a 16-token prompt + 128 new tokens
CONTENDERS = ("plain (no hook code)", "hooks=None", "identity hooks at every site")


def run(quick: bool = False, *, threads: int | None = 1, config: gpt_fn.GPTConfig = CONFIG) -> dict:
    """Median ms of each contender in each workload, and the ratios to plain."""
    with cpu_threads(threads), shape_checks(False):
        warmup, repeats = (1, 5) if quick else (3, 31)
        params = gpt_fn.init_params(config, seed=0)
        hooks = {
            site: _identity
            for site in gpt_fn.site_names(config)
            if not site.endswith(ON_REQUEST_SITES)
        }
        workloads = {
            "train step (forward + backward)": _train_contenders(params, config, hooks),
            "decode step (batch 1)": _decode_contenders(params, config, hooks),
        }
        rows = []
        for workload, contenders in workloads.items():
            timings = take_turns(contenders, warmup + repeats, device=torch.device("cpu"))
            ms = {
                name: 1e3 * statistics.median(samples[warmup:])
                for name, samples in timings.seconds.items()
            }
            plain = ms[CONTENDERS[0]]
            rows.append(
                {
                    "workload": workload,
                    "median_ms": ms,
                    "over_plain": {n: v / plain for n, v in ms.items()},
                }
            )
    return {
        "benchmark": "hooks",
        "config": config.to_dict(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
        "rows": rows,
    }


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _train_contenders(
    params: gpt_fn.Params, config: gpt_fn.GPTConfig, hooks: gpt_fn.Hooks
) -> dict[str, Callable[[], object]]:
    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    seq = min(SEQ, config.block_size)
    tokens = torch.randint(
        0, config.vocab_size, (BATCH, seq + 1), generator=torch.Generator().manual_seed(0)
    )
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run_step() -> object:
            grads = torch.autograd.grad(loss_fn(), list(leaves.values()))
            return grads[0]

        return run_step

    return {
        CONTENDERS[0]: step(lambda: _plain_loss(leaves, x, y, config)),
        CONTENDERS[1]: step(lambda: gpt_fn.loss(leaves, x, y, config)),
        CONTENDERS[2]: step(lambda: gpt_fn.loss(leaves, x, y, config, hooks=hooks)),
    }


def _plain_loss(params, x, y, config):
    """The loss as the model computed it before sites: nn layers, no hook plumbing."""
    top, blocks = model.split_params(params, config.n_layer)
    eps = config.layer_norm_eps
    h = embed(params["wte.weight"], params["wpe.weight"], x)
    for p in blocks:
        h = h + self_attention(p["attn"], layer_norm(p["ln_1"], h, eps=eps), n_head=config.n_head)
        h = h + mlp(p["mlp"], layer_norm(p["ln_2"], h, eps=eps))
    h = layer_norm(top["ln_f"], h, eps=eps)
    return linear_cross_entropy(h.flatten(0, 1), params["wte.weight"], y.flatten())


def _decode_contenders(
    params: gpt_fn.Params, config: gpt_fn.GPTConfig, hooks: gpt_fn.Hooks
) -> dict[str, Callable[[], object]]:
    prompt = torch.randint(
        0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)
    )
    state = decoding.prefill(params, prompt, config, capacity=min(CAPACITY, config.block_size))
    cache, head = state.cache, decoding_head(params)
    token = state.logits.argmax(-1)

    def model_step(step_hooks):
        # Writes the same slot every call (the returned cache is dropped): one step, repeated.
        def step():
            hidden, _ = decoding._cached_step(
                params, cache, token, config=config, attention="sdpa", hooks=step_hooks,
                write="in_place",
            )  # fmt: skip
            return decoding._next_logits(params, hidden, head, step_hooks)

        return step

    return {
        CONTENDERS[0]: lambda: _plain_decode_step(params, cache, token, head, config),
        CONTENDERS[1]: model_step(None),
        CONTENDERS[2]: model_step(hooks),
    }


def _plain_decode_step(params, cache, token, head, config):
    """One cached step straight from the nn layers: the same ops as the model's, no hooks."""
    top, blocks = model.split_params(params, config.n_layer)
    eps = config.layer_norm_eps
    positions = (cache.lengths - cache.starts)[:, None]
    mask = cache_attention_mask(cache.starts, cache.lengths, 1, cache.capacity)
    slots = cache.lengths[:, None, None, None].expand(-1, config.n_head, 1, config.d_head)
    h = embed(params["wte.weight"], params["wpe.weight"], token[:, None], positions)
    for i, p in enumerate(blocks):

        def kv(k, v, i=i):
            return cache.keys[i].scatter_(2, slots, k), cache.values[i].scatter_(2, slots, v)

        a = self_attention(
            p["attn"], layer_norm(p["ln_1"], h, eps=eps), n_head=config.n_head, mask=mask, kv=kv
        )
        h = h + a
        h = h + mlp(p["mlp"], layer_norm(p["ln_2"], h, eps=eps))
    return head(layer_norm(top["ln_f"], h, eps=eps)[:, -1])


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"{c['n_layer']} layers x {c['n_embd']}, vocab {c['vocab_size']}, CPU, "
        f"{result['threads']} thread(s), torch {result['torch']}; median ms of "
        f"{result['repeats']} interleaved repeats after {result['warmup']} warm-up",
        "",
        "| workload | "
        + " | ".join(f"{n} ms" for n in CONTENDERS)
        + " | hooks=None / plain | identity hooks / plain |",
        "| --- | " + " | ".join("---:" for _ in CONTENDERS) + " | ---: | ---: |",
    ]
    for row in result["rows"]:
        ms = " | ".join(f"{row['median_ms'][n]:.2f}" for n in CONTENDERS)
        ratios = row["over_plain"]
        lines.append(
            f"| {row['workload']} | {ms} | **{ratios[CONTENDERS[1]]:.3f}** | {ratios[CONTENDERS[2]]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = command_line("hooks", __doc__, quick="few repeats: a smoke run", threads=1)
    args = parser.parse_args(argv)
    finish("hooks", run(args.quick, threads=args.threads), args.out, markdown=markdown)


if __name__ == "__main__":
    main()
