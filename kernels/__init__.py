"""fastgpt's hot-path ops. Each runs a Triton kernel or its PyTorch reference, as the backend says."""

from kernels.attention import causal_attention
from kernels.backend import backend, get_backend, set_backend
from kernels.layer_norm import add_layer_norm, layer_norm
from kernels.linear_gelu import linear_gelu

__all__ = ["add_layer_norm", "backend", "causal_attention", "get_backend", "layer_norm", "linear_gelu",
           "set_backend"]
