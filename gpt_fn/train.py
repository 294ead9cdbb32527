"""The training loop: gradient accumulation, autocast, compile, clipping, eval, checkpoints, DDP.

    gpt-fn train                                   # cpu-small on the offline Shakespeare corpus
    torchrun --nproc-per-node 2 -m gpt_fn.train    # the same run with DDP (gloo on CPU, nccl on CUDA)

Everything a step depends on is a function of `(settings, step)`: the batch
(`gpt_fn.data.get_batch`), the learning rate (a pure schedule) and the dropout generator's seed.
The only carried state is the params and the optimizer state, both saved in the checkpoint, so
`--resume` continues exactly where the run stopped (nanoGPT `train.py`, build-nanogpt).
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gpt_fn import data, flops, hf, sampling
from gpt_fn.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from gpt_fn.config import GPTConfig
from gpt_fn.model import init_params
from gpt_fn.module import GPT
from gpt_fn.optim import Optimizer, OptState, adamw, clip_by_global_norm_, warmup_cosine
from gpt_fn.shapes import Params, shape_checks
from gpt_fn.tokenizer import EOT_TOKEN, gpt2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a run; the defaults are the CPU main job (`gpt-fn train` with no flags)."""

    data: str = "shakespeare"  # shakespeare | tinyshakespeare | a local text file or folder
    data_dir: str | None = None  # token files; default data/<corpus name>
    out_dir: str = "out"
    preset: str = "cpu-small"
    n_layer: int | None = None  # these five override the preset
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    init_from: str = "scratch"  # scratch | a GPT-2 HF directory or hub name
    attention: Literal["sdpa", "manual"] = "sdpa"
    batch_size: int = 16  # rows per micro-step, summed over DDP ranks
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    lr_decay_steps: int | None = None  # default max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    sample_every: int = 0  # also print a sample every N steps (0: only at the end)
    sample_tokens: int = 160
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"  # autocast dtype
    compile: bool | None = None  # default: on for CUDA, off on CPU
    device: str = "auto"
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "sample_every", "sample_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype must be one of {(*DTYPES, 'auto')}, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {unknown}")
        return cls(**fields)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    def model_config(self, base: GPTConfig | None = None) -> GPTConfig:
        """The preset (or `base`, e.g. GPT-2 weights' config) with this run's overrides."""
        overrides = {
            name: getattr(self, name)
            for name in ("n_layer", "n_head", "n_embd", "block_size", "dropout")
            if getattr(self, name) is not None
        }
        if base is None:
            return GPTConfig.from_preset(self.preset, **overrides)
        return dataclasses.replace(base, **overrides)

    def data_path(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir)
        return Path("data") / (
            self.data if self.data in data.BUILTIN_CORPORA else Path(self.data).stem
        )


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs: device, autocast dtype, DDP rank."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


CPU_FP32 = Runtime(device=torch.device("cpu"), dtype=torch.float32)
"""One process on the CPU in fp32: what experiments and tests run."""


