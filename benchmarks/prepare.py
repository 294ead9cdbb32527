"""Streaming `gpt_fn.data.prepare` on corpora of growing size: tokens/s and peak memory.

The corpora are synthetic: the lines of the offline Shakespeare corpus
(`gpt_fn.data.shakespeare_documents()`) shuffled again and again with a fixed seed, written
as one `.txt` file (a single document: the case that needs `prepare` to cut documents) and
as a `.jsonl` of documents of ~100 lines each, 100, 200 and 400 MB. Each `prepare` runs in a
fresh Python process; its peak resident set is that process's own `ru_maxrss` (`os.wait4`
returns the rusage of exactly that child, the per-child `RUSAGE_CHILDREN`). A process that
only imports `gpt_fn.data` gives the baseline (torch, numpy, tiktoken). Peak RSS must stay
flat as the corpus grows.

A second table compares ways to encode on this machine, on the same text cut into 1 MiB
pieces: in the calling thread (what `prepare` does with one thread), on a thread pool
(tiktoken's encoder releases the GIL; what `prepare` does with more) and on a process pool
(each worker returns its tokens as uint16 bytes).

    python benchmarks/prepare.py [--quick] [--threads N] [--out DIR]

`threads` is the encoder's threads (`prepare(num_threads=...)`, and the pools' workers);
default: every core this process may use. `run(quick)` returns the numbers as a dict and
`markdown(result)` renders them.
"""

import concurrent.futures
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import the package from one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import command_line, finish
from gpt_fn import data
from gpt_fn.tokenizer import gpt2

SIZES_MB = (100, 200, 400)
QUICK_SIZES_MB = (1, 2)
LAYOUTS = ("txt", "jsonl")
QUICK_LAYOUTS = ("txt",)
ENCODE_MB = 16
QUICK_ENCODE_MB = 1
LINES_PER_DOCUMENT = 100
SEED = 0
REPO = Path(__file__).resolve().parents[1]

# The child: prepare one corpus, print what it measured as JSON, with its own peak RSS: VmHWM
# of its address space, which starts afresh at exec (wait4's ru_maxrss may carry the forking
# parent's high-water mark: a runner that already held 3.3 GB reported 3.3 GB for every child).
_CHILD = """
import json, sys, time
from gpt_fn import data
result = {}
if sys.argv[1] != "--baseline":
    start = time.perf_counter()
    prepared = data.prepare(sys.argv[1], sys.argv[2], num_threads=int(sys.argv[3]))
    seconds = time.perf_counter() - start
    meta = prepared.meta
    result = {"seconds": seconds, "tokens": meta["train_tokens"] + meta["val_tokens"],
              "shards": sum(len(s) for s in meta["shards"].values()),
              "documents": meta["documents"], "rebuilt": prepared.rebuilt}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        result["peak_rss_kib"] = int(line.split()[1])
print(json.dumps(result))
"""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def shuffled_lines(total_bytes: int, seed: int = SEED):
    """Shakespeare's lines, reshuffled each pass, until `total_bytes` of UTF-8: a list of chunks."""
    lines = "".join(data.shakespeare_documents()).splitlines(keepends=True)
    rng = random.Random(seed)
    size = 0
    while size < total_bytes:
        rng.shuffle(lines)
        for start in range(0, len(lines), LINES_PER_DOCUMENT):
            chunk = "".join(lines[start : start + LINES_PER_DOCUMENT])
            size += len(chunk.encode("utf-8"))
            yield chunk
            if size >= total_bytes:
                return


def write_corpus(path: Path, megabytes: float, layout: str) -> int:
    """`megabytes` of shuffled lines as one .txt or a .jsonl of documents; returns the bytes."""
    with open(path, "w", encoding="utf-8", newline="") as file:
        for chunk in shuffled_lines(int(megabytes * 1e6)):
            file.write(json.dumps({"text": chunk}) + "\n" if layout == "jsonl" else chunk)
    return path.stat().st_size


