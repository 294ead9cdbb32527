"""LM head and cross-entropy fused: the mean next-token loss without (n, vocab) logits.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(F.linear(hidden, weight).float(), targets)` but walks the rows in chunks of
`chunk_size`. For each chunk it computes the logits into one reused buffer, softmaxes them in
place (max-subtracted, so large logits give no inf/NaN), reads off the loss, turns the buffer
into the gradient `softmax - onehot` and contracts it at once into the gradients of `hidden`
(`g @ W`) and `weight` (`g^T @ h`, accumulated over chunks). Backward only hands over those
gradients, scaled by the incoming gradient. This is Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024, arXiv:2410.10989) written with ATen ops.

Why it is faster on a CPU as well as leaner: the reference allocates and sweeps several
fresh (n, vocab) fp32 tensors (logits, log-probabilities, their gradient: 824 MB each for
2048 tokens of GPT-2's vocabulary), each one page-faulted in and streamed through DRAM; here
one chunk buffer is reused, and backward allocates nothing. The three matmuls (2 n d vocab
FLOPs each) are the same in both, and dominate.

Dtypes follow autocast: under `torch.autocast` the matmuls take operands in the autocast
dtype and the softmax runs in fp32, rounding where `F.linear(...).float()` rounds (logits,
and their gradient before it re-enters the matmuls); `weight`'s gradient is summed over
chunks in fp32. Gradients come back in the inputs' dtypes and the loss in fp32 (fp64 for
fp64 inputs).

Transforms: `torch.func.grad` works (setup_context-style `autograd.Function`),
`torch.func.vmap` loops over the mapped axis (per-sample gradients), and `torch.compile`
traces it without graph breaks. Second derivatives (`create_graph=True` and a second
backward, `grad` of `grad`) and forward-mode AD are not supported: they raise.

`linear_log_probs(hidden, weight, targets)` is the evaluation side of the same sweep: each
row's `log softmax(hidden @ weight.T)[target]` and whether the target is the row's argmax
(lm-evaluation-harness's `is_greedy`), chunk by chunk, without gradients.
"""

import dataclasses
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt_fn.checks import check_bool, check_int, check_token_tensor, is_traced

DEFAULT_CHUNK_SIZE = 512
"""Rows per chunk: chosen on a CPU at d_model 384, vocab 50304, where 512 rows are as fast as
1024 or 2048 and faster than 256 (smaller matmuls, more passes over weight's gradient) with a
103 MB chunk buffer (benchmarks/lm_head_loss.py times the chunk sizes). Untuned on a GPU."""


def linear_cross_entropy(
    hidden: Float[Tensor, "n d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, " n"],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
) -> Float[Tensor, ""]:
    """Mean cross-entropy of `targets` under logits `hidden @ weight.T`, never materialised.

    Rows whose target is `ignore_index` count neither in the sum nor in the mean (as in
    `F.cross_entropy`); at least one target must be counted. Raises `ValueError` naming the
    problem for mismatched shapes, a bad `chunk_size`, a target outside `[0, vocab)` that is
    not `ignore_index`, or no counted target; `TypeError` for unusable dtypes.
    """
    _check_arguments(hidden, weight, targets, chunk_size=chunk_size, ignore_index=ignore_index)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        operand_dtype = torch.get_autocast_dtype(device_type)
    else:
        operand_dtype = hidden.dtype
    grad_enabled = torch.is_grad_enabled()
    loss, *_ = _LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        _Plan(
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            operand_dtype=operand_dtype,
            matmul_dtype=_matmul_dtype(operand_dtype, hidden.device),
            need_hidden_grad=grad_enabled and hidden.requires_grad,
            need_weight_grad=grad_enabled and weight.requires_grad,
        ),
    )
    return loss


class TokenLogProbs(NamedTuple):
    """Per-row results of `linear_log_probs`."""

    logprobs: Float[Tensor, " n"]
    """`log softmax(logits)[target]` in fp32 (fp64 for fp64 inputs); 0 for ignored rows."""
    greedy: Bool[Tensor, " n"] | None
    """Whether the target is the row's argmax (`logits.argmax() == target`); False if ignored.
    None when not asked for (`greedy=False`)."""


