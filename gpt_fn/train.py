"""The training loop: gradient accumulation, autocast, compile, clipping, eval, checkpoints, DDP.

    gpt-fn train                                   # cpu-small on the offline Shakespeare corpus
    torchrun --nproc-per-node 2 -m gpt_fn.train    # the same run with DDP (gloo on CPU, nccl on CUDA)

Everything a step depends on is a function of `(settings, step)`: the batch
(`gpt_fn.data.get_batch`), the learning rate (a pure schedule) and the dropout generator's seed.
The only carried state is the params and the optimizer state, both saved in the checkpoint, so
`--resume` continues exactly where the run stopped (nanoGPT `train.py`, build-nanogpt).

A run never loses its last good checkpoint: a step whose loss, gradient norm or updated
weights are not finite stops the run before anything is saved; Ctrl-C stops it after the
current step and saves a checkpoint of that step (a second Ctrl-C aborts at once). After the
last step the run is saved: Ctrl-C then ends the final sample at once.
"""

import contextlib
import functools
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from gpt_fn import data, flops, memory
from gpt_fn.checkpoint import (
    SERIES,
    Checkpoint,
    CheckpointError,
    KeepSchedule,
    checkpoint_path,
    kept_checkpoint,
    load_checkpoint,
    load_sharded_into,
    read_checkpoint_info,
    save_checkpoint,
    save_sharded_checkpoint,
    series_path,
    series_steps,
)
from gpt_fn.checks import check_same_keys
from gpt_fn.config import GPTConfig
from gpt_fn.eval import bits_per_byte, encode_text, multiple_choice, perplexity, read_choices
from gpt_fn.files import write_atomic
from gpt_fn.loading import load_model
from gpt_fn.model import init_params
from gpt_fn.module import GPT
from gpt_fn.optim import (
    LossScaleState,
    Optimizer,
    OptState,
    Schedule,
    adamw,
    clip_by_global_norm_,
    global_norm,
    gpt_muon_adamw,
    loss_scale_init,
    muon,
    unscale_,
    update_loss_scale_,
    warmup_cosine,
)
from gpt_fn.optim.loss_scale import SMALLEST_SCALE
from gpt_fn.rundir import RunDir, plot_losses
from gpt_fn.runlog import RunLog, open_run_logs
from gpt_fn.runtime import (
    CPU_FP32,
    Runtime,
    distributed,
    local_rank,
    make_runtime,
    resolve_device,
    resolve_dtype,
)
from gpt_fn.settings import TrainSettings, check_this_machine, resume_settings
from gpt_fn.shapes import Params, shape_checks
from gpt_fn.tokenizer import GPT2_VOCAB_SIZE

Log = Callable[[str], None]
LOSS_SCALE = "loss_scale."
"""Prefix of the fp16 loss scale's state among a checkpoint's optimizer tensors."""
DROPOUT_STREAM = 2
"""SeedSequence stream of dropout masks (gpt_fn.data.batches uses streams 0 and 1)."""
MEMORY_ADVICE = (
    "lower --batch-size (raise --grad-accum to keep the tokens per step) or --block-size"
)


