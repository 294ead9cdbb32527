"""Attention kernels: `sdpa` against the manual einops kernel, eager and under torch.compile.

Times `gpt_fn.nn.sdpa_kernel` (`F.scaled_dot_product_attention`: flash / memory-efficient
kernels where the device has them), `gpt_fn.nn.manual_kernel` (einops scores, explicit causal
mask, softmax: the textbook formula) and, for reference, the manual kernel compiled by
`torch.compile` (inductor fuses scale, mask and softmax but still materialises the scores), in
forward and forward + backward, at GPT-2 small's attention shape (12 heads of 64) over
sequence lengths 64 to 2048, in fp32 and bf16. The kernels take turns within each repeat,
so load from other processes hits them alike; the figures are medians over repeats after
warm-up (FlashAttention, Dao et al. 2022, for why the scores need not be materialised).

Every case also records:

- the largest absolute difference from `sdpa` of the output (forward) or of the output and
  the three input gradients (forward + backward), in the same dtype;
- peak memory of one call above what was allocated before it: on CUDA from
  `torch.cuda.max_memory_allocated`; on CPU, whose allocator keeps no statistics, from
  torch.profiler's memory events (every allocation and free through torch's allocator, with
  size and time; walked through the profiler's event tree, a private torch API) summed in time
  order. It counts tensors, not the process's resident set (which glibc's reuse of freed
  pages blurs). Next to it, `scores MB` is the analytic size of one (batch, heads, seq, seq)
  score tensor, which the manual kernel allocates several times over (scores, masked scores,
  weights, and their gradients in backward) and flash-style kernels never allocate whole.

    python benchmarks/attention.py [--quick] [--dtypes float32,bfloat16] [--no-compile]
                                   [--batch N] [--threads N] [--device cpu|cuda] [--out DIR]

`--quick` runs a small grid in well under a minute on two CPU cores: no compiled kernel
(inductor takes seconds per graph), and bf16 only where bf16 matmuls are native (ATen's
fallback elsewhere runs at a few GFLOP/s; the output says when bf16 was skipped, and the
result's `dtypes` lists what ran). `run(quick, ...)` returns the numbers as a dict (its
keyword arguments set the sizes), `markdown(result)` renders them and `plot(result, path)`
draws time against sequence length (log-log, one line per kernel and dtype).
"""

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import command_line, dtype_names, finish
from benchmarks.timing import DTYPES, check_dtypes, cpu_threads, native_bf16, sync, take_turns
from gpt_fn.nn import manual_kernel, sdpa_kernel
from gpt_fn.shapes import shape_checks

