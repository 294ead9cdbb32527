"""Layer 1: pure layer functions over slices of the parameter dict."""

from gpt_fn.nn.attention import KERNELS, Kernel, LayerCache, attention, manual_kernel, sdpa_kernel
from gpt_fn.nn.cross_entropy import linear_cross_entropy
from gpt_fn.nn.layers import dropout, embed, layer_norm, mlp

__all__ = [
    "KERNELS",
    "Kernel",
    "LayerCache",
    "attention",
    "dropout",
    "embed",
    "layer_norm",
    "linear_cross_entropy",
    "manual_kernel",
    "mlp",
    "sdpa_kernel",
]
