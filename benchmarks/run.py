"""Run every benchmark and write one markdown report, with the machine it was measured on.

    python -m benchmarks [--quick] [--only attention,train_step,...] [--threads N] [--out bench-out]
    python benchmarks/run.py ...                                    (the same)

Each benchmark module exposes `run(quick, *, threads, **sizes) -> dict` and
`markdown(result) -> str`, and some `plot(result, path)`. For each one the runner writes
`<name>.json`, `<name>.md` (and `<name>.png`) into `--out` (`write`, which each benchmark's own
command uses too), then `REPORT.md`: the machine (CPU model, cores, torch and device), then
every benchmark's table and plot. `--threads N` hands `threads=N` to every benchmark (each
otherwise keeps its own default, and its table says how many it used); each `run` restores
the previous count when it returns (`benchmarks.timing.cpu_threads`), so the order of the
list does not change the figures.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import check_dtypes, native_bf16

BENCHMARKS = (
    "attention",
    "train_step",
    "generate",
    "hooks",
    "optimizer",
    "lm_head_loss",
    "patching",
    "inspect_prompt",
    "activation_checkpointing",
    "choices",
    "prepare",
)
DEFAULT_OUT = Path("bench-out")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the figures come from: hardware, software and the commit measured."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    return info


def run_benchmarks(
    names: Sequence[str] = BENCHMARKS,
    *,
    quick: bool = False,
    out: Path = DEFAULT_OUT,
    threads: int | None = None,
    sizes: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Run `names` in order, write their files and `REPORT.md` into `out`; returns the report.

    `threads`: torch's CPU threads for every benchmark; `None` leaves each its own default.
    `sizes`: keyword arguments for a benchmark's `run`, by name (`{"generate": {"config":
    ...}}`; tests pass toy sizes); a benchmark not named runs at its own sizes.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    sizes = dict(sizes or {})
    unknown = [name for name in [*names, *sizes] if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    sections = []
    for name in names:
        # Imported here: a benchmark's imports (transformers, matplotlib) cost only when it runs.
        module = importlib.import_module(f"benchmarks.{name}")
        kwargs = dict(sizes.get(name, {}))
        if threads is not None:
            kwargs["threads"] = threads
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = module.run(quick, **kwargs)
        elapsed = time.perf_counter() - start
        table, plot_file = write(
            name, result, out, markdown=module.markdown, plot=getattr(module, "plot", None)
        )
        sections.append(_section(name, module, table, plot_file, elapsed))
        print(f"[benchmarks] {name} took {elapsed:.0f} s", file=sys.stderr, flush=True)
    report = out / "REPORT.md"
    report.write_text(_report(info, quick, threads, sections))
    return report


def write(
    name: str,
    result: dict,
    out: Path,
    *,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None] | None = None,
) -> tuple[str, str | None]:
    """`<name>.json` (every figure), `<name>.md` (the table) and, given `plot`, `<name>.png`
    into `out`; returns the table and the plot's file name (None without `plot`)."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    if plot is None:
        return table, None
    plot(result, out / f"{name}.png")
    return table, f"{name}.png"


def command_line(
    name: str, doc: str, *, quick: str, threads: int | None = None
) -> argparse.ArgumentParser:
    """`python benchmarks/<name>.py`'s parser with the options every benchmark takes.

    `--quick` (`quick` says what it shrinks), `--threads` (default `threads`; `None` keeps
    torch's) and `--out` (where `finish` writes the runner's files for this benchmark).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    default = "torch's" if threads is None else threads
    parser.add_argument(
        "--threads", type=int, default=threads, help=f"torch CPU threads (default {default})"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"write {name}.json, {name}.md (and a plot) here"
    )
    return parser


def dtype_names(text: str) -> tuple[str, ...]:
    """`--dtypes float32,bfloat16` as a tuple of names; an unknown name is a usage error."""
    names = tuple(text.split(","))
    try:
        check_dtypes(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return names


def finish(
    name: str,
    result: dict,
    out: Path | None,
    *,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None] | None = None,
) -> None:
    """How a benchmark's own command ends: print its table; with `out`, `write` its files."""
    if out is None:
        print(markdown(result), end="")
    else:
        print(write(name, result, out, markdown=markdown, plot=plot)[0], end="")


def _section(name: str, module, table: str, plot_file: str | None, elapsed: float) -> str:
    summary = (module.__doc__ or name).strip().splitlines()[0]
    lines = [
        f"## {name}",
        "",
        f"{summary} (`python benchmarks/{name}.py`; this run took {elapsed:.0f} s)",
        "",
        table.rstrip("\n"),
    ]
    if plot_file is not None:
        lines += ["", f"![{name}]({plot_file})"]
    return "\n".join(lines) + "\n"


def _report(info: dict, quick: bool, threads: int | None, sections: list[str]) -> str:
    mode = "`--quick` (smoke-sized: the figures are not representative)" if quick else "full"
    threads_note = (
        "each benchmark with its own thread count"
        if threads is None
        else f"every benchmark with {threads} CPU thread(s)"
    )
    cores = f"{info['logical_cores']} logical cores, {info['cores_available']} available to it"
    machine_rows = [
        ("CPU", f"{info['cpu']} ({cores})"),
        ("bf16 matmul on the CPU", "native" if info["cpu_native_bf16"] else "not native"),
        ("device", info["device"]),
        ("torch", f"{info['torch']} ({info['torch_threads']} threads by default)"),
        ("transformers", info["transformers"]),
        ("Python", f"{info['python']} on {info['platform']}"),
    ]
    lines = [
        "# gpt_fn benchmarks",
        "",
        f"Measured {info['date']} at commit {info['commit']}, {mode} run of "
        f"`python -m benchmarks`, {threads_note}. Timings are medians over repeats after warm-up; contenders "
        "take turns within each repeat. Each benchmark's JSON holds every figure.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in machine_rows),
        "",
    ]
    return "\n".join(lines) + "\n" + "\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs: about a minute")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every benchmark (default: each benchmark's own)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.only is None else tuple(args.only.split(","))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {','.join(BENCHMARKS)}")
    report = run_benchmarks(names, quick=args.quick, out=args.out, threads=args.threads)
    print(report.read_text(), end="")
    print(f"[benchmarks] wrote {report}", file=sys.stderr)


if __name__ == "__main__":
    main()