N_HEAD, D_HEAD = 12, 64  # GPT-2 small
SEQ_LENS = (64, 128, 256, 512, 1024, 2048)
QUICK_SEQ_LENS = (64, 256, 1024)
KERNELS = ("sdpa", "manual", "manual compiled")
PASSES = ("forward", "forward+backward")

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run(
    quick: bool = False,
    *,
    device: str | None = None,
    dtypes: tuple[str, ...] | None = None,
    seq_lens: tuple[int, ...] | None = None,
    batch: int | None = None,
    n_head: int = N_HEAD,
    d_head: int = D_HEAD,
    compile: bool | None = None,
    threads: int | None = None,
) -> dict:
    """Median ms, peak memory and max abs difference from sdpa for every case, as a dict.

    Defaults: every dtype (quick: bf16 only where native; `result["dtypes"]` says which ran),
    `SEQ_LENS` (quick: `QUICK_SEQ_LENS`), GPT-2 small's heads, the compiled kernel in the
    full run only, batch 4 on CUDA and 1 on CPU (the (1, 12, 2048, 2048) fp32 scores are
    already 200 MB, and the manual backward holds several such tensors). `threads` sets
    torch's intra-op CPU threads for the run.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or (4 if dev.type == "cuda" else 1)
    seq_lens = seq_lens or (QUICK_SEQ_LENS if quick else SEQ_LENS)
    skipped: list[str] = []
    if dtypes is None:
        dtypes = tuple(DTYPES)
        if quick and not native_bf16(dev):
            dtypes = ("float32",)
            skipped.append(
                "bfloat16 skipped (quick mode): this CPU has no native bf16 matmul "
                "(torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"
            )
    check_dtypes(dtypes)
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"seq_lens must be positive lengths, got {seq_lens!r}")
    compile = (not quick) if compile is None else compile
    warmup, repeats = (1, 3) if quick else (2, 7)

    rows = []
    with cpu_threads(threads), shape_checks(False):
        threads_used = torch.get_num_threads()
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            # Fewer repeats where bf16 matmuls fall back to a slow path: minutes, not hours.
            slow = dtype != torch.float32 and not native_bf16(dev)
            dtype_warmup, dtype_repeats = (1, 3) if slow else (warmup, repeats)
            kernels: dict[str, Kernel] = {"sdpa": sdpa_kernel, "manual": manual_kernel}
            if compile:
                # dynamic=True: one graph serves every length (and the forward-only and
                # forward + backward graphs), instead of one compile per case.
                kernels["manual compiled"] = torch.compile(manual_kernel, dynamic=True)
            for seq in seq_lens:
                for pass_name in PASSES:
                    rows += _time_case(
                        kernels,
                        pass_name,
                        batch=batch,
                        seq=seq,
                        n_head=n_head,
                        d_head=d_head,
                        dtype=dtype,
                        device=dev,
                        warmup=dtype_warmup,
                        repeats=dtype_repeats,
                    )
    return {
        "benchmark": "attention",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": threads_used,
        "batch": batch,
        "n_head": n_head,
        "d_head": d_head,
        "dtypes": list(dtypes),
        "warmup": warmup,
        "repeats": repeats,
        "memory_method": (
            "torch.cuda.max_memory_allocated above the allocation before the call"
            if dev.type == "cuda"
            else "peak of torch's CPU allocations during one call, from torch.profiler's "
            "memory events"
        ),
        "skipped": skipped,
        "rows": rows,
    }


def _inputs(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    requires_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """q, k, v and an output gradient of `shape` (batch, heads, seq, d_head), the same numbers
    for every kernel and run."""
    generator = torch.Generator().manual_seed(shape[2])
    q, k, v, grad_out = (
        torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, grad_out


def _call(kernel: Kernel, pass_name: str, q, k, v, grad_out) -> tuple[torch.Tensor, ...]:
    """One forward (no autograd graph) or forward + backward; returns output (and gradients)."""
    if pass_name == "forward":
        with torch.no_grad():
            return (kernel(q, k, v),)
    out = kernel(q, k, v)
    # autograd.grad, not .backward(): nothing accumulates in q.grad between calls.
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


def _time_case(
    kernels: dict[str, Kernel],
    pass_name: str,
    *,
    batch: int,
    seq: int,
    n_head: int,
    d_head: int,
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> list[dict]:
    q, k, v, grad_out = _inputs(
        (batch, n_head, seq, d_head), dtype, device, requires_grad=pass_name == "forward+backward"
    )
    reference = _call(kernels["sdpa"], pass_name, q, k, v, grad_out)
    max_abs_diff = {}
    for name, kernel in kernels.items():  # the first call also compiles
        result = _call(kernel, pass_name, q, k, v, grad_out)
        max_abs_diff[name] = max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(result, reference, strict=True)
        )
    del reference, result
    calls = {
        name: functools.partial(_call, kernel, pass_name, q, k, v, grad_out)
        for name, kernel in kernels.items()
    }
    timings = take_turns(calls, warmup + repeats, device=device)
    seconds = {name: samples[warmup:] for name, samples in timings.seconds.items()}
    scores_mb = batch * n_head * seq * seq * torch.finfo(dtype).bits / 8 / 2**20
    sdpa_ms = 1e3 * statistics.median(seconds["sdpa"])
    return [
        {
            "dtype": str(dtype).removeprefix("torch."),
            "warmup": warmup,
            "repeats": repeats,
            "pass": pass_name,
            "seq": seq,
            "kernel": name,
            "median_ms": 1e3 * statistics.median(samples),
            "min_ms": 1e3 * min(samples),
            "over_sdpa": 1e3 * statistics.median(samples) / sdpa_ms,
            "peak_mb": _peak_mb(kernels[name], pass_name, q, k, v, grad_out, device),
            "scores_mb": scores_mb,
            "max_abs_diff_vs_sdpa": max_abs_diff[name],
        }
        for name, samples in seconds.items()
    ]


def _peak_mb(kernel: Kernel, pass_name: str, q, k, v, grad_out, device: torch.device) -> float:
    """Peak memory one call allocates on top of what was allocated before it, in MB."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _call(kernel, pass_name, q, k, v, grad_out)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # The CPU allocator keeps no statistics; the profiler records every allocation and free
    # (with its size and time) that goes through it, eager and inductor-generated code alike.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _call(kernel, pass_name, q, k, v, grad_out)
    changes = sorted(
        (event.start_time_ns, event.typed[1].alloc_size)  # size < 0 for a free
        for event in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if event.typed[0] == _EventType.Allocation
    )
    live = peak = 0
    for _, size in changes:
        live += size
        peak = max(peak, live)
    return peak / 2**20