def run_child(args: list[str]) -> tuple[dict, float, float]:
    """Run `_CHILD` with `args`; (its JSON output, its peak RSS in MB, its wall seconds)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: it can never fill and block
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, stderr=errors, env=env
        )
        stdout = child.stdout.read()
        child.stdout.close()
        _, status, usage = os.wait4(child.pid, 0)  # this child's rusage, not all children's
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"prepare child failed ({child.returncode}): {stderr[-2000:]}")
    measured = json.loads(stdout.decode().strip())
    if "peak_rss_kib" in measured:  # Linux: the child's own high-water mark
        rss_mb = measured.pop("peak_rss_kib") / 2**10
    else:  # no /proc: ru_maxrss, in KiB on Linux-likes and bytes on macOS
        rss_mb = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return measured, rss_mb, wall


def _encode(piece: str) -> bytes:
    """What prepare does with a piece (a module function, so process pools can pickle it)."""
    return gpt2().encode_to_numpy(piece, disallowed_special=()).astype(np.uint16).tobytes()


def encode_strategies(megabytes: float, workers: int, repeats: int) -> list[dict]:
    """Tokens/s of the calling thread, thread pools and process pools on the same 1 MiB pieces.

    The contenders take turns within each repeat (who goes first rotates); pools are started
    before timing.
    """
    text = "".join(shuffled_lines(int(megabytes * 1e6), seed=SEED + 1))
    pieces = [text[i : i + data.PIECE_CHARS] for i in range(0, len(text), data.PIECE_CHARS)]
    reference = [gpt2().encode_ordinary(piece) for piece in pieces]
    n_tokens = sum(len(ids) for ids in reference)
    counts = sorted({1, workers})
    with contextlib.ExitStack() as stack:
        contenders = {("calling thread", 1): lambda: list(map(_encode, pieces))}
        for kind, pool_type in (
            ("thread pool", concurrent.futures.ThreadPoolExecutor),
            ("process pool", concurrent.futures.ProcessPoolExecutor),
        ):
            for n in counts:
                pool = stack.enter_context(pool_type(n))
                list(pool.map(_encode, pieces[:n]))  # start the workers
                contenders[(kind, n)] = lambda pool=pool: list(pool.map(_encode, pieces))
        times: dict[tuple[str, int], list[float]] = {key: [] for key in contenders}
        same = dict.fromkeys(contenders, True)
        keys = list(contenders)
        for repeat in range(repeats):
            shift = repeat % len(keys)
            for key in keys[shift:] + keys[:shift]:
                start = time.perf_counter()
                out = contenders[key]()
                times[key].append(time.perf_counter() - start)
                same[key] &= [np.frombuffer(b, np.uint16).tolist() for b in out] == reference
    return [
        {
            "strategy": kind,
            "workers": n,
            "seconds": statistics.median(times[(kind, n)]),
            "tokens_per_s": n_tokens / statistics.median(times[(kind, n)]),
            "same_tokens": same[(kind, n)],
        }
        for kind, n in keys
    ]


def run(
    quick: bool = False,
    *,
    threads: int | None = None,
    work_dir: Path | None = None,
    sizes_mb: tuple[float, ...] | None = None,
    layouts: tuple[str, ...] | None = None,
) -> dict:
    """Tokens/s and peak RSS of `prepare` per corpus size and layout, and the encoder comparison.

    `threads`: encoder threads (default: every core this process may use).
    """
    workers = threads or cores()
    sizes = sizes_mb or (QUICK_SIZES_MB if quick else SIZES_MB)
    layouts = layouts or (QUICK_LAYOUTS if quick else LAYOUTS)
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        _, baseline_rss, _ = run_child(["--baseline"])
        for layout in layouts:
            for megabytes in sizes:
                corpus = root / f"corpus-{megabytes}mb.{layout}"
                corpus_bytes = write_corpus(corpus, megabytes, layout)
                out = root / f"out-{megabytes}mb-{layout}"
                measured, rss_mb, wall = run_child([str(corpus), str(out), str(workers)])
                rows.append(
                    {
                        "layout": layout,
                        "corpus_mb": corpus_bytes / 1e6,
                        "tokens": measured["tokens"],
                        "documents": measured["documents"],
                        "shards": measured["shards"],
                        "prepare_s": measured["seconds"],
                        "tokens_per_s": measured["tokens"] / measured["seconds"],
                        "mb_per_s": corpus_bytes / 1e6 / measured["seconds"],
                        "peak_rss_mb": rss_mb,
                        "process_s": wall,
                    }
                )
                corpus.unlink()
                for path in out.iterdir():
                    path.unlink()
    encoders = encode_strategies(
        QUICK_ENCODE_MB if quick else ENCODE_MB, workers, 1 if quick else 3
    )
    return {
        "benchmark": "prepare",
        "threads": workers,
        "cores": cores(),
        "piece_chars": data.PIECE_CHARS,
        "shard_tokens": data.SHARD_TOKENS,
        "baseline_rss_mb": baseline_rss,
        "rows": rows,
        "encoders": encoders,
    }


def markdown(result: dict) -> str:
    """The size sweep, then the encoder comparison."""
    lines = [
        f"`prepare` in a fresh process per corpus, {result['threads']} encoder threads "
        f"({result['cores']} cores available), pieces of {result['piece_chars']:,} characters, "
        f"shards of {result['shard_tokens']:,} tokens; peak RSS is the child's own high-water mark (VmHWM) "
        f"(a process that only imports `gpt_fn.data`: {result['baseline_rss_mb']:.0f} MB)",
        "",
        "| layout | corpus MB | tokens | documents | shards | seconds | tokens/s | MB/s | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['layout']} | {row['corpus_mb']:.1f} | {row['tokens']:,} | "
            f"{row['documents']:,} | {row['shards']} | {row['prepare_s']:.1f} | "
            f"{row['tokens_per_s'] / 1e6:.2f}M | {row['mb_per_s']:.1f} | {row['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Encoding the same 1 MiB pieces (median seconds, contenders taking turns; tokens checked "
        "equal to `encode_ordinary`):",
        "",
        "| strategy | workers | seconds | tokens/s | same tokens |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in result["encoders"]:
        lines.append(
            f"| {row['strategy']} | {row['workers']} | {row['seconds']:.2f} | "
            f"{row['tokens_per_s'] / 1e6:.2f}M | {'yes' if row['same_tokens'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = command_line("prepare", __doc__, quick="1 and 2 MB corpora: a smoke run")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the corpora go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    result = run(args.quick, threads=args.threads, work_dir=args.work_dir)
    finish("prepare", result, args.out, markdown=markdown)


if __name__ == "__main__":
    main()
