"""The GPT-2 model as pure functions over a parameter dict: init, blocks, forward, loss.

`forward(params, tokens, config)` is the whole model: embeddings, `n_layer` pre-norm blocks
(LayerNorm -> causal self-attention -> residual, LayerNorm -> 4x GELU MLP -> residual), a
final LayerNorm and the LM head tied to the token embedding (Radford et al. 2019; nanoGPT
`model.py`). Parameter names are GPT-2's (`h.3.attn.c_attn.weight`), without HF's
`transformer.` prefix. The file reads top to bottom as the math; the entry points (`forward`,
`loss`, `run_with_cache`, `forward_from`) check their arguments once, with the helpers of
`gpt_fn.checks` and the model-shaped checks at the end of this file.
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gpt_fn.checks import (
    check_attention_mask,
    check_int,
    check_one_dtype_and_device,
    check_seed,
    check_shapes,
    check_token_batch,
    check_token_ids,
    check_token_tensor,
)
from gpt_fn.config import GPTConfig
from gpt_fn.nn import (
    AttentionKernel,
    KVWriter,
    Mask,
    attention_kernel,
    dropout,
    embed,
    layer_norm,
    linear_cross_entropy,
    mlp,
    self_attention,
)
from gpt_fn.nn.kv_cache import KVCache
from gpt_fn.nn.kv_cache import empty_cache as empty_cache  # importable from here too
from gpt_fn.nn.padding import as_batch, attention_mask_4d, cache_attention_mask
from gpt_fn.nn.padding import positions as padding_positions
from gpt_fn.shapes import Activations, Logits, Params, Tokens
from gpt_fn.sites import (
    EMBED_SITES,
    UNHOOKED,
    Hook,
    Hooks,
    LayerTaps,
    apply_hook,
    check_hooks,
    identity,
    layer_taps,
    site_names,
    top_taps,
)


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the one vocabulary of names)."""
    d, c = config.n_embd, config
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (c.vocab_size, d),
        "wpe.weight": (c.block_size, d),
    }

    def linear(name: str, d_out: int, d_in: int) -> None:
        shapes[f"{name}.weight"] = (d_out, d_in)
        if c.bias:
            shapes[f"{name}.bias"] = (d_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (d,)
        if c.bias:
            shapes[f"{name}.bias"] = (d,)

    for i in range(c.n_layer):
        norm(f"h.{i}.ln_1")
        linear(f"h.{i}.attn.c_attn", 3 * d, d)
        linear(f"h.{i}.attn.c_proj", d, d)
        norm(f"h.{i}.ln_2")
        linear(f"h.{i}.mlp.c_fc", 4 * d, d)
        linear(f"h.{i}.mlp.c_proj", d, 4 * d)
    norm("ln_f")
    return shapes


def init_params(
    config: GPTConfig,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Params:
    """GPT-2 initialisation, the same numbers for a seed on every device.

    Weights ~ N(0, 0.02); the projections that write into the residual stream (`c_proj`)
    ~ N(0, 0.02 / sqrt(2 n_layer)) so the residual's variance does not grow with depth (GPT-2
    paper, section 2.3); biases 0; LayerNorm gains 1. `wte` doubles as the LM head.
    """
    check_seed("seed", seed)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params: Params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".bias"):
            value = torch.zeros(shape)
        elif len(shape) == 1:  # LayerNorm gain
            value = torch.ones(shape)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            value = torch.randn(shape, generator=generator) * std
        params[name] = value.to(device=device, dtype=dtype)
    return params


BlockParams = dict[str, Params]
"""One block's params by part: `{"ln_1": {...}, "attn": {...}, "ln_2": {...}, "mlp": {...}}`."""


def split_params(params: Params, n_layer: int) -> tuple[dict[str, Params], list[BlockParams]]:
    """One pass over the dict: top-level parts' params, and per block its parts' params.

    `blocks[i]["attn"]` maps `"c_attn.weight"` to `params["h.{i}.attn.c_attn.weight"]` and
    `top["ln_f"]` maps `"weight"` to `params["ln_f.weight"]`; the layer functions read relative
    names, and a decode step pays O(params), not O(layers x params).
    """
    top: dict[str, Params] = {}
    blocks: list[BlockParams] = [
        {"ln_1": {}, "attn": {}, "ln_2": {}, "mlp": {}} for _ in range(n_layer)
    ]
    for name, value in params.items():
        if name.startswith("h."):
            _, index, part, rest = name.split(".", 3)
            blocks[int(index)][part][rest] = value
        else:
            part, rest = name.split(".", 1)
            top.setdefault(part, {})[rest] = value
    return top, blocks


def block(
    p: BlockParams,
    x: Activations,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    mask: Mask | None = None,
    kv: KVWriter | None = None,
    taps: LayerTaps | None = None,
    generator: torch.Generator | None = None,
) -> Activations:
    """One pre-norm block: `x + attn(ln_1(x))`, then `+ mlp(ln_2(.))` (dropout on both branches).

    `attention`/`mask`/`kv` as in `gpt_fn.nn.self_attention`; `taps` apply the block's hooks
    (a block whose scores or pattern are hooked runs `manual_kernel` with its taps instead).
    """
    taps = UNHOOKED if taps is None else taps
    tap, eps, rate = taps.block, config.layer_norm_eps, config.dropout
    x = tap("resid_pre", x)
    h = tap("ln_1", layer_norm(p["ln_1"], x, eps=eps, tap=taps.ln_1))
    a = self_attention(
        p["attn"],
        h,
        n_head=config.n_head,
        attention=taps.kernel or attention,
        mask=mask,
        kv=kv,
        tap=taps.attn,
        results=taps.head_results,
    )
    x = tap("resid_mid", x + dropout(tap("attn.out", a), rate=rate, generator=generator))
    h = tap("ln_2", layer_norm(p["ln_2"], x, eps=eps, tap=taps.ln_2))
    m = tap("mlp.out", mlp(p["mlp"], h, tap=taps.mlp))
    return tap("resid_post", x + dropout(m, rate=rate, generator=generator))


BlockFn = Callable[..., Activations]
"""Runs block `i` as `fn(x, mask=, kv=, taps=, generator=)`: how the `GPT` module has
`transformer` call its block submodules (so FSDP's per-block hooks fire)."""


def transformer(
    params: Params,
    tokens: Tokens,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    attention_mask: Bool[Tensor, "batch seq"] | None = None,
    cache: KVCache | None = None,
    write: Literal["copy", "in_place"] = "copy",
    hooks: Hooks | None = None,
    generator: torch.Generator | None = None,
    blocks: Sequence[BlockFn] | None = None,
    stop_at: str | None = None,
) -> tuple[Float[Tensor, "batch ..."], KVCache | None]:
    """Final-LayerNormed hidden states of `tokens`, and the cache holding their keys/values.

    - `attention_mask` (`batch seq`, True = real): positions and attention follow it, so each
      row is computed as if it were alone (`gpt_fn.nn.padding`); without one, every token is
      real. Ignored with a `cache`, which knows its rows' padding.
    - `cache`: `tokens` come after the tokens in it and are written into its next slots;
      the returned cache has them. `write="copy"` leaves `cache` as it was (new buffers, as
      pure code expects); `"in_place"` writes into its buffers (a decoding loop's speed).
      Without a cache the returned cache is `None`.
    - `hooks`: `{site: hook}` (`gpt_fn.sites`); a hook sees this call's positions.
    - `generator` switches dropout on (config.dropout > 0); without one the function is
      deterministic.
    - `params` may hold only the top-level params when `blocks` runs the blocks itself.
    - `stop_at`: a site (`embed` .. `ln_f`); the run stops right after it and returns the
      activation there (after its hook) and no cache: no later site, block or LayerNorm runs.

    `attention` is resolved here, once per call (`gpt_fn.nn.attention_kernel`); the other
    inputs are not validated here: `forward`/`loss`/decoding do that once.
    """
    attention = attention_kernel(attention)
    if stop_at is not None:
        if cache is not None:
            raise ValueError("stop_at runs part of the model, which leaves no KV cache to return")
        return _run_until(
            stop_at,
            config,
            hooks,
            lambda stopping: transformer(
                params,
                tokens,
                config,
                attention=attention,
                attention_mask=attention_mask,
                hooks=stopping,
                generator=generator,
                blocks=blocks,
            ),
        ), None
    top, block_params = split_params(params, 0 if blocks is not None else config.n_layer)
    seq = tokens.shape[1]
    if cache is not None:
        positions = (
            cache.lengths[:, None] - cache.starts[:, None] + torch.arange(seq, device=tokens.device)
        )
        positions = positions.clamp(min=0)
        slots = cache.attended_slots(seq)
        mask = cache_attention_mask(cache.starts, cache.lengths, seq, slots)
    elif attention_mask is not None:
        positions, mask = padding_positions(attention_mask), attention_mask_4d(attention_mask)
    else:
        positions, mask = None, None
    embed_tap, ln_f_tap = top_taps(hooks)
    x = embed(top["wte"]["weight"], top["wpe"]["weight"], tokens, positions, tap=embed_tap)
    if hooks and "embed" in hooks:
        x = apply_hook("embed", hooks["embed"], x)
    x = dropout(x, rate=config.dropout, generator=generator)
    taps = layer_taps(hooks, config.n_layer)
    keys, values = [], []
    for i in range(config.n_layer):
        kv = None if cache is None else _writer(cache, i, write, keys, values, slots)
        if blocks is None:
            x = block(
                block_params[i],
                x,
                config,
                attention=attention,
                mask=mask,
                kv=kv,
                taps=taps[i],
                generator=generator,
            )
        else:
            x = blocks[i](x, mask=mask, kv=kv, taps=taps[i], generator=generator)
    x = layer_norm(top["ln_f"], x, eps=config.layer_norm_eps, tap=ln_f_tap)
    if hooks and "ln_f" in hooks:
        x = apply_hook("ln_f", hooks["ln_f"], x)
    if cache is None:
        return x, None
    return x, KVCache(tuple(keys), tuple(values), cache.starts, cache.lengths + seq)


def _writer(
    cache: KVCache,
    layer: int,
    write: str,
    keys: list[Tensor],
    values: list[Tensor],
    attended: int,
) -> KVWriter:
    """Layer `layer`'s writer: the chunk's keys/values into the slots after each row's last.

    The whole buffers go to the returned cache; attention reads their first `attended` (views)."""

    def store(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        batch, n_head, seq, d_head = k.shape
        slots = cache.lengths[:, None] + torch.arange(seq, device=k.device)
        if write == "in_place":
            # Indexed assignment (index_put_), not scatter_: inductor writes it in place into a
            # compiled step's cache inputs, where a scatter_ copies the whole buffer twice.
            rows = torch.arange(batch, device=k.device)[:, None]
            all_k, all_v = cache.keys[layer], cache.values[layer]
            all_k[rows, :, slots] = k.transpose(1, 2)  # (batch, seq, n_head, d_head) slots
            all_v[rows, :, slots] = v.transpose(1, 2)
        else:
            index = slots[:, None, :, None].expand(batch, n_head, seq, d_head)
            all_k = cache.keys[layer].scatter(2, index, k)
            all_v = cache.values[layer].scatter(2, index, v)
        keys.append(all_k)
        values.append(all_v)
        return all_k[:, :, :attended], all_v[:, :, :attended]

    return store


def lm_head(
    params: Params, hidden: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch vocab"]:
    """Logits from hidden states through the token embedding (weight tying, GPT-2)."""
    return F.linear(hidden, params["wte.weight"])


TokenRows = Sequence[Sequence[int]]
"""A batch as token lists of any lengths; gpt_fn pads it (`gpt_fn.nn.padding.pad`)."""
IGNORE_INDEX = -100
"""A target that counts in no loss (HF's label convention; padded positions count as it)."""


def forward(
    params: Params,
    tokens: Tokens | TokenRows,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    hooks: Hooks | None = None,
    generator: torch.Generator | None = None,
    blocks: Sequence[BlockFn] | None = None,
) -> Logits:
    """Next-token logits at every position: tokens in, logits out.

    `tokens` is a `(batch, seq)` tensor (with `attention_mask` when padded: each row's logits
    are then what the row gives alone; at padded positions they mean nothing), or token lists
    of any lengths, padded on the right. `hooks`: `{site: hook}` (`gpt_fn.sites`). `blocks`:
    see `transformer` (the `GPT` module's way in; `params` then holds the top-level params).
    """
    tokens, mask = _checked_inputs(params, tokens, config, attention_mask, hooks, blocks)
    hidden, _ = transformer(
        params,
        tokens,
        config,
        attention=attention,
        attention_mask=mask,
        hooks=hooks,
        generator=generator,
        blocks=blocks,
    )
    logits = lm_head(params, hidden)
    if hooks and "logits" in hooks:
        logits = apply_hook("logits", hooks["logits"], logits)
    return logits


def forward_from(
    params: Params,
    resid_pre: Activations,
    config: GPTConfig,
    *,
    layer: int,
    hooks: Hooks | None = None,
    attention: AttentionKernel = "sdpa",
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
) -> Logits:
    """The logits of a run whose residual stream entering block `layer` is `resid_pre`.

    Runs blocks `layer .. n_layer - 1`, `ln_f` and the LM head: `forward(params, tokens,
    config)` equals `forward_from(params, cache["h.{layer}.resid_pre"], config, layer=layer)`.
    `layer=n_layer` runs `ln_f` and the head alone. `hooks` may name sites of blocks from
    `layer` on, `ln_f.scale`, `ln_f` and `logits` (the earlier ones are never reached).
    `attention_mask` (`batch seq`, True = real) as in `forward`, for a padded batch's stream.
    """
    mask = _checked_stream(params, resid_pre, config, layer, attention_mask, hooks)
    attention = attention_kernel(attention)
    top, block_params = split_params(params, config.n_layer)
    taps = layer_taps(hooks, config.n_layer)
    x = resid_pre
    for i in range(layer, config.n_layer):
        x = block(block_params[i], x, config, attention=attention, mask=mask, taps=taps[i])
    x = layer_norm(top["ln_f"], x, eps=config.layer_norm_eps, tap=top_taps(hooks)[1])
    if hooks and "ln_f" in hooks:
        x = apply_hook("ln_f", hooks["ln_f"], x)
    logits = lm_head(params, x)
    if hooks and "logits" in hooks:
        logits = apply_hook("logits", hooks["logits"], logits)
    return logits


def loss(
    params: Params,
    tokens: Tokens | TokenRows,
    targets: Tokens | TokenRows,
    config: GPTConfig,
    *,
    attention: AttentionKernel = "sdpa",
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    hooks: Hooks | None = None,
    generator: torch.Generator | None = None,
    blocks: Sequence[BlockFn] | None = None,
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy of `targets` (usually `tokens` shifted left by one).

    Targets equal to `IGNORE_INDEX` (-100) and positions the mask marks as padding count in
    neither the sum nor the mean. Token lists (`tokens` and `targets` of equal lengths per
    row) are padded on the right. A `logits` hook makes the loss go through materialised
    logits; otherwise the fused LM head + cross-entropy never builds them.
    """
    tokens, mask = _checked_inputs(params, tokens, config, attention_mask, hooks, blocks)
    targets = _checked_targets(targets, tokens, mask, params, config)
    hidden, _ = transformer(
        params,
        tokens,
        config,
        attention=attention,
        attention_mask=mask,
        hooks=hooks,
        generator=generator,
        blocks=blocks,
    )
    if hooks and "logits" in hooks:
        logits = apply_hook("logits", hooks["logits"], lm_head(params, hidden))
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
        )
    # Fused LM head + loss: never materialises the (batch*seq, vocab) logits.
    return linear_cross_entropy(
        hidden.flatten(0, 1), params["wte.weight"], targets.flatten(), ignore_index=IGNORE_INDEX
    )


def run_with_cache(
    params: Params,
    tokens: Tokens | TokenRows,
    config: GPTConfig,
    *,
    names: str | Sequence[str] | Callable[[str], bool] | None = None,
    hooks: Hooks | None = None,
    attention: AttentionKernel = "sdpa",
    attention_mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"] | None = None,
    stop_at: str | None = None,
) -> tuple[Float[Tensor, "batch ..."], dict[str, Tensor]]:
    """`forward`'s logits and the activations at the sites `names` asks for, by site.

    `names`: a site, a list of sites, a predicate on site names
    (`lambda n: n.endswith("resid_post")`), or None for every site. Only those are kept. Each
    is the value that flows on there: after `hooks`' own hook at that site, if any. Asking for
    `attn.scores`/`attn.pattern` runs that layer's attention through `manual_kernel`. Works
    under `grad`, `vmap` and `compile` like `forward` (the activations are returned, not
    stashed).

    `stop_at`: a site; the run stops right after it (see `transformer`) and returns the
    activation there instead of the logits. `names` may then ask only for sites up to it
    (None: every site up to it); each is bitwise what the full run records.
    """
    if hooks is not None:
        check_hooks(hooks, config)
    sites = site_names(config)
    if stop_at is not None and stop_at in sites:
        sites = sites[: sites.index(stop_at) + 1]
    if isinstance(names, str):  # one site, not a sequence of one-letter names
        names = [names]
    if names is None:
        wanted = list(sites)
    elif callable(names):
        wanted = [site for site in sites if names(site)]
    else:
        check_hooks(dict.fromkeys(names, identity), config)
        wanted = list(names)
        later = [site for site in wanted if site not in sites]
        if later:
            raise ValueError(
                f"{later[0]!r} comes after stop_at={stop_at!r}: the run ends before it"
            )
    cache: dict[str, Tensor] = {}
    recording = dict(hooks or {})
    for site in wanted:
        recording[site] = recorder(site, (hooks or {}).get(site), cache)
    if stop_at is None or stop_at == "logits":
        out = forward(
            params,
            tokens,
            config,
            attention=attention,
            attention_mask=attention_mask,
            hooks=recording,
        )
    else:
        tokens, mask = _checked_inputs(params, tokens, config, attention_mask, recording, None)
        out, _ = transformer(
            params,
            tokens,
            config,
            attention=attention,
            attention_mask=mask,
            hooks=recording,
            stop_at=stop_at,
        )
    return out, {site: cache[site] for site in wanted}


def recorder(site: str, hook: Hook | None, cache: dict[str, Tensor]) -> Hook:
    """A hook that applies `hook` (if any) at `site` and stores the result in `cache[site]`."""

    def record(activation: Tensor) -> Tensor:
        if hook is not None:
            activation = apply_hook(site, hook, activation)
        cache[site] = activation
        return activation

    return record


class _Stop(Exception):
    """Raised by the hook at `stop_at` to end the run there, carrying the site's activation."""

    def __init__(self, activation: Tensor) -> None:
        super().__init__()
        self.activation = activation


def _run_until(
    site: str, config: GPTConfig, hooks: Hooks | None, run: Callable[[Hooks], object]
) -> Tensor:
    """The activation at `site` of `run(hooks)`, which is ended there (its hook applied)."""
    if not isinstance(site, str) or site not in site_names(config) or site == "logits":
        raise ValueError(
            f"stop_at must be an activation site from embed to ln_f, got {site!r} "
            "(gpt_fn.site_names(config) lists them)"
        )
    user_hook = (hooks or {}).get(site)

    def stop(activation: Tensor) -> Tensor:
        if user_hook is not None:
            activation = apply_hook(site, user_hook, activation)
        raise _Stop(activation)

    try:
        run({**(hooks or {}), site: stop})
    except _Stop as stopped:
        return stopped.activation
    raise AssertionError(f"the run never reached {site!r}")


# The entry points' checks (the helpers of `gpt_fn.checks`, shaped by the config): once per call.


def check_params(params: Params, config: GPTConfig, *, top_level: bool = False) -> None:
    """Raise naming the first param that does not fit `config` or the others.

    `KeyError` for a missing or unexpected key, `ValueError` for a wrong shape or a param on
    another device than `wte.weight`, `TypeError` for a non-floating param or one whose dtype
    differs from `wte.weight`'s (let through under autocast: `checks.check_one_dtype_and_device`).
    `top_level=True`: only the params outside the blocks (`wte`, `wpe`, `ln_f`).
    """
    expected = param_shapes(config)
    if top_level:
        expected = {name: shape for name, shape in expected.items() if not name.startswith("h.")}
    check_shapes(params, expected, what="params")
    check_one_dtype_and_device(params, reference="wte.weight", what="params")


def check_tokens(
    tokens: Tensor,
    config: GPTConfig,
    *,
    cropped: bool = False,
    name: str = "tokens",
) -> None:
    """Raise `ValueError`/`TypeError` naming what is wrong with a `(batch, seq)` token tensor.

    It must be an int64/int32 tensor of ids in `[0, vocab_size)` that fits in `block_size`;
    `cropped=True`: any length (the caller keeps only the last `block_size` tokens). The id
    range is not checked while compiling or under vmap.
    """
    block_size = None if cropped else config.block_size
    check_token_batch(tokens, vocab_size=config.vocab_size, block_size=block_size, name=name)


def _checked_inputs(
    params: Params,
    tokens: Tensor | TokenRows,
    config: GPTConfig,
    attention_mask: Tensor | None,
    hooks: Hooks | None,
    blocks: Sequence[BlockFn] | None,
) -> tuple[Tensor, Tensor | None]:
    """An entry point's checks: the tokens as a tensor and the mask as bool (`_batch`); the
    params, the tokens and the hooks checked against `config`."""
    tokens, mask = _batch(tokens, attention_mask, params)
    check_params(params, config, top_level=blocks is not None)
    check_tokens(tokens, config)
    if hooks is not None:
        check_hooks(hooks, config)
    return tokens, mask


def _batch(
    tokens: Tensor | TokenRows, attention_mask: Tensor | None, params: Params
) -> tuple[Tensor, Tensor | None]:
    return as_batch(tokens, attention_mask, side="right", device=params["wte.weight"].device)


def _checked_targets(
    targets: Tensor | TokenRows,
    tokens: Tensor,
    mask: Tensor | None,
    params: Params,
    config: GPTConfig,
) -> Tensor:
    """`loss`'s targets as a checked tensor shaped like `tokens`, `IGNORE_INDEX` where padded."""
    if not isinstance(targets, Tensor):
        targets, target_mask = _batch(targets, None, params)
        real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
        if target_mask is None:
            target_mask = torch.ones_like(targets, dtype=torch.bool)
        if target_mask.shape != real.shape or not torch.equal(target_mask, real):
            raise ValueError("targets must have as many tokens as tokens in every row")
    check_token_tensor("targets", targets)
    if targets.shape != tokens.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}"
        )
    ignored = targets == IGNORE_INDEX
    check_token_ids(
        "targets: token id", targets.masked_fill(ignored, 0), vocab_size=config.vocab_size
    )
    return targets if mask is None else targets.masked_fill(~mask, IGNORE_INDEX)


def _layer_of(site: str) -> int | float:
    """A block site's layer (`h.3.attn.z` -> 3); `inf` for the sites outside the blocks."""
    return int(site.split(".", 2)[1]) if site.startswith("h.") else math.inf


def _checked_stream(
    params: Params,
    resid_pre: Tensor,
    config: GPTConfig,
    layer: int,
    attention_mask: Tensor | None,
    hooks: Hooks | None,
) -> Mask | None:
    """`forward_from`'s checks; the attention mask of the stream's padding (None: none)."""
    check_int("layer", layer, at_least=0)
    if layer > config.n_layer:
        raise ValueError(f"layer must be in [0, n_layer={config.n_layer}], got {layer}")
    check_params(params, config)
    if not isinstance(resid_pre, Tensor) or resid_pre.ndim != 3:
        raise ValueError("resid_pre must be a (batch, seq, d_model) tensor")
    if resid_pre.shape[2] != config.n_embd or resid_pre.shape[1] > config.block_size:
        raise ValueError(
            f"resid_pre has shape {tuple(resid_pre.shape)}; expected (batch, seq <= "
            f"{config.block_size}, {config.n_embd}) for this config"
        )
    mask = None
    if attention_mask is not None:
        mask = attention_mask_4d(check_attention_mask(attention_mask, resid_pre[..., 0]))
    if hooks is not None:
        check_hooks(hooks, config)
        unreached = [s for s in hooks if s in EMBED_SITES or _layer_of(s) < layer]
        if unreached:
            raise ValueError(
                f"hook at {unreached[0]!r}: forward_from(layer={layer}) starts after that site"
            )
    return mask