def _walk(nodes: list) -> Iterator:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def markdown(result: dict) -> str:
    """One table row per (dtype, pass, sequence length): each kernel's time and memory."""
    kernels = [k for k in KERNELS if any(row["kernel"] == k for row in result["rows"])]
    lines = [
        f"Causal attention, batch {result['batch']} x {result['n_head']} heads x d_head "
        f"{result['d_head']}, {result['device_name']}, {result['threads']} thread(s), torch "
        f"{result['torch']}; median ms of {result['repeats']} repeats after {result['warmup']} "
        f"warm-up (3 after 1 for bf16 on CPUs without native bf16). Peak MB: "
        f"{result['memory_method']}; scores MB: one (batch, heads, seq, seq) tensor. "
        "Max |diff|: largest absolute difference from sdpa (output, and input gradients "
        "for forward+backward).",
        "",
    ]
    lines += [f"Note: {note}." for note in result["skipped"]]
    if result["skipped"]:
        lines.append("")
    header = (
        ["dtype", "pass", "seq", "scores MB"]
        + [f"{k} ms" for k in kernels]
        + [f"{k} / sdpa" for k in kernels[1:]]
        + [f"{k} peak MB" for k in kernels]
        + [f"{k} max abs diff" for k in kernels[1:]]
    )
    lines += [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + " |",
    ]
    cases: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        cases.setdefault((row["dtype"], row["pass"], row["seq"]), {})[row["kernel"]] = row
    for (dtype, pass_name, seq), by_kernel in cases.items():
        cells = [dtype, pass_name, str(seq), f"{by_kernel['sdpa']['scores_mb']:.0f}"]
        cells += [f"{by_kernel[k]['median_ms']:.2f}" for k in kernels]
        cells += [f"{by_kernel[k]['over_sdpa']:.2f}x" for k in kernels[1:]]
        cells += [f"{by_kernel[k]['peak_mb']:.0f}" for k in kernels]
        cells += [f"{by_kernel[k]['max_abs_diff_vs_sdpa']:.1e}" for k in kernels[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Median time against sequence length, log-log: one panel per pass, a line per kernel/dtype."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PASSES), figsize=(11, 4.2), sharey=True)
    for ax, pass_name in zip(axes, PASSES, strict=True):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for row in result["rows"]:
            if row["pass"] == pass_name:
                lines.setdefault((row["kernel"], row["dtype"]), []).append(
                    (row["seq"], row["median_ms"])
                )
        for (kernel, dtype), points in lines.items():
            seqs, ms = zip(*sorted(points), strict=True)
            style = "-" if dtype == "float32" else "--"
            ax.plot(seqs, ms, style, marker="o", label=f"{kernel}, {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(pass_name)
        ax.set_xlabel("sequence length")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median ms")
    axes[-1].legend(fontsize="small")
    fig.suptitle(
        f"causal attention, batch {result['batch']} x {result['n_head']} heads x "
        f"{result['d_head']}, {result['device_name']}, {result['threads']} thread(s)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = command_line(
        "attention", __doc__, quick="small grid, no compile, bf16 only where it is native"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--dtypes", type=dtype_names, default=None, help="comma-separated: float32,bfloat16"
    )
    parser.add_argument("--seq-lens", default=None, help="comma-separated lengths")
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CUDA, 1 on CPU")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the manual kernel under torch.compile (default: on in the full run)",
    )
    args = parser.parse_args(argv)
    result = run(
        args.quick,
        device=args.device,
        dtypes=args.dtypes,
        seq_lens=tuple(int(s) for s in args.seq_lens.split(",")) if args.seq_lens else None,
        batch=args.batch,
        compile=args.compile,
        threads=args.threads,
    )
    finish("attention", result, args.out, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
