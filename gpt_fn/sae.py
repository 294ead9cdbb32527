"""Sparse autoencoders on activation sites: parameters, losses, splicing, training, metrics.

An SAE is a parameter dict with SAELens's names and shapes (`W_enc` `(d_in, d_sae)`, `b_enc`,
`W_dec` `(d_sae, d_in)`, `b_dec`, and `threshold` for JumpReLU), read by pure functions with an
`SAEConfig` beside it, as the model's params are read with a `GPTConfig`:

    sae_config = SAEConfig(d_in=768, d_sae=4096, kind="topk", k=32)
    sae = init_sae(sae_config, seed=0)
    features = encode(sae, cache["h.2.resid_post"], sae_config)
    logits = forward(params, tokens, config, hooks=splice("h.2.resid_post", sae, sae_config))

Architectures (SAELens's definitions): `"standard"` (ReLU, L1 penalty on activations weighted
by decoder row norms; Bricken et al. 2023), `"topk"` (the k largest pre-activations, decoder
rows at unit norm, an auxiliary loss that revives dead features; Gao et al. 2024) and
`"jumprelu"` (a learned threshold per feature, an L0 penalty through a straight-through
estimator; Rajamanoharan et al. 2024). A site with a head axis (`attn.z`) is read flattened,
`d_in = n_head * d_head`, as SAELens's `hook_z` SAEs are.

`train_sae` trains several SAEs on one stream of activations: the model runs once per batch
(stopping at the site), and each SAE takes its own AdamW step on the same shuffled batch.
"""

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from gpt_fn import optim
from gpt_fn.checks import check_choice, check_int, check_number, check_shapes
from gpt_fn.config import GPTConfig
from gpt_fn.data import Tokens, get_batch
from gpt_fn.eval import token_scores
from gpt_fn.files import write_atomic
from gpt_fn.model import transformer
from gpt_fn.shapes import Params
from gpt_fn.sites import Hooks, check_hooks, identity