def linear_log_probs(
    hidden: Float[Tensor, "n d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, " n"],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    greedy: bool = True,
) -> TokenLogProbs:
    """Each row's log-probability of its target under logits `hidden @ weight.T`, and whether
    the target is the argmax, computed `chunk_size` rows at a time: the `(n, vocab)` logits
    never exist at once.

    Equals `F.log_softmax(F.linear(hidden, weight).float(), -1).gather(1, targets[:, None])`
    and `logits.argmax(-1) == targets`, with the rounding `linear_cross_entropy` has under
    autocast. `greedy=False` skips the argmax (a pass over the logits that scoring alone does
    not need) and returns `greedy=None`. Not differentiable: with grad mode on and an input
    that requires grad it raises (use `linear_cross_entropy`, or `F.log_softmax` over
    materialised logits, for gradients). Raises `ValueError`/`TypeError` for the arguments
    `linear_cross_entropy` rejects, except that every target may be `ignore_index`.
    """
    _check_arguments(
        hidden,
        weight,
        targets,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        need_counted=False,
    )
    check_bool("greedy", greedy)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise RuntimeError(
            "linear_log_probs is not differentiable; call it under torch.no_grad() (or use "
            "linear_cross_entropy for gradients of the loss)"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        operand_dtype = torch.get_autocast_dtype(device_type)
    else:
        operand_dtype = hidden.dtype
    matmul_dtype = _matmul_dtype(operand_dtype, hidden.device)
    wide_dtype = torch.promote_types(operand_dtype, torch.float32)
    n, vocab = hidden.shape[0], weight.shape[0]
    counted = targets != ignore_index
    safe_targets = torch.where(counted, targets, 0).unsqueeze(1)
    logprobs = hidden.new_zeros(n, dtype=wide_dtype)
    is_argmax = torch.zeros(n, dtype=torch.bool, device=hidden.device) if greedy else None
    with torch.autocast(device_type, enabled=False):
        h = hidden.to(operand_dtype).to(matmul_dtype).contiguous()
        w = weight.to(operand_dtype).to(matmul_dtype).contiguous()
        chunk = max(1, min(chunk_size, n))
        buffer = hidden.new_empty((chunk, vocab), dtype=matmul_dtype)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            product = torch.mm(h[start:stop], w.T, out=buffer[: stop - start])
            # Round where F.linear's output is rounded (operand precision), then widen.
            logits = product.to(operand_dtype).to(wide_dtype)
            target_c = safe_targets[start:stop]
            if is_argmax is not None:
                # The argmax of the logits, not of the probabilities: exp can round ties in.
                is_argmax[start:stop] = logits.argmax(1) == target_c[:, 0]
            target_logits = logits.gather(1, target_c)
            logprobs[start:stop] = (target_logits - _log_sum_exp_(logits))[:, 0]
    return TokenLogProbs(
        logprobs.masked_fill(~counted, 0.0), None if is_argmax is None else is_argmax & counted
    )


def _log_sum_exp_(logits: Tensor) -> Tensor:
    """`torch.logsumexp(logits, 1, keepdim=True)`, bit for bit (its steps: max, shift, exp, sum,
    log, shift back), overwriting `logits` instead of allocating a shifted copy of them."""
    top = logits.amax(1, keepdim=True)
    top.masked_fill_(top.abs() == torch.inf, 0)
    return logits.sub_(top).exp_().sum(1, keepdim=True).log_().add_(top)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The non-tensor arguments of one call: how to chunk, which dtypes, which gradients."""

    chunk_size: int
    ignore_index: int
    operand_dtype: torch.dtype  # precision of the matmuls' operands and outputs (autocast's)
    matmul_dtype: torch.dtype  # the dtype the matmul kernels run in
    need_hidden_grad: bool
    need_weight_grad: bool


def _matmul_dtype(operand_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`operand_dtype`, or fp32 on a CPU without fast kernels for it.

    Without AVX512-BF16/AMX, ATen's bf16 and fp16 CPU matmuls run at 0.3-10 GFLOP/s, 5-100x
    slower than fp32 (benchmarks/lm_head_loss.py). An fp32 matmul of operands rounded to bf16,
    its output rounded back, computes what a bf16 matmul does (exact products, fp32 sums).
    """
    if device.type != "cpu" or operand_dtype in (torch.float32, torch.float64):
        return operand_dtype
    if operand_dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return operand_dtype
    if operand_dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return operand_dtype
    return torch.float32


def _check_arguments(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int,
    ignore_index: int,
    need_counted: bool = True,
) -> None:
    check_int("chunk_size", chunk_size, at_least=1)
    check_int("ignore_index", ignore_index)
    if hidden.ndim != 2 or weight.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            "expected hidden (n, d_model), weight (vocab, d_model) and targets (n,), got shapes "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden has d_model={hidden.shape[1]} but weight has d_model={weight.shape[1]}"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows but hidden has {hidden.shape[0]}")
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise TypeError(
            f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}"
        )
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) differ in dtype outside autocast"
        )
    check_token_tensor("targets", targets)
    if not hidden.device == weight.device == targets.device:
        raise ValueError(
            f"hidden, weight and targets are on different devices: "
            f"{hidden.device}, {weight.device}, {targets.device}"
        )
    # Data-dependent checks read values back: impossible while compiling or under vmap.
    if is_traced(targets):
        return
    counted = targets != ignore_index
    vocab = weight.shape[0]
    out_of_range = counted & ((targets < 0) | (targets >= vocab))
    n_counted, n_bad = torch.stack([counted.sum(), out_of_range.sum()]).tolist()
    if n_bad:
        bad = int(targets[out_of_range][0])
        raise ValueError(
            f"target {bad} is outside [0, vocab={vocab}) and is not ignore_index={ignore_index}"
        )
    if n_counted == 0 and need_counted:
        raise ValueError(
            f"every one of the {targets.shape[0]} targets is ignore_index={ignore_index}: "
            "the mean loss over no targets is undefined"
        )


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, in the same sweep, the gradients for a unit `grad_loss`."""

    @staticmethod
    def forward(
        hidden: Tensor, weight: Tensor, targets: Tensor, plan: _Plan
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        with torch.autocast(hidden.device.type, enabled=False):
            return _chunked_loss_and_grads(hidden, weight, targets, plan)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        hidden, weight, _, _ = inputs
        _, hidden_grad, weight_grad = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # The gradient outputs are never differentiated: no (vocab, d_model) zeros for them.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden_grad, weight_grad, hidden, weight)

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden_grad, weight_grad, hidden, weight = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if grad_loss is None:  # the loss did not reach what is being differentiated
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph: a second derivative must fail, not give 0
            return (
                _FirstOrderGrad.apply(hidden_grad, grad_loss, hidden, weight, hidden.dtype)
                if want_hidden
                else None,
                _FirstOrderGrad.apply(weight_grad, grad_loss, hidden, weight, weight.dtype)
                if want_weight
                else None,
                None,
                None,
            )
        # `loss.backward()` passes 1: hand over the saved gradients without a (vocab, d_model)
        # copy. Autograd's reference counts keep this safe: with retain_graph the saved tensor
        # stays referenced here, so AccumulateGrad copies it instead of adopting it. (Compiled
        # code cannot branch on a value; it multiplies.)
        unit = not torch.compiler.is_compiling() and bool(grad_loss == 1)

        def scaled(saved: Tensor, dtype: torch.dtype) -> Tensor:
            return (saved if unit else saved * grad_loss).to(dtype)

        return (
            scaled(hidden_grad, hidden.dtype) if want_hidden else None,
            scaled(weight_grad, weight.dtype) if want_weight else None,
            None,
            None,
        )

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, hidden: Tensor, weight: Tensor, targets: Tensor, plan: _Plan
    ) -> tuple[tuple, tuple]:
        # One chunked sweep per mapped sample: each is already a whole (n, vocab) problem,
        # so the loop costs Python overhead only.
        def sample(t: Tensor, dim: int | None, i: int) -> Tensor:
            return t if dim is None else t.select(dim, i)

        results = [
            _chunked_loss_and_grads(
                sample(hidden, in_dims[0], i),
                sample(weight, in_dims[1], i),
                sample(targets, in_dims[2], i),
                plan,
            )
            for i in range(info.batch_size)
        ]
        outputs = tuple(
            None if column[0] is None else torch.stack(column)
            for column in zip(*results, strict=True)
        )
        return outputs, tuple(None if out is None else 0 for out in outputs)


class _FirstOrderGrad(torch.autograd.Function):
    """A saved gradient times `scale`, cast to `dtype`; raises if differentiated further.

    `hidden` and `weight` are inputs only so that a second derivative reaches this backward
    and fails loudly; without them it would silently be zero.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        saved_grad: Tensor, scale: Tensor, hidden: Tensor, weight: Tensor, dtype: torch.dtype
    ) -> Tensor:
        return (saved_grad * scale).to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        saved_grad, scale, _, _, _ = inputs
        ctx.save_for_backward(saved_grad)
        ctx.scale_dtype = scale.dtype

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, Tensor | None, None, None, None]:
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError(
                "linear_cross_entropy has no second derivative with respect to hidden or weight; "
                "use F.cross_entropy(F.linear(hidden, weight), targets) for higher-order terms"
            )
        (saved_grad,) = ctx.saved_tensors
        grad_scale = (saved_grad * grad_output).sum().to(ctx.scale_dtype)
        return None, grad_scale if ctx.needs_input_grad[1] else None, None, None, None


