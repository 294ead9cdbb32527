"""Layer 1: pure layer functions over slices of the parameter dict."""

from gpt_fn.nn.attention import (
    KERNELS,
    AttentionKernel,
    Kernel,
    KernelName,
    KVWriter,
    Mask,
    Tap,
    attention_kernel,
    attention_pattern,
    attention_scores,
    causal_mask,
    manual_kernel,
    project_heads,
    sdpa_kernel,
    self_attention,
)
from gpt_fn.nn.cross_entropy import TokenLogProbs, linear_cross_entropy, linear_log_probs
from gpt_fn.nn.layers import dropout, embed, layer_norm, mlp

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "KVWriter",
    "Kernel",
    "KernelName",
    "Mask",
    "Tap",
    "TokenLogProbs",
    "attention_kernel",
    "attention_pattern",
    "attention_scores",
    "causal_mask",
    "dropout",
    "embed",
    "layer_norm",
    "linear_cross_entropy",
    "linear_log_probs",
    "manual_kernel",
    "mlp",
    "project_heads",
    "sdpa_kernel",
    "self_attention",
]