def train_step(
    model: nn.Module,
    params: Params,
    optimizer: Optimizer,
    opt_state: OptState,
    batches: list[tuple[Tensor, Tensor]],
    *,
    runtime: Runtime,
    grad_clip: float,
    generator: torch.Generator | None = None,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """One optimizer step over `batches` (the micro-batches): returns (mean loss, grad norm).

    `model` is the `GPT` (maybe compiled or DDP-wrapped) whose Parameters are `params`; the
    gradients are averaged over the micro-batches (and over DDP ranks by DDP), clipped to
    `grad_clip` and applied in place by `optimizer.update_`. A non-finite loss or gradient
    norm raises `TrainingDiverged` before the parameters are touched.
    """
    total = torch.zeros((), device=runtime.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        # DDP all-reduces gradients on every backward unless told not to: only the last counts.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
        with sync or contextlib.nullcontext(), runtime.autocast():
            loss = model(x, y, generator) / len(batches)
        loss.backward()
        total += loss.detach()
    grads = {name: param.grad for name, param in params.items()}
    if grad_clip > 0:
        grad_norm = clip_by_global_norm_(grads, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    if runtime.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
        raise TrainingDiverged(f"loss {total.item()} / grad norm {grad_norm.item()}")
    optimizer.update_(grads, opt_state, params)
    for param in params.values():
        param.grad = None
    return total, grad_norm


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: Any,
    *,
    batch_size: int,
    block_size: int,
    batches: int,
    seed: int,
    runtime: Runtime = CPU_FP32,
) -> float:
    """Mean loss of `model` over evaluation batches `0..batches-1` (`data.eval_batch`).

    The same rows at every call, so losses of checkpoints along a run are comparable.
    `batch_size` counts rows over all ranks (each rank evaluates its share; the mean is
    all-reduced).
    """
    total = torch.zeros((), device=runtime.device)
    for index in range(batches):
        x, y = data.eval_batch(
            tokens,
            batch_size=batch_size // runtime.world_size,
            block_size=block_size,
            seed=seed,
            index=index,
            rank=runtime.rank,
            world_size=runtime.world_size,
            device=runtime.device,
        )
        with runtime.autocast():
            total += model(x, y).float()
    if runtime.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item() / batches


def train(settings: TrainSettings, *, log: Any = print) -> dict[str, Any]:
    """Run (or resume) training as `settings` says; returns a summary (steps, losses, speed).

    Writes `OUT/metrics.jsonl` (a line per step), `OUT/checkpoint.safetensors` (at every
    eval and at the end) and `OUT/loss.png`; prints samples from "ROMEO:" at the end.
    """
    with _distributed() as (rank, world_size):
        runtime = _runtime(settings, rank, world_size)
        # Shape checks cost Python time every call and force recompiles under dynamo.
        with shape_checks(False):
            return _train(settings, runtime, log if runtime.is_main else _silent)


def _train(settings: TrainSettings, runtime: Runtime, log: Any) -> dict[str, Any]:
    out_dir = Path(settings.out_dir)
    if settings.batch_size % runtime.world_size:
        raise ValueError(
            f"batch_size {settings.batch_size} must be divisible by the {runtime.world_size} ranks"
        )
    params, config, start_step, opt_state_saved = _initial_params(settings, out_dir, log)
    tokens_per_step = settings.batch_size * settings.grad_accum * config.block_size
    train_tokens, val_tokens = _load_data(settings, config, runtime, log)
    module = GPT.from_params(
        {k: v.to(runtime.device) for k, v in params.items()}, config, attention=settings.attention
    )
    params = module.params()
    optimizer = adamw(
        warmup_cosine(settings.lr, settings.min_lr, settings.warmup_steps, settings.decay_steps),
        betas=(settings.beta1, settings.beta2),
        weight_decay=settings.weight_decay,
    )
    opt_state = optimizer.init(params)
    if opt_state_saved is not None:
        _restore_optimizer_state(opt_state, opt_state_saved)

    model: nn.Module = module
    compile_model = (
        settings.compile if settings.compile is not None else runtime.device.type == "cuda"
    )
    if compile_model:
        model = torch.compile(model)
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)

    peak = flops.peak_flops(runtime.device, runtime.dtype)
    metrics_path = out_dir / "metrics.jsonl"
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_step)
    log(
        f"model {config.n_layer} layers x {config.n_embd} wide, {sum(p.numel() for p in params.values()) / 1e6:.1f}M "
        f"params; {tokens_per_step} tokens/step on {runtime.world_size} x "
        f"{runtime.device} ({runtime.dtype}); steps {start_step}..{settings.max_steps}"
    )

    def checkpoint(step: int) -> None:
        if runtime.is_main:
            save_checkpoint(
                out_dir,
                Checkpoint(params, opt_state, step, config, dataclasses.asdict(settings)),
            )

    progress = _progress(start_step, settings.max_steps, runtime.is_main)
    summary: dict[str, Any] = {"start_step": start_step}
    step = start_step
    for step in range(start_step, settings.max_steps):
        started = time.perf_counter()
        batches = [
            data.get_batch(
                train_tokens,
                batch_size=settings.batch_size // runtime.world_size,
                block_size=config.block_size,
                seed=settings.seed,
                step=step,
                micro_step=micro,
                grad_accum_steps=settings.grad_accum,
                rank=runtime.rank,
                world_size=runtime.world_size,
                device=runtime.device,
            )
            for micro in range(settings.grad_accum)
        ]
        lr = optimizer_lr(settings, step)
        try:
            loss, grad_norm = train_step(
                model,
                params,
                optimizer,
                opt_state,
                batches,
                runtime=runtime,
                grad_clip=settings.grad_clip,
                generator=_dropout_generator(settings, config, runtime, step),
            )
        except TrainingDiverged as error:
            kept = f"; the last good checkpoint ({out_dir}/checkpoint.safetensors) is kept"
            raise TrainingDiverged(f"training diverged at step {step}: {error}{kept}") from None
        elapsed = time.perf_counter() - started
        tokens_per_s = tokens_per_step / elapsed
        record: dict[str, Any] = {
            "step": step,
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": flops.mfu(tokens_per_s, config, config.block_size, peak),
        }
        done = step + 1
        if done % settings.eval_interval == 0 or done == settings.max_steps:
            record["val_loss"] = evaluate(
                model,
                val_tokens,
                batch_size=settings.batch_size,
                block_size=config.block_size,
                batches=settings.eval_batches,
                seed=settings.seed,
                runtime=runtime,
            )
            checkpoint(done)
        if runtime.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False
            )
            progress.update(1)
            if "val_loss" in record:
                log(
                    f"step {done}: train loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}"
                )
        if (
            settings.sample_every
            and done % settings.sample_every == 0
            and done < settings.max_steps
        ):
            log(sample_text(module.params(), config, settings, runtime))
        summary.update(record)
    progress.close()

    summary["steps"] = settings.max_steps
    if runtime.is_main and settings.max_steps > start_step:
        records = read_metrics(metrics_path)
        summary["tokens_per_s_median"] = _median([r["tokens_per_s"] for r in records[1:]] or [0.0])
        plot_losses(records, out_dir / "loss.png")
        log(f"wrote {out_dir}/loss.png, {metrics_path} and {out_dir}/checkpoint.safetensors")
        summary["sample"] = sample_text(module.params(), config, settings, runtime)
        log(f"--- sample at step {settings.max_steps} ---\n{summary['sample']}")
    return summary