SAE = dict[str, Tensor]
"""`W_enc` `(d_in, d_sae)`, `b_enc` `(d_sae,)`, `W_dec` `(d_sae, d_in)`, `b_dec` `(d_in,)`,
and `threshold` `(d_sae,)` for JumpReLU (SAELens's names)."""
Kind = Literal["standard", "topk", "jumprelu"]
KINDS: tuple[Kind, ...] = ("standard", "topk", "jumprelu")


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and how it is trained; checked when built.

    `sparsity_coefficient`: the L1 coefficient (`standard`) or the L0 coefficient (`jumprelu`);
    TopK's sparsity is `k`. `aux_coefficient`: weight of TopK's dead-feature loss.
    `bandwidth`: width of JumpReLU's straight-through estimator's window. Defaults are
    SAELens's.
    """

    d_in: int
    d_sae: int
    kind: str = "standard"
    """One of `KINDS`."""
    k: int | None = None
    sparsity_coefficient: float = 0.0
    aux_coefficient: float = 1.0
    bandwidth: float = 0.05

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in, at_least=1)
        check_int("d_sae", self.d_sae, at_least=1)
        check_choice("kind", self.kind, KINDS)
        if self.kind == "topk":
            if self.k is None:
                raise ValueError("a topk SAE needs k (how many features fire per token)")
            check_int("k", self.k, at_least=1)
            if self.k > self.d_sae:
                raise ValueError(f"k={self.k} is more than the SAE's d_sae={self.d_sae} features")
        elif self.k is not None:
            raise ValueError(f"k is TopK's; a {self.kind} SAE takes sparsity_coefficient")
        check_number("sparsity_coefficient", self.sparsity_coefficient, at_least=0.0)
        check_number("aux_coefficient", self.aux_coefficient, at_least=0.0)
        check_number("bandwidth", self.bandwidth, above=0.0)


def init_sae(
    config: SAEConfig,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SAE:
    """Decoder rows in random directions with norm 0.1 (SAELens's `decoder_init_norm`; TopK's
    at norm 1, which its training keeps), the encoder their transpose, biases 0, JumpReLU
    thresholds 0.01 (SAELens's defaults)."""
    check_int("seed", seed, at_least=0)
    generator = torch.Generator().manual_seed(seed)
    w_dec = torch.rand(config.d_sae, config.d_in, generator=generator) * 2 - 1
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * (1.0 if config.kind == "topk" else 0.1)
    sae = {
        "W_enc": w_dec.T.clone(),
        "b_enc": torch.zeros(config.d_sae),
        "W_dec": w_dec,
        "b_dec": torch.zeros(config.d_in),
    }
    if config.kind == "jumprelu":
        sae["threshold"] = torch.full((config.d_sae,), 0.01)
    return {name: value.to(device=device, dtype=dtype) for name, value in sae.items()}


def check_sae(sae: SAE, config: SAEConfig) -> None:
    """Raise `KeyError` naming missing or unexpected tensors, `ValueError` a misshapen one."""
    d_in, d_sae = config.d_in, config.d_sae
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if config.kind == "jumprelu":
        expected["threshold"] = (d_sae,)
    check_shapes(sae, expected, what=f"sae ({config.kind}, d_in={d_in}, d_sae={d_sae})")


def pre_activations(
    sae: SAE, x: Float[Tensor, "*batch d_in"], config: SAEConfig
) -> Float[Tensor, "*batch d_sae"]:
    """`(x - b_dec) W_enc + b_enc`, the encoder's output before its activation function."""
    return (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]


def encode(
    sae: SAE, x: Float[Tensor, "*batch d_in"], config: SAEConfig
) -> Float[Tensor, "*batch d_sae"]:
    """Feature activations: ReLU, the top k (ReLU'd), or JumpReLU of the pre-activations."""
    return _activate(sae, pre_activations(sae, x, config), config)


def _activate(sae: SAE, pre: Tensor, config: SAEConfig) -> Tensor:
    if config.kind == "standard":
        return F.relu(pre)
    if config.kind == "topk":
        top = pre.topk(config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    threshold = sae["threshold"]
    # pre * H(pre - threshold); the added term is 0 in value and gives the threshold the
    # straight-through gradient -(threshold / bandwidth) * rect((pre - threshold) / bandwidth).
    window = _window(pre, threshold, config.bandwidth)
    jump = threshold * threshold.detach() * window / config.bandwidth
    return F.relu(pre) * (pre > threshold) - (jump - jump.detach())


def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The rectangle kernel of JumpReLU's estimator, `|pre - threshold| < bandwidth / 2`."""
    return ((pre.detach() - threshold.detach()).abs() < bandwidth / 2).to(pre.dtype)


def decode(
    sae: SAE, features: Float[Tensor, "*batch d_sae"], config: SAEConfig
) -> Float[Tensor, "*batch d_in"]:
    """The reconstruction `features W_dec + b_dec`."""
    return features @ sae["W_dec"] + sae["b_dec"]


class SAELoss(NamedTuple):
    """One batch's training loss and its parts (each a scalar)."""

    loss: Float[Tensor, ""]
    mse: Float[Tensor, ""]
    """Squared error summed over `d_in`, averaged over the batch (SAELens's `mse_loss`)."""
    sparsity: Float[Tensor, ""]
    """The coefficient times the decoder-norm-weighted L1 (standard) or the L0 (JumpReLU)."""
    aux: Float[Tensor, ""]
    """TopK's dead-feature loss, times its coefficient."""


def sae_loss(
    sae: SAE,
    x: Float[Tensor, "batch d_in"],
    config: SAEConfig,
    *,
    dead: Bool[Tensor, " d_sae"] | None = None,
) -> tuple[SAELoss, Float[Tensor, "batch d_sae"]]:
    """The training loss on a batch of activations, and the batch's feature activations.

    `dead` (TopK): features that have not fired for a while; the auxiliary loss has the top
    `d_in // 2` of them reconstruct the main reconstruction's error (Gao et al. 2024, A.2).
    TopK's loss reads and differentiates only the k chosen features of each row (`_topk_loss`).
    """
    if config.kind == "topk":
        return _topk_loss(sae, x, config, dead)
    pre = pre_activations(sae, x, config)
    features = _activate(sae, pre, config)
    mse = (decode(sae, features, config) - x).pow(2).sum(-1).mean()
    if config.kind == "standard":
        weighted = features * sae["W_dec"].norm(dim=1)
        sparsity = config.sparsity_coefficient * weighted.abs().sum(-1).mean()
    else:
        threshold = sae["threshold"]
        window = _window(pre, threshold, config.bandwidth)
        # H(pre - threshold) counted, with the same straight-through gradient to the threshold.
        step = (pre > threshold).to(pre.dtype)
        surrogate = threshold * window / config.bandwidth
        l0 = (step - (surrogate - surrogate.detach())).sum(-1).mean()
        sparsity = config.sparsity_coefficient * l0
    return SAELoss(mse + sparsity, mse, sparsity, mse.new_zeros(())), features


def _topk_loss(
    sae: SAE, x: Tensor, config: SAEConfig, dead: Tensor | None
) -> tuple[SAELoss, Tensor]:
    """TopK's loss with the dense work only in choosing features (no gradient there): the
    chosen pre-activations and the decoder are differentiated through their k rows each, so a
    step costs one dense matmul instead of six (the same values as the dense definition)."""
    centered = x - sae["b_dec"]
    with torch.no_grad():
        pre = centered @ sae["W_enc"] + sae["b_enc"]
    top = pre.topk(config.k, dim=-1)
    acts = F.relu(_ChosenPre.apply(centered, sae["W_enc"], sae["b_enc"], top.indices, top.values))
    reconstruction = _decode_chosen(sae, top.indices, acts)
    mse = (reconstruction - x).pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    if dead is not None and (n_dead := int(dead.sum())) > 0:
        k_aux = x.shape[-1] // 2
        error = (x - reconstruction).detach()
        chosen = pre.masked_fill(~dead, -math.inf).topk(min(k_aux, n_dead), dim=-1)
        revived = F.relu(
            _ChosenPre.apply(centered, sae["W_enc"], sae["b_enc"], chosen.indices, chosen.values)
        )
        revived_reconstruction = _decode_chosen(sae, chosen.indices, revived) - sae["b_dec"]
        auxiliary = (revived_reconstruction - error).pow(2).sum(-1).mean()
        aux = config.aux_coefficient * min(n_dead / k_aux, 1.0) * auxiliary
    features = torch.zeros_like(pre).scatter(-1, top.indices, acts.detach())
    return SAELoss(mse + aux, mse, mse.new_zeros(()), aux), features


def _decode_chosen(sae: SAE, indices: Tensor, acts: Tensor) -> Tensor:
    """`decode` of features that are `acts` at `indices` and 0 elsewhere: k rows per token."""
    return (
        F.embedding_bag(indices, sae["W_dec"], per_sample_weights=acts, mode="sum") + sae["b_dec"]
    )


class _ChosenPre(torch.autograd.Function):
    """Pre-activations at chosen features, `centered . W_enc[:, i] + b_enc[i]`, given their
    values; the backward reads only those k columns of `W_enc` per row."""

    @staticmethod
    def forward(centered, w_enc, b_enc, indices, values):
        return values.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        centered, w_enc, _, indices, _ = inputs
        ctx.save_for_backward(centered, w_enc, indices)

    @staticmethod
    def backward(ctx, grad):
        centered, w_enc, indices = ctx.saved_tensors
        batch, k = indices.shape
        d_sae = w_enc.shape[1]
        grad_centered = F.embedding_bag(indices, w_enc.T, per_sample_weights=grad, mode="sum")
        rows = torch.arange(batch, device=grad.device).repeat_interleave(k)
        chosen = torch.sparse_coo_tensor(
            torch.stack([indices.flatten(), rows]),
            grad.flatten(),
            (d_sae, batch),
            check_invariants=False,
        )
        grad_w_enc = torch.sparse.mm(chosen, centered).T
        grad_b_enc = grad.new_zeros(d_sae).index_add_(0, indices.flatten(), grad.flatten())
        return grad_centered, grad_w_enc, grad_b_enc, None, None


def normalize_decoder(sae: SAE) -> SAE:
    """The SAE with each decoder row scaled to unit norm (TopK keeps it so after every step)."""
    return {**sae, "W_dec": sae["W_dec"] / sae["W_dec"].norm(dim=1, keepdim=True)}


# --- splicing and feature interventions ------------------------------------------------------


FeatureEdit = Callable[[Tensor], Tensor]
"""`features -> features` on `(batch, seq, d_sae)` feature activations."""


def splice(
    site: str,
    sae: SAE,
    config: SAEConfig,
    *,
    error_term: bool = False,
    edit: FeatureEdit | None = None,
) -> Hooks:
    """Hooks that replace the activation at `site` by the SAE's reconstruction of it.

    `edit` changes the features before decoding (ablation, clamping, steering in feature
    space). `error_term=True` keeps the reconstruction error: the activation becomes
    `x + decode(edit(f)) - decode(f)`, so without an edit the model runs exactly as unhooked
    and with one only the edit's effect flows on (the "SAE with an error node" setup).
    """
    check_sae(sae, config)

    def hook(activation: Tensor) -> Tensor:
        x = _flat(activation, site, config).to(sae["W_enc"].dtype)
        features = encode(sae, x, config)
        edited = features if edit is None else edit(features)
        if error_term:
            out = x + (decode(sae, edited, config) - decode(sae, features, config))
        else:
            out = decode(sae, edited, config)
        return out.reshape(activation.shape).to(activation.dtype)

    return {site: hook}


def ablate_features(
    site: str, sae: SAE, config: SAEConfig, features: Sequence[int], *, error_term: bool = True
) -> Hooks:
    """`splice` with the given features set to 0 (by default keeping the error term)."""
    chosen = _features(features, config)

    def zero(acts: Tensor) -> Tensor:
        keep = torch.ones(acts.shape[-1], dtype=acts.dtype, device=acts.device)
        keep[chosen] = 0
        return acts * keep

    return splice(site, sae, config, error_term=error_term, edit=zero)


def steer_feature(site: str, sae: SAE, config: SAEConfig, feature: int, *, scale: float) -> Hooks:
    """Add `scale` times the feature's decoder row to the activation at `site` (every position)."""
    check_sae(sae, config)
    (index,) = _features([feature], config)
    scale = check_number("scale", scale)
    direction = sae["W_dec"][index]

    def hook(activation: Tensor) -> Tensor:
        flat = _flat(activation, site, config)
        return (flat + scale * direction.to(flat.dtype)).reshape(activation.shape)

    return {site: hook}


def _features(features: Sequence[int], config: SAEConfig) -> list[int]:
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or not features:
        raise ValueError(f"features must be a non-empty list of ints, got {features!r}")
    chosen = [check_int("feature", f, at_least=0) for f in features]
    for f in chosen:
        if f >= config.d_sae:
            raise ValueError(f"feature {f} is outside the SAE's {config.d_sae} features")
    return chosen


def _flat(activation: Tensor, site: str, config: SAEConfig) -> Tensor:
    """`(batch, seq, ...)` as `(batch, seq, d_in)`: a head axis is flattened into the last."""
    flat = activation.flatten(2)
    if flat.shape[-1] != config.d_in:
        raise ValueError(
            f"the SAE reads d_in={config.d_in} but {site!r} has {flat.shape[-1]} values per "
            f"position (shape {tuple(activation.shape)})"
        )
    return flat


# --- training ---------------------------------------------------------------------------------


class SAETrainSettings(NamedTuple):
    """How `train_sae` streams activations and steps the optimizer (batch, lr, betas and the
    dead-feature window are SAELens's defaults)."""

    steps: int = 1000
    batch_size: int = 4096
    """Activations per SAE step."""
    model_batch_size: int = 8
    """Sequences per model pass."""
    block_size: int = 128
    """Tokens per sequence."""
    buffer_batches: int = 8
    """The shuffle buffer holds this many SAE batches of activations."""
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    dead_after: int = 1000
    """Steps without firing after which TopK counts a feature as dead (auxiliary loss)."""
    seed: int = 0


def activation_batches(
    params: Params,
    config: GPTConfig,
    site: str,
    data: Tokens,
    settings: SAETrainSettings,
) -> Iterator[Float[Tensor, "batch d_in"]]:
    """Shuffled batches of the activations at `site` over random rows of `data` (token ids).

    The model runs to `site` and stops; a buffer of `buffer_batches` batches is filled, its
    rows shuffled and served, then filled again. A pure function of its arguments.
    """
    check_hooks({site: identity}, config)
    generator = torch.Generator().manual_seed(settings.seed)
    device = params["wte.weight"].device
    buffer_rows = settings.buffer_batches * settings.batch_size
    lm_step = 0
    while True:
        chunks, rows = [], 0
        while rows < buffer_rows:
            tokens, _ = get_batch(
                data,
                batch_size=settings.model_batch_size,
                block_size=settings.block_size,
                seed=settings.seed,
                step=lm_step,
                device=device,
            )
            lm_step += 1
            with torch.no_grad():
                activation, _ = transformer(params, tokens, config, stop_at=site)
            chunk = activation.flatten(2).flatten(0, 1).float()
            chunks.append(chunk)
            rows += len(chunk)
        buffer = torch.cat(chunks)
        order = torch.randperm(len(buffer), generator=generator).to(device)
        for start in range(0, buffer_rows, settings.batch_size):
            yield buffer[order[start : start + settings.batch_size]]


class StepLog(NamedTuple):
    """One training step of every SAE: `losses[i]`, `l0[i]` and `saes[i]` are SAE i's."""

    step: int
    losses: list[SAELoss]
    l0: list[float]
    saes: list[SAE]
    """The SAEs after this step (for checkpoints)."""


def train_sae(
    params: Params,
    config: GPTConfig,
    site: str,
    data: Tokens,
    sae_configs: Sequence[SAEConfig],
    *,
    settings: SAETrainSettings | None = None,
    saes: Sequence[SAE] | None = None,
    log: Callable[[StepLog], None] | None = None,
) -> list[SAE]:
    """Train one SAE per config on the activations at `site` from one pass of the model.

    Every step draws one shuffled batch (`activation_batches`) and each SAE takes an AdamW
    step (no weight decay) on it, so K SAEs cost one model pass, and each ends exactly as it
    would trained alone with the same settings. `saes`: starting points (default `init_sae`
    with seed `settings.seed + i`). `settings`: default `SAETrainSettings()`. `log` is called after every step.
    """
    if not sae_configs:
        raise ValueError("sae_configs must name at least one SAE to train")
    settings = SAETrainSettings() if settings is None else settings
    check_int("steps", settings.steps, at_least=1)
    check_int("batch_size", settings.batch_size, at_least=1)
    check_int("model_batch_size", settings.model_batch_size, at_least=1)
    check_int("block_size", settings.block_size, at_least=1)
    check_int("buffer_batches", settings.buffer_batches, at_least=1)
    check_int("dead_after", settings.dead_after, at_least=1)
    device = params["wte.weight"].device
    width = site_width(params, config, site)
    for sae_config in sae_configs:
        _check_reads(sae_config, site, width)
    if settings.block_size > config.block_size:
        raise ValueError(
            f"block_size={settings.block_size} is longer than the model's {config.block_size}"
        )
    if saes is None:
        saes = [
            init_sae(c, seed=settings.seed + i, device=device) for i, c in enumerate(sae_configs)
        ]
    elif len(saes) != len(sae_configs):
        raise ValueError(f"{len(saes)} saes for {len(sae_configs)} sae_configs")
    for sae, sae_config in zip(saes, sae_configs, strict=True):
        check_sae(sae, sae_config)
    opt = optim.adamw(settings.lr, betas=settings.betas, weight_decay=0.0)
    trained = [dict(sae) for sae in saes]
    states = [opt.init(sae) for sae in trained]
    since_fired = [torch.zeros(c.d_sae, dtype=torch.long, device=device) for c in sae_configs]
    batches = activation_batches(params, config, site, data, settings)
    for step in range(settings.steps):
        x = next(batches)
        losses, l0 = [], []
        for i, sae_config in enumerate(sae_configs):
            dead = since_fired[i] >= settings.dead_after if sae_config.kind == "topk" else None
            trained[i], states[i], loss, fired = _step(
                trained[i], states[i], x, sae_config, opt, dead
            )
            since_fired[i] = torch.where(fired.any(0), 0, since_fired[i] + 1)
            losses.append(loss)
            if log is not None:  # float() waits for the device: only for a step that is logged
                l0.append(float(fired.sum(-1).float().mean()))
        if log is not None:
            log(StepLog(step, losses, l0, list(trained)))
    return trained


def _step(
    sae: SAE,
    state: optim.OptState,
    x: Tensor,
    config: SAEConfig,
    opt: optim.Optimizer,
    dead: Tensor | None,
) -> tuple[SAE, optim.OptState, SAELoss, Tensor]:
    """One AdamW step of one SAE: new params, state, the loss's parts and which features fired."""
    leaves = {name: value.detach().requires_grad_() for name, value in sae.items()}
    loss, features = sae_loss(leaves, x, config, dead=dead)
    grads = dict(zip(leaves, torch.autograd.grad(loss.loss, list(leaves.values())), strict=True))
    new, state = opt.update(grads, state, sae)
    if config.kind == "topk":
        new = normalize_decoder(new)
    elif config.kind == "jumprelu":
        new["threshold"] = new["threshold"].clamp(min=0.0)
    detached = SAELoss(*(part.detach() for part in loss))
    return new, state, detached, features.detach() > 0


def site_width(params: Params, config: GPTConfig, site: str) -> int:
    """Values per position at `site` (a head axis flattened), from one token's run."""
    check_hooks({site: identity}, config)
    one = torch.zeros((1, 1), dtype=torch.long, device=params["wte.weight"].device)
    with torch.no_grad():
        activation, _ = transformer(params, one, config, stop_at=site)
    return activation.flatten(2).shape[-1]


def _check_reads(sae_config: SAEConfig, site: str, width: int) -> None:
    """A `ValueError` unless the SAE reads `width` values per position, as `site` holds."""
    if sae_config.d_in != width:
        raise ValueError(
            f"an SAE with d_in={sae_config.d_in} cannot read {site!r}, which has {width} values "
            "per position"
        )


# --- evaluation (SAELens's definitions) -------------------------------------------------------


class SAEMetrics(NamedTuple):
    """An SAE's fidelity and sparsity on a set of token rows (SAELens's definitions)."""

    l0: float
    """Features firing per token, averaged."""
    dead_features: int
    """Features that fired on no token."""
    explained_variance: float
    """`1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2` over tokens."""
    mse: float
    """Squared error summed over `d_in`, averaged over tokens (SAELens's eval and training MSE)."""
    ce_loss_clean: float
    ce_loss_spliced: float
    """Next-token loss with the site replaced by the reconstruction (`splice`)."""
    ce_loss_zero: float
    """Next-token loss with the site zero-ablated."""
    ce_loss_recovered: float
    """`(zero - spliced) / (zero - clean)`: 1 is a perfect reconstruction, 0 no better than 0."""


def evaluate_sae(
    params: Params,
    config: GPTConfig,
    site: str,
    sae: SAE,
    sae_config: SAEConfig,
    tokens: Int[Tensor, "batch seq"],
) -> SAEMetrics:
    """Metrics of `sae` at `site` on the rows `tokens` (each scored on its next tokens)."""
    check_sae(sae, sae_config)
    check_hooks({site: identity}, config)
    inputs = tokens[:, :-1]
    with torch.no_grad():
        activation, _ = transformer(params, inputs, config, stop_at=site)
        x = activation.flatten(2).flatten(0, 1).float()
        _check_reads(sae_config, site, x.shape[-1])
        features = encode(sae, x, sae_config)
        error = decode(sae, features, sae_config) - x
        fired = features > 0
        total = (x - x.mean(0)).pow(2).sum()
    clean = _mean_loss(params, tokens, config, None)
    spliced = _mean_loss(params, tokens, config, splice(site, sae, sae_config))
    zero = _mean_loss(params, tokens, config, {site: torch.zeros_like})
    return SAEMetrics(
        l0=float(fired.sum(-1).float().mean()),
        dead_features=int((~fired.any(0)).sum()),
        explained_variance=float(1 - error.pow(2).sum() / total),
        mse=float(error.pow(2).sum(-1).mean()),
        ce_loss_clean=clean,
        ce_loss_spliced=spliced,
        ce_loss_zero=zero,
        ce_loss_recovered=(zero - spliced) / (zero - clean),
    )


def _mean_loss(params: Params, tokens: Tensor, config: GPTConfig, hooks: Hooks | None) -> float:
    scores = token_scores(params, tokens, config, hooks=hooks)
    return float(-scores.logprobs.sum() / scores.scored.sum())


# --- SAELens's on-disk format -----------------------------------------------------------------

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"
"""The SAELens version whose `cfg.json` layout `save_sae` writes."""
# A block's sites by their TransformerLens hook names, which SAELens's `hook_name` uses.
_TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "attn.q": "attn.hook_q",
    "attn.k": "attn.hook_k",
    "attn.v": "attn.hook_v",
    "attn.z": "attn.hook_z",
    "attn.out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp.pre": "mlp.hook_pre",
    "mlp.post": "mlp.hook_post",
    "mlp.out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


def tl_hook_name(site: str) -> str:
    """TransformerLens's name for a block site (`h.2.resid_post` -> `blocks.2.hook_resid_post`);
    other sites keep their own name."""
    pieces = site.split(".", 2)
    if len(pieces) == 3 and pieces[0] == "h" and pieces[2] in _TL_HOOKS:
        return f"blocks.{pieces[1]}.{_TL_HOOKS[pieces[2]]}"
    return site


def site_from_tl(hook_name: str) -> str:
    """The site a TransformerLens hook name names (the inverse of `tl_hook_name`)."""
    pieces = hook_name.split(".", 2)
    by_hook = {hook: part for part, hook in _TL_HOOKS.items()}
    if len(pieces) == 3 and pieces[0] == "blocks" and pieces[2] in by_hook:
        return f"h.{pieces[1]}.{by_hook[pieces[2]]}"
    return hook_name


def save_sae(folder: str | os.PathLike[str], sae: SAE, config: SAEConfig, *, site: str) -> Path:
    """Write `sae` as SAELens does: `cfg.json` (the site as TransformerLens's hook name, the
    training coefficients under `metadata.gpt_fn`) and `sae_weights.safetensors` in `folder`."""
    check_sae(sae, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, object] = {
        "architecture": config.kind,
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": str(sae["W_enc"].dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if site.endswith("attn.z") else "none",
        "metadata": {
            # SAELens reads its 6.x layout (metadata nested) from files that name a 6.x version.
            "sae_lens_version": SAELENS_FORMAT,
            "hook_name": tl_hook_name(site),
            "gpt_fn": asdict(config),
        },
    }
    if config.kind == "topk":
        cfg["k"] = config.k
    tensors = {name: value.contiguous().cpu() for name, value in sae.items()}
    write_atomic(folder / WEIGHTS_FILE, lambda path: save_file(tensors, path))
    write_atomic(folder / CONFIG_FILE, (json.dumps(cfg, indent=2) + "\n").encode())
    return folder


def load_sae(
    folder: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[SAE, SAEConfig, str | None]:
    """An SAE folder in SAELens's format: its params, config and site (TransformerLens's hook
    names read as sites; None if the folder names none)."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}: not an SAE folder in SAELens's format"
            )
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    architecture = cfg.get("architecture", "standard")
    if architecture not in KINDS:
        raise ValueError(f"{folder}/{CONFIG_FILE}: unsupported architecture {architecture!r}")
    if (
        not cfg.get("apply_b_dec_to_input", True)
        or cfg.get("normalize_activations", "none") != "none"
    ):
        raise ValueError(
            f"{folder}/{CONFIG_FILE}: only SAEs that subtract b_dec from their input and do not "
            "normalise activations load here"
        )
    metadata = cfg.get("metadata") or {}
    saved = metadata.get("gpt_fn", {}) if isinstance(metadata, dict) else {}
    config = SAEConfig(
        d_in=cfg["d_in"],
        d_sae=cfg["d_sae"],
        kind=architecture,
        k=cfg.get("k") if architecture == "topk" else None,
        **{
            name: saved[name]
            for name in ("sparsity_coefficient", "aux_coefficient", "bandwidth")
            if name in saved
        },
    )
    sae = {name: value.to(device) for name, value in load_file(folder / WEIGHTS_FILE).items()}
    if architecture == "jumprelu" and "log_threshold" in sae:
        sae["threshold"] = sae.pop("log_threshold").exp()
    check_sae(sae, config)
    hook_name = (metadata if isinstance(metadata, dict) else {}).get(
        "hook_name", cfg.get("hook_name")
    )
    return sae, config, None if hook_name is None else site_from_tl(hook_name)