def _chunked_loss_and_grads(
    hidden: Tensor, weight: Tensor, targets: Tensor, plan: _Plan
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mean loss over counted rows and its gradients (None where `plan` needs none)."""
    n, d_model = hidden.shape
    vocab = weight.shape[0]
    operand_dtype, matmul_dtype = plan.operand_dtype, plan.matmul_dtype
    # Softmax, loss and weight's gradient accumulate in fp32 at least, as after `.float()`.
    wide_dtype = torch.promote_types(operand_dtype, torch.float32)
    h = hidden.to(operand_dtype).to(matmul_dtype).contiguous()
    w = weight.to(operand_dtype).to(matmul_dtype).contiguous()
    counted = targets != plan.ignore_index
    # Ignored rows get target 0 and are masked out of the loss and both gradients below.
    safe_targets = torch.where(counted, targets, 0).unsqueeze(1)
    # Each row's share of the mean: 1 / n_counted, or 0 for an ignored row.
    row_weights = (counted / counted.sum()).to(wide_dtype).unsqueeze(1)

    chunk = max(1, min(plan.chunk_size, n))
    # `probs` holds one chunk's logits, then probabilities, then the gradient, in place.
    probs = hidden.new_empty((chunk, vocab), dtype=wide_dtype)
    # Matmul outputs and the gradient fed back to matmuls pass through `narrow` (operand
    # precision), where the reference rounds them too; fp32 needs no such buffer.
    narrow = None if operand_dtype == wide_dtype else torch.empty_like(probs, dtype=operand_dtype)
    matmul_buffer = probs if matmul_dtype == wide_dtype else narrow
    row_losses = hidden.new_empty((n, 1), dtype=wide_dtype)
    minus_one = hidden.new_full((chunk, 1), -1.0, dtype=wide_dtype)
    hidden_grad = torch.empty_like(h) if plan.need_hidden_grad else None
    weight_grad = weight_product = None
    if plan.need_weight_grad:
        # Rows of h scaled by their share: the chunks' products sum to the mean's gradient.
        h_weighted = (h * row_weights).to(h.dtype)
        if matmul_dtype == wide_dtype:  # the first chunk's product overwrites it
            weight_grad = torch.empty((vocab, d_model), dtype=wide_dtype, device=h.device)
        else:  # low-precision products, summed in fp32
            weight_grad = torch.zeros((vocab, d_model), dtype=wide_dtype, device=h.device)
            weight_product = torch.empty_like(w)

    def round_through_narrow(rows: int) -> Tensor:
        """Round `probs[:rows]` to operand precision; return the copy matmuls should read."""
        narrow[:rows].copy_(probs[:rows])
        if matmul_buffer is probs:
            probs[:rows].copy_(narrow[:rows])
        return matmul_buffer[:rows]

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        probs_c = probs[:rows]
        torch.mm(h[start:stop], w.T, out=matmul_buffer[:rows])
        if narrow is not None:
            if matmul_buffer is probs:
                round_through_narrow(rows)
            else:
                probs_c.copy_(narrow[:rows])
        target_c = safe_targets[start:stop]
        target_logits = probs_c.gather(1, target_c)
        row_max = probs_c.amax(1, keepdim=True)
        torch.softmax(probs_c, 1, out=probs_c)
        # The softmax at the largest logit is 1 / sum(exp(logits - max)) >= 1 / vocab, so the
        # log-sum-exp comes without a second exp pass and without underflow for any logits.
        log_sum_exp = row_max - probs_c.amax(1, keepdim=True).log_()
        torch.sub(log_sum_exp, target_logits, out=row_losses[start:stop])
        if hidden_grad is None and weight_grad is None:
            continue
        probs_c.scatter_add_(1, target_c, minus_one[:rows])  # softmax - onehot
        grad_c = probs_c if narrow is None else round_through_narrow(rows)
        if hidden_grad is not None:
            torch.mm(grad_c, w, out=hidden_grad[start:stop])
        if weight_grad is not None:
            h_c = h_weighted[start:stop]
            if weight_product is not None:
                torch.mm(grad_c.T, h_c, out=weight_product)
                weight_grad.add_(weight_product)
            elif start == 0:
                torch.mm(grad_c.T, h_c, out=weight_grad)
            else:
                weight_grad.addmm_(grad_c.T, h_c)

    loss = (row_losses * row_weights).sum()
    if hidden_grad is not None:
        hidden_grad.mul_(row_weights)
    return loss, hidden_grad, weight_grad