def optimizer_lr(settings: TrainSettings, step: int) -> float:
    """The learning rate of `step` (the same schedule the optimizer uses)."""
    return warmup_cosine(settings.lr, settings.min_lr, settings.warmup_steps, settings.decay_steps)(
        step
    )


def sample_text(
    params: Params, config: GPTConfig, settings: TrainSettings, runtime: Runtime
) -> str:
    """A sample continuing "ROMEO:" (temperature 0.8, top-k 200), ids past GPT-2's vocab banned."""
    encoding = gpt2()
    prompt = torch.tensor([encoding.encode_ordinary("ROMEO:")], device=runtime.device)
    transform = sampling.make_transform(
        temperature=0.8,
        top_k=200,
        ban_tokens=range(encoding.n_vocab, config.vocab_size),
    )
    # Weights cast once to the run's dtype: autocast would re-cast every matmul at every step.
    with torch.no_grad():
        tokens = sampling.generate(
            {k: v.detach().to(runtime.dtype) for k, v in params.items()},
            prompt,
            config,
            max_new_tokens=settings.sample_tokens,
            transform=transform,
            seed=settings.seed,
            eos_token_id=EOT_TOKEN,
        )
    ids = [t for t in tokens[0].tolist() if t != EOT_TOKEN]
    return encoding.decode(ids)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Train loss per step and val loss at evals, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] + 1 for r in records], [r["loss"] for r in records], label="train", lw=1)
    evals = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] + 1 for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="gpt_fn training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_data(
    settings: TrainSettings, config: GPTConfig, runtime: Runtime, log: Any
) -> tuple[Any, Any]:
    data_dir = settings.data_path()
    if runtime.is_main:
        prepared = data.prepare(settings.data, data_dir)
        if prepared.rebuilt:
            meta = prepared.meta
            log(
                f"prepared {settings.data}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {data_dir}"
            )
    if runtime.world_size > 1:
        dist.barrier()  # the other ranks wait until rank 0 has written the token files
    meta = data.load_meta(data_dir)
    if meta["vocab_size"] > config.vocab_size:
        raise ValueError(
            f"the data's vocab ({meta['vocab_size']}) is larger than the model's vocab_size "
            f"({config.vocab_size})"
        )
    train_tokens = data.load_split(data_dir, "train", block_size=config.block_size)
    val_tokens = data.load_split(data_dir, "val", block_size=config.block_size)
    return train_tokens, val_tokens