Sample = Callable[..., str]
"""What `train` calls for a sample: `sample(params, config, *, tokens, seed) -> text`, with
`params` detached, on the run's device, in its dtype, and `tokens` and `seed` the settings'
`sample_tokens` and `seed` (`gpt_fn.cli.sample_text` is `gpt-fn train`'s)."""


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the updated weights became NaN/inf."""


class TrainingInterrupted(RuntimeError):
    """The run was stopped by Ctrl-C (SIGINT) after a step; its checkpoint holds that step."""


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
    loss_scale: LossScaleState | None = None,
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """One optimizer step over `batches` (the micro-batches): returns (mean loss, grad norm).

    `model` is the `GPT` (maybe compiled, DDP- or FSDP-wrapped) whose Parameters are `params`;
    the gradients are averaged over the micro-batches (and over ranks by DDP/FSDP), clipped
    to `grad_clip` (0: not clipped) and applied in place by `optimizer.update_`. Raises
    `TrainingDiverged` if the loss or the gradient norm is not finite (before the parameters
    are touched) or if the update made a parameter non-finite. With `loss_scale` (fp16) the
    loss is scaled for backward, and a step whose gradients overflow is skipped instead (the
    returned norm is then not finite, and the scale backs off).
    """
    total = torch.zeros((), device=runtime.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        # DDP and FSDP reduce gradients on every backward unless told not to: only the last counts.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        with sync or contextlib.nullcontext(), runtime.autocast():
            loss = model(x, y, generator) / len(batches)
        (loss if loss_scale is None else loss * loss_scale["scale"]).backward()
        total += loss.detach()
    grads = {name: param.grad for name, param in params.items()}
    if loss_scale is not None:
        unscale_(grads, loss_scale)
    grad_norm = clip_by_global_norm_(grads, grad_clip) if grad_clip > 0 else global_norm(grads)
    if runtime.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    finite = bool(torch.isfinite(total) and torch.isfinite(grad_norm))
    if loss_scale is not None:
        update_loss_scale_(loss_scale, finite)
        if not finite and float(loss_scale["scale"]) >= SMALLEST_SCALE:
            for param in params.values():
                param.grad = None
            return total, grad_norm  # an fp16 overflow: skipped, the scale backed off
    if not finite:
        raise TrainingDiverged(f"loss {total.item()}, gradient norm {grad_norm.item()}")
    optimizer.update_(grads, opt_state, params)
    for param in params.values():
        param.grad = None
    if not _all_finite(params):
        raise TrainingDiverged(
            f"the update made the weights non-finite (loss {total.item():.4g}, gradient norm "
            f"{grad_norm.item():.4g}): is the learning rate too large?"
        )
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


def train(
    settings: TrainSettings, *, log: Log = print, sample: Sample | None = None
) -> dict[str, Any]:
    """Run (or resume) training as `settings` says; returns a summary (steps, losses, speed).

    Writes `OUT/metrics.jsonl` (a line per step), `OUT/checkpoint.safetensors` (at every
    eval and at the end), with `keep_checkpoints` the series `OUT/checkpoints/step_*.safetensors`
    (`gpt_fn.checkpoint.KeepSchedule`), and `OUT/loss.png`. With `sample`, logs its text every
    `sample_every` steps and at the end (then also the summary's `"sample"`).
    With `settings.resume` the run continues from its checkpoint with the settings saved
    there (`gpt_fn.settings.resume_settings` says what may differ).
    """
    with distributed() as (rank, world_size):
        log = log if rank == 0 else _silent
        run_dir = RunDir(settings.out_dir)
        device = resolve_device(settings.device, local_rank=local_rank())
        with run_dir.lock() if rank == 0 else contextlib.nullcontext():
            settings = _settings_for_this_run(settings, run_dir, device, rank, log)
            runtime = make_runtime(device, settings.autocast_dtype, rank, world_size)
            # Shape checks cost Python time every call and force recompiles under dynamo.
            with (
                shape_checks(False),
                memory.allocation_errors("training", MEMORY_ADVICE),
                contextlib.ExitStack() as logs,
            ):
                with _stop_on_sigint(log) as stop_requested:
                    run = _Run(settings, runtime, run_dir, log, stop_requested, sample)
                    logs.enter_context(run.run_logs())  # open until finish() is done
                    summary = run.train()
                return run.finish(summary)


def _settings_for_this_run(
    settings: TrainSettings, run_dir: RunDir, device: torch.device, rank: int, log: Log
) -> TrainSettings:
    """Resumed: the checkpoint's settings with the allowed changes. Fresh: the folder checked."""
    if settings.resume:
        if settings.from_step is not None:
            if rank == 0:
                _rewind(run_dir, settings.from_step, log)
            if dist.is_initialized():  # the other ranks read the checkpoint once it is in place
                dist.barrier()
        info = read_checkpoint_info(checkpoint_path(run_dir.path))
        settings, notes = resume_settings(settings, info.train_settings, step=info.step)
        for note in notes:
            log(f"resume: {note}")
    check_this_machine(settings)  # before a fresh run's folder is cleared or any step runs
    if not settings.resume and rank == 0:
        run_dir.start_fresh(overwrite=settings.overwrite)
    if rank == 0:
        for path in run_dir.clean():
            log(f"removed {path}, left by an interrupted save")
    if settings.batch_size % _world_size():
        raise ValueError(
            f"batch_size {settings.batch_size} must be divisible by the {_world_size()} ranks"
        )
    return settings.resolved(resolve_dtype(settings.autocast_dtype, device))


def _rewind(run_dir: RunDir, step: int, log: Log) -> None:
    """Make the run's kept checkpoint of `step` its checkpoint (verified, then copied atomically)."""
    source = kept_checkpoint(run_dir.path, step)
    if run_dir.sharded_checkpoint.exists():
        raise CheckpointError(
            f"--from-step resumes single-file checkpoints; {run_dir.sharded_checkpoint} is sharded"
        )
    load_checkpoint(source)  # checksums verified before the run's checkpoint is replaced
    # Copied file to file into write_atomic's temporary: a checkpoint may be GBs.
    write_atomic(run_dir.checkpoint, functools.partial(shutil.copyfile, source))
    log(f"resume: the run goes back to its kept checkpoint of step {step} ({source})")


class _Run:
    """One training run from its first step to its last: the loop and what it reports."""

    def __init__(
        self,
        settings: TrainSettings,
        runtime: Runtime,
        run_dir: RunDir,
        log: Log,
        stop_requested: Callable[[], bool],
        sample: Sample | None,
    ) -> None:
        self.settings, self.runtime, self.run_dir = settings, runtime, run_dir
        self.log, self.stop_requested, self.sample_fn = log, stop_requested, sample
        self.sharded = settings.parallel == "fsdp" and runtime.world_size > 1
        self.keep = (
            KeepSchedule.parse(settings.keep_checkpoints) if settings.keep_checkpoints else None
        )
        if self.keep is not None and self.sharded:
            raise ValueError(
                "--keep-checkpoints writes single-file checkpoints: use --parallel ddp"
            )
        params, self.config = _initial_params(settings, run_dir, runtime, log)
        self.train_tokens, self.val_tokens, self.data_sha256 = _load_data(
            settings, self.config, runtime, log
        )
        self.module = GPT.from_params(
            {k: v.to(runtime.device) for k, v in params.items()},
            self.config,
            attention=settings.attention,
            checkpoint_blocks=settings.activation_checkpointing,
        )
        if self.sharded:  # FSDP2: each block a unit, the root takes wte, wpe and ln_f
            for block in self.module.h:
                fully_shard(block)
            fully_shard(self.module)
        self.params = self.module.params()  # DTensor shards under FSDP
        self.schedule: Schedule = warmup_cosine(
            settings.lr, settings.min_lr, settings.warmup_steps, settings.lr_decay_steps
        )
        self.optimizer = _optimizer(settings, self.schedule)
        self.opt_state = self.optimizer.init(self.params)
        self.loss_scale = (
            loss_scale_init(device=runtime.device) if runtime.dtype == torch.float16 else None
        )
        self.start_step = 0
        if settings.resume:
            self.start_step = self._restore()
        self.model = self._wrapped_model()
        self.choices = (
            None if settings.eval_choices is None else read_choices(settings.eval_choices)
        )
        self.eval_text = None if settings.eval_text is None else _read_eval_text(settings.eval_text)
        self.logs: list[RunLog] = []
        self.tokens_per_step = settings.batch_size * settings.grad_accum * self.config.block_size
        self.flops_per_token = flops.train_flops_per_token(self.config, self.config.block_size)
        self.peak = flops.peak_flops(runtime.device, runtime.dtype)

    def _saved_state(self) -> dict[str, Tensor]:
        """What a checkpoint's optimizer part holds: the optimizer's state and the loss scale."""
        scale = {} if self.loss_scale is None else self.loss_scale
        return {**self.opt_state, **{f"{LOSS_SCALE}{k}": v for k, v in scale.items()}}

    def _restore(self) -> int:
        """Load the run's checkpoint into the params and states; returns its step."""
        state = self._saved_state()
        source = checkpoint_path(self.run_dir.path)
        if source.is_dir():
            info = load_sharded_into(source, self.params, state)
            step, data_sha256 = info.step, info.data_sha256
        else:
            saved = load_checkpoint(source)
            _copy_into(self.params, saved.params, "params")
            _copy_into(state, saved.optimizer_state, "optimizer state")
            step, data_sha256 = saved.step, saved.data_sha256
        self._check_same_data(data_sha256)
        self.log(f"resuming from {source} at step {step}")
        return step

    def _check_same_data(self, trained_on: str | None) -> None:
        """Refuse to resume on a corpus whose source changed, unless `allow_changes`."""
        if trained_on is None or self.data_sha256 in (None, trained_on):
            return  # an older checkpoint, or llm.c shards: no source hash to compare
        change = (
            f"the corpus {self.settings.data} changed since the run started (source sha256 "
            f"{trained_on[:16]}... then, {self.data_sha256[:16]}... now)"
        )
        if not self.settings.allow_changes:
            raise CheckpointError(
                f"{change}: a resumed run is exact only on the same data; restore it, or pass "
                "--allow-changes to train on with the new text"
            )
        self.log(f"resume: {change} (--allow-changes)")

    def _wrapped_model(self) -> nn.Module:
        model: nn.Module = self.module
        compile_model = self.settings.compile
        if compile_model is None:
            compile_model = self.runtime.device.type == "cuda"
        if compile_model:
            self.log("compiling the model (torch.compile): the first step takes longer")
            model = torch.compile(model)
        if self.runtime.world_size > 1 and not self.sharded:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        return model

    def train(self) -> dict[str, Any]:
        settings, config, runtime = self.settings, self.config, self.runtime
        if runtime.is_main:
            missing = self.run_dir.truncate_metrics(
                self.start_step, allow_missing=settings.allow_changes
            )
            if missing:
                self.log(
                    f"resume: steps {missing[0]} to {missing[-1]} are missing from "
                    f"{self.run_dir.metrics} (--allow-changes)"
                )
            self._prune_series()
            self._announce_series()
        n_params = sum(p.numel() for p in self.params.values())
        self.log(
            f"model {config.n_layer} layers x {config.n_embd} wide, {n_params / 1e6:.1f}M "
            f"params; {self.tokens_per_step} tokens/step on {runtime.world_size} x "
            f"{runtime.device} ({runtime.dtype}); steps {self.start_step}..{settings.max_steps}"
        )
        summary: dict[str, Any] = {"start_step": self.start_step}
        with self._progress() as (progress, say):
            for step in range(self.start_step, settings.max_steps):
                if self._should_stop():
                    self._checkpoint(step)
                    raise TrainingInterrupted(
                        f"interrupted before step {step}: saved {checkpoint_path(self.run_dir.path)} "
                        "(continue with --resume)"
                    )
                record = self._step(step)
                done = step + 1
                evaluated = done % settings.eval_interval == 0 or done == settings.max_steps
                if evaluated:
                    record["val_loss"] = self._evaluate(done)
                    record["val_bpb"] = bits_per_byte(record["val_loss"], self._val_targets)
                    record.update(self._extra_evals())
                if runtime.is_main:
                    self.run_dir.append_metrics(record)
                    for run_log in self.logs:
                        run_log.record(record)
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        refresh=False,
                    )
                    progress.update(1)
                if evaluated:
                    # After the step's record: a checkpoint never exists without the records
                    # before its step (a resume keeps exactly those).
                    self._checkpoint(done)
                    say(
                        f"step {done}: train loss {record['loss']:.4f}, val loss {record['val_loss']:.4f} "
                        f"({record['val_bpb']:.3f} bits/byte){_extra_evals_line(record)}"
                    )
                if self.keep is not None and (done in self.keep or done == settings.max_steps):
                    self._keep(done)
                sample_due = settings.sample_every and done % settings.sample_every == 0
                if sample_due and done < settings.max_steps:
                    text = self._logged_sample(done)
                    if text is not None:
                        say(text)
                summary.update(record)
        return summary

    def _step(self, step: int) -> dict[str, Any]:
        settings, runtime = self.settings, self.runtime
        started = time.perf_counter()
        batches = [
            data.get_batch(
                self.train_tokens,
                batch_size=settings.batch_size // runtime.world_size,
                block_size=self.config.block_size,
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
        try:
            loss, grad_norm = train_step(
                self.model,
                self.params,
                self.optimizer,
                self.opt_state,
                batches,
                runtime=runtime,
                grad_clip=settings.grad_clip,
                generator=self._dropout_generator(step),
                loss_scale=self.loss_scale,
            )
        except TrainingDiverged as error:
            raise TrainingDiverged(
                f"training diverged at step {step}: {error}; {self._kept()}"
            ) from None
        tokens_per_s = self.tokens_per_step / (time.perf_counter() - started)
        record = {
            "step": step,
            "loss": loss.item(),
            "lr": self.schedule(step),
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
        }
        if settings.optimizer == "muon":
            record["muon_lr"] = self.schedule(step) * _muon_ratio(settings)
        if self.loss_scale is not None:
            record["loss_scale"] = float(self.loss_scale["scale"])
            record["skipped"] = not np.isfinite(record["grad_norm"])
        return record

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation, a fraction of the device's peak (see `gpt_fn.flops`)."""
        achieved = tokens_per_s * self.flops_per_token
        if achieved > self.peak:
            # A measured (CPU) peak taken while the machine was busy is too low: measure again,
            # and never let it be below a rate this run reached.
            remeasured = flops.measured_matmul_flops(str(self.runtime.device), self.runtime.dtype)
            self.peak = max(self.peak, remeasured, achieved)
        return achieved / self.peak

    def _evaluate(self, done: int) -> float:
        val_loss = evaluate(
            self.model,
            self.val_tokens,
            batch_size=self.settings.batch_size,
            block_size=self.config.block_size,
            batches=self.settings.eval_batches,
            seed=self.settings.seed,
            runtime=self.runtime,
        )
        if not np.isfinite(val_loss):
            raise TrainingDiverged(
                f"training diverged at step {done - 1}: val loss {val_loss} after its update; "
                f"{self._kept()}"
            )
        return val_loss

    @functools.cached_property
    def _val_targets(self) -> Tensor:
        """Every target token of the evaluation batches (all ranks' rows): what val bpb counts."""
        return torch.cat(
            [
                data.eval_batch(
                    self.val_tokens, batch_size=self.settings.batch_size,
                    block_size=self.config.block_size, seed=self.settings.seed, index=index,
                )[1]
                for index in range(self.settings.eval_batches)
            ]
        )  # fmt: skip

    def _state(self, step: int) -> Checkpoint:
        """What a checkpoint of `step` holds: the params, the optimizer state, the settings
        and the data's sha256."""
        return Checkpoint(
            self.params,
            self._saved_state(),
            step,
            self.config,
            self.settings.to_dict(),
            self.data_sha256,
        )

    def _checkpoint(self, step: int) -> None:
        checkpoint = self._state(step)
        if self.sharded:  # every rank writes its shards
            save_sharded_checkpoint(self.run_dir.path, checkpoint, rank=self.runtime.rank)
        elif self.runtime.is_main:
            save_checkpoint(self.run_dir.checkpoint, checkpoint)

    def _keep(self, step: int) -> None:
        """Write the series' checkpoint of `step` (after the step's record, like `_checkpoint`)."""
        if self.runtime.is_main:
            save_checkpoint(series_path(self.run_dir.path, step), self._state(step))

    def _prune_series(self) -> None:
        """Drop the kept checkpoints after the start step: the run writes them again."""
        later = [s for s in series_steps(self.run_dir.path) if s > self.start_step]
        for step in later:
            series_path(self.run_dir.path, step).unlink()
        if later:
            self.log(
                f"resume: dropped the kept checkpoints of steps {later}, after step {self.start_step}"
            )

    def _announce_series(self) -> None:
        """Say which steps the run will keep a checkpoint of, and the disk they will take."""
        if self.keep is None or self.start_step == self.settings.max_steps:
            return
        steps = self.keep.steps(self.start_step, self.settings.max_steps)
        tensors = [*self.params.values(), *self._saved_state().values()]
        size = sum(t.numel() * t.element_size() for t in tensors)
        shown = (
            ", ".join(map(str, steps))
            if len(steps) <= 8
            else (f"{', '.join(map(str, steps[:5]))}, ..., {steps[-1]}")
        )
        self.log(
            f"keeping {len(steps)} checkpoints (steps {shown}) in {self.run_dir.path / SERIES}: "
            f"{len(steps)} x {size / 1e6:.1f} MB = {len(steps) * size / 1e6:.1f} MB"
        )

    def _kept(self) -> str:
        if self.run_dir.holds_checkpoint():
            source = checkpoint_path(self.run_dir.path)
            step = read_checkpoint_info(source).step
            return f"the last good checkpoint ({source}, step {step}) is kept"
        return "no checkpoint had been written yet"

    def _should_stop(self) -> bool:
        stop = self.stop_requested()
        if self.runtime.world_size > 1:  # every rank stops at the same step
            flag = torch.tensor(float(stop), device=self.runtime.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag)
        return stop

    def _dropout_generator(self, step: int) -> torch.Generator | None:
        """Dropout's randomness for `step`, a function of (seed, step, rank): resumable as is."""
        if self.config.dropout == 0.0:
            return None
        entropy = [self.settings.seed, DROPOUT_STREAM, step, self.runtime.rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
        return torch.Generator(device=self.runtime.device).manual_seed(seed)

    @contextlib.contextmanager
    def _progress(self) -> Iterator[tuple[Any, Log]]:
        """A progress bar on stderr, and a log function that prints above it."""
        from tqdm import tqdm

        progress = tqdm(
            total=self.settings.max_steps,
            initial=self.start_step,
            disable=None if self.runtime.is_main else True,  # None: off when not a terminal
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        say = progress.write if self.log is print else self.log
        try:
            yield progress, say
        finally:
            progress.close()

    def _full_params(self) -> Params:
        """The current weights, whole (call on every rank: FSDP gathers its shards)."""
        return {
            name: value.full_tensor() if isinstance(value, DTensor) else value
            for name, value in self.module.params().items()
        }

    def _logged_sample(self, step: int) -> str | None:
        """The `sample` callback's text from the current weights, also sent to the run logs at
        `step`; None without a callback (call on every rank: FSDP gathers its shards)."""
        if self.sample_fn is None:
            return None
        # Weights cast once to the run's dtype: autocast would re-cast every matmul at every step.
        params = {k: v.detach().to(self.runtime.dtype) for k, v in self._full_params().items()}
        text = self.sample_fn(
            params, self.config, tokens=self.settings.sample_tokens, seed=self.settings.seed
        )
        for run_log in self.logs:
            run_log.text("sample", text, step)
        return text

    def _extra_evals(self) -> dict[str, float]:
        """`--eval-choices` and `--eval-text` on the current weights, with what each cost in
        seconds (measured on the main rank, which alone scores; every rank gathers FSDP's
        shards)."""
        if self.choices is None and self.eval_text is None:
            return {}
        params = self._full_params()
        if not self.runtime.is_main:
            return {}
        scores: dict[str, float] = {}
        # Ids past GPT-2's vocabulary (a padded model's) have no text: normalise over GPT-2's.
        vocab = min(self.config.vocab_size, GPT2_VOCAB_SIZE)
        with torch.no_grad(), self.runtime.autocast():
            if self.choices is not None:
                started = time.perf_counter()
                results = multiple_choice(
                    params, self.choices, self.config, vocab_size=vocab, share_context=True
                )
                scores["choices_acc"] = results.acc
                scores["choices_acc_norm"] = results.acc_norm
                scores["choices_seconds"] = time.perf_counter() - started
            if self.eval_text is not None:
                started = time.perf_counter()
                scores["text_bpb"] = perplexity(
                    params, self.eval_text, self.config, vocab_size=vocab
                ).bits_per_byte
                scores["text_seconds"] = time.perf_counter() - started
        return scores

    @contextlib.contextmanager
    def run_logs(self) -> Iterator[None]:
        """The wandb / TensorBoard logs `--log` asks for, open for the block (main rank)."""
        if self.runtime.is_main and self.settings.log_kinds:
            resumed = self.start_step > 0 and self.run_dir.metrics.exists()
            history = self.run_dir.read_metrics() if resumed else []
            self.logs = open_run_logs(
                self.settings.log_kinds,
                self.run_dir.path,
                settings=self.settings.to_dict(),
                history=[r for r in history if r["step"] < self.start_step],
                project=self.settings.log_project,
                name=self.settings.log_name,
            )
            for run_log in self.logs:
                self.log(f"{run_log.name}: logging to {run_log.where}")
        try:
            yield
        finally:
            for run_log in self.logs:
                run_log.close()
            self.logs = []

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """After the last step (saved): the speed, the loss plot and a sample (with a callback).

        Runs outside the loop's Ctrl-C handler: a Ctrl-C here (or one pressed during the last
        step) ends the run with `TrainingInterrupted`, its checkpoint complete.
        """
        steps = summary["steps"] = self.settings.max_steps
        if steps == self.start_step:
            return summary
        saved = (
            f"the run is complete and saved ({checkpoint_path(self.run_dir.path)}, step {steps})"
        )
        try:
            if self.runtime.is_main:
                records = self.run_dir.read_metrics()
                summary["tokens_per_s_median"] = statistics.median_high(
                    [r["tokens_per_s"] for r in records[1:]] or [0.0]
                )
                plot_losses(records, self.run_dir.plot)
                self.log(
                    f"wrote {self.run_dir.plot}, {self.run_dir.metrics} and "
                    f"{checkpoint_path(self.run_dir.path)}"
                )
            if self._should_stop():  # Ctrl-C during the last step
                raise KeyboardInterrupt
            sample = self._logged_sample(steps)
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted after the last step: {saved}") from None
        if self.runtime.is_main and sample is not None:
            summary["sample"] = sample
            self.log(f"--- sample at step {steps} ---\n{sample}")
        return summary


def _read_eval_text(path: str) -> list[int]:
    """`--eval-text`'s GPT-2 tokens; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--eval-text {path}: not UTF-8 text ({error})") from None
    tokens = encode_text(text)
    if len(tokens) < 2:
        raise ValueError(f"--eval-text {path}: needs at least 2 tokens of text, got {len(tokens)}")
    return tokens


def _extra_evals_line(record: dict[str, Any]) -> str:
    """The log line's part for `--eval-choices` / `--eval-text`, with their cost."""
    parts = []
    if "choices_acc" in record:
        parts.append(
            f"choices acc {record['choices_acc']:.3f} / acc_norm {record['choices_acc_norm']:.3f} "
            f"({record['choices_seconds']:.1f} s)"
        )
    if "text_bpb" in record:
        parts.append(
            f"eval text {record['text_bpb']:.3f} bits/byte ({record['text_seconds']:.1f} s)"
        )
    return "".join(", " + part for part in parts)


def _load_data(
    settings: TrainSettings, config: GPTConfig, runtime: Runtime, log: Log
) -> tuple[data.Tokens, data.Tokens, str | None]:
    """The train and val tokens, and the sha256 of their source (None for llm.c shards)."""
    data_dir = settings.data_path()
    if runtime.is_main and not data.is_shard_folder(data_dir):  # llm.c shards train as they are
        prepared = data.prepare(settings.data, data_dir)
        if prepared.rebuilt:
            meta = prepared.meta
            log(
                f"prepared {settings.data}: {meta['train_tokens']:,} train / "
                f"{meta['val_tokens']:,} val tokens in {data_dir}"
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
    source_sha256 = meta.get("source_sha256")
    return train_tokens, val_tokens, source_sha256 if isinstance(source_sha256, str) else None


def _initial_params(
    settings: TrainSettings, run_dir: RunDir, runtime: Runtime, log: Log
) -> tuple[Params, GPTConfig]:
    """(params, model config) a run starts from: fresh, or GPT-2's weights.

    Refuses (`memory.InsufficientMemoryError`) a run whose params, optimizer state and
    activations cannot fit the device, before allocating them.

    With `--init-from`, the model's shape comes from the GPT-2 weights (the preset is not
    used); `--block-size` (crops the position embeddings) and `--dropout` still apply. A
    resumed run takes its config from the checkpoint and its weights are loaded later into
    the (possibly sharded) params, so it starts from a fresh init here.
    """
    pretrained = None if settings.init_from == "scratch" else settings.init_from
    if settings.resume:
        saved = read_checkpoint_info(checkpoint_path(run_dir.path))
        config = settings.model_config(saved.model_config if pretrained else None)
        if saved.model_config != config:
            differing = {
                k: (v, getattr(config, k))
                for k, v in saved.model_config.to_dict().items()
                if getattr(config, k) != v
            }
            raise CheckpointError(
                f"the checkpoint in {run_dir.path} is of another model config: "
                + ", ".join(f"{k}={a} there, {b} here" for k, (a, b) in differing.items())
            )
        _check_memory(settings, config, runtime)
        return init_params(config, seed=settings.seed), config
    if pretrained:
        weights, weights_config, _ = load_model(hf=pretrained)
        config = settings.model_config(weights_config)
        log(
            f"init from {pretrained}: {config.n_layer} layers x {config.n_embd} wide, "
            f"{config.n_head} heads, vocab {config.vocab_size}, block_size {config.block_size}"
            + (
                " (from its config.json; --block-size crops it)"
                if settings.block_size is None
                else ""
            )
            + f": {settings.batch_size * settings.grad_accum * config.block_size:,} tokens a step"
        )
        _check_memory(settings, config, runtime)
        return _fit_pretrained(weights, weights_config, config), config
    config = settings.model_config()
    _check_memory(settings, config, runtime)
    return init_params(config, seed=settings.seed), config


def _check_memory(settings: TrainSettings, config: GPTConfig, runtime: Runtime) -> None:
    needed = memory.training_bytes(
        config,
        batch_size=settings.batch_size,
        optimizer=settings.optimizer,
        dtype=runtime.dtype,
        world_size=runtime.world_size,
        sharded=settings.parallel == "fsdp" and runtime.world_size > 1,
        activation_checkpointing=settings.activation_checkpointing,
    )
    memory.check_fits(
        needed,
        runtime.device,
        what=f"training {config.n_layer} layers x {config.n_embd} on {settings.batch_size:,} "
        f"rows of {config.block_size:,} tokens",
        advice=MEMORY_ADVICE,
    )


def _optimizer(settings: TrainSettings, schedule: Schedule) -> Optimizer:
    """AdamW, or Muon for the blocks' matrices with AdamW for the rest (`optim.gpt_muon_adamw`).

    Muon follows the same schedule scaled to its own peak (`muon_lr / lr`).
    """
    adam = adamw(
        schedule, betas=(settings.beta1, settings.beta2), weight_decay=settings.weight_decay
    )
    if settings.optimizer == "adamw":
        return adam
    ratio = _muon_ratio(settings)

    def muon_schedule(step: int) -> float:
        return schedule(step) * ratio

    return gpt_muon_adamw(
        muon(muon_schedule, momentum=settings.muon_momentum, weight_decay=settings.weight_decay),
        adam,
    )


def _muon_ratio(settings: TrainSettings) -> float:
    """Muon's lr over AdamW's at every step (`muon_lr / lr`; 0 when lr is 0: nothing trains)."""
    return settings.muon_lr / settings.lr if settings.lr > 0 else 0.0


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


def _copy_into(targets: dict[str, Tensor], saved: dict[str, Tensor], what: str) -> None:
    """Copy a checkpoint's full tensors into a run's (shards of DTensors under FSDP)."""
    check_same_keys(
        saved,
        targets,
        what=f"the checkpoint's {what} does not match this run (another --optimizer or --autocast-dtype?)",
        error=CheckpointError,
    )
    with torch.no_grad():
        for name, target in targets.items():
            value = saved[name].to(target.device if not isinstance(target, DTensor) else "cpu")
            if isinstance(target, DTensor):
                value = distribute_tensor(
                    value.to(target.device_mesh.device_type), target.device_mesh, target.placements
                )
            target.copy_(value)


def _all_finite(params: Params) -> bool:
    """Whether every parameter entry is finite: one max-abs per tensor, one host sync."""
    largest = torch._foreach_norm(list(params.values()), float("inf"))
    return bool(torch.isfinite(torch.stack(largest)).all())


@contextlib.contextmanager
def _stop_on_sigint(log: Log) -> Iterator[Callable[[], bool]]:
    """While in the block, the first Ctrl-C asks the loop to stop after its step; a second aborts."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        log("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _silent(*args: Any, **kwargs: Any) -> None:
    return None