def _initial_params(
    settings: TrainSettings, out_dir: Path, log: Any
) -> tuple[Params, GPTConfig, int, dict[str, Tensor] | None]:
    """(params, model config, first step, saved optimizer state): fresh, pretrained or resumed.

    With `--init-from`, the model's shape comes from the GPT-2 weights (the preset is not
    used); `--block-size` (crops the position embeddings) and `--dropout` still apply.
    """
    pretrained = None if settings.init_from == "scratch" else settings.init_from
    if settings.resume:
        saved = load_checkpoint(out_dir)
        config = settings.model_config(saved.model_config if pretrained else None)
        if saved.model_config != config:
            differing = {
                k: (v, getattr(config, k))
                for k, v in saved.model_config.to_dict().items()
                if getattr(config, k) != v
            }
            raise CheckpointError(
                f"the checkpoint in {out_dir} is of another model config: "
                + ", ".join(f"{k}={a} there, {b} here" for k, (a, b) in differing.items())
            )
        log(f"resuming from {out_dir}/checkpoint.safetensors at step {saved.step}")
        return saved.params, config, saved.step, saved.optimizer_state
    if pretrained:
        weights, weights_config = hf.load(pretrained)
        config = settings.model_config(weights_config)
        return _fit_pretrained(weights, weights_config, config), config, 0, None
    config = settings.model_config()
    return init_params(config, seed=settings.seed), config, 0, None


def _fit_pretrained(params: Params, pretrained: GPTConfig, config: GPTConfig) -> Params:
    """GPT-2 weights for `config`: same shapes but a shorter block (wpe cropped) and dropout."""
    for field in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if getattr(pretrained, field) != getattr(config, field):
            raise ValueError(
                f"--init-from weights have {field}={getattr(pretrained, field)}, but the run's "
                f"model has {getattr(config, field)}: drop --{field.replace('_', '-')} with it"
            )
    if config.block_size > pretrained.block_size:
        raise ValueError(
            f"block_size {config.block_size} exceeds the pretrained {pretrained.block_size}"
        )
    return {**params, "wpe.weight": params["wpe.weight"][: config.block_size].clone()}


def _restore_optimizer_state(state: OptState, saved: dict[str, Tensor]) -> None:
    if state.keys() != saved.keys():
        raise CheckpointError("the checkpoint's optimizer state does not match the model")
    with torch.no_grad():
        for name, value in state.items():
            value.copy_(saved[name])


def _dropout_generator(
    settings: TrainSettings, config: GPTConfig, runtime: Runtime, step: int
) -> torch.Generator | None:
    """Dropout's randomness for `step`, a function of (seed, step, rank): resumable as is."""
    if config.dropout == 0.0:
        return None
    seed = (settings.seed * 1_000_003 + step) * 1024 + runtime.rank
    return torch.Generator(device=runtime.device).manual_seed(seed)


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drop logged steps at or after `start_step` (a resumed run logs them again)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] < start_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _runtime(settings: TrainSettings, rank: int, world_size: int) -> Runtime:
    if settings.device == "auto":
        device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
    else:
        device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if settings.dtype == "auto":
        dtype = (
            torch.bfloat16
            if device.type == "cuda" and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    else:
        dtype = DTYPES[settings.dtype]
    return Runtime(device=device, dtype=dtype, rank=rank, world_size=world_size)


@contextlib.contextmanager
def _distributed() -> Iterator[tuple[int, int]]:
    """(rank, world_size): a process group under torchrun (WORLD_SIZE > 1), else (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _progress(start: int, total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


if __name__ == "__main__":  # torchrun --nproc-per-node N -m gpt_fn.train [flags]
    from gpt_fn.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
