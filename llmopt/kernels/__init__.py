"""Kernel fusion with Triton (lesson 08): each kernel in its own file beside its PyTorch reference.

- `rmsnorm` (with the residual add fused in), `swiglu`, `softmax` (online, one pass to find max
  and sum), `rope` (q and k in one launch): memory-bound ops, fused so each byte moves once;
- `w4a16_linear` (packed INT4 weights of `llmopt.quant`, a GEMV for decode and a tiled GEMM for
  prefill) and `w8a16_linear` (INT8 weight-only GEMV): dequantize in registers, never in memory;
- `norm_linear`, `swiglu_linear` (module `kernels.gemv`, with the plain `gemv`): the decode GEMV
  with the norm or the SwiGLU before it folded in, one launch instead of two for up to 8 rows
  (`fuse(model, gemv=True)`);
- `fuse(model)`: a Llama-family model with the fused modules (and kernel-backed quantized
  linears and MoE experts) swapped in, same outputs within dtype tolerance; on a CPU its quantized
  linears decode with PyTorch's own weight-only INT8/INT4 kernels (`kernels.cpu`, fast in bfloat16);
- `llmopt bench kernels`: GB/s, fraction of peak and speedups on a GPU (`kernels.bench`).

Every op takes `backend="auto" | "triton" | "torch"`: the kernel on a GPU, the reference on a
CPU by default; "triton" runs the kernel under Triton's interpreter on a CPU (slow, exact).

    from llmopt import kernels
    y = kernels.rmsnorm(x, weight, eps=1e-5)
    kernels.fuse(model)                        # model still generates, same logits
"""
from .common import BACKENDS, HAS_TRITON, interpreted, use_triton
from .fuse import FusedAttention, FusedDecoderLayer, FusedMLP, FusedRMSNorm, fuse, set_backend
from .gemv import norm_linear, norm_linear_reference, swiglu_linear, swiglu_linear_reference
from .qlinear import KernelQuantExperts, KernelQuantLinear, StackedQuantLinear, can_stack_experts, has_kernel
from .rmsnorm import rmsnorm, rmsnorm_reference, rmsnorm_triton
from .rope import rope, rope_reference, rope_triton
from .softmax import softmax, softmax_reference, softmax_triton
from .swiglu import swiglu, swiglu_reference, swiglu_triton
from .w4a16 import dequantize_int4, w4a16_gemm, w4a16_gemv, w4a16_linear, w4a16_reference
from .w8a16 import dequantize_int8, w8a16_gemv, w8a16_linear, w8a16_reference

__all__ = [
    "BACKENDS", "HAS_TRITON", "FusedAttention", "FusedDecoderLayer", "FusedMLP", "FusedRMSNorm",
    "KernelQuantExperts", "KernelQuantLinear", "StackedQuantLinear", "can_stack_experts",
    "dequantize_int4", "dequantize_int8", "fuse", "has_kernel", "interpreted",
    "norm_linear", "norm_linear_reference", "rmsnorm",
    "rmsnorm_reference", "rmsnorm_triton", "rope", "rope_reference", "rope_triton", "set_backend", "softmax",
    "softmax_reference", "softmax_triton", "swiglu", "swiglu_linear", "swiglu_linear_reference", "swiglu_reference",
    "swiglu_triton", "use_triton",
    "w4a16_gemm", "w4a16_gemv", "w4a16_linear", "w4a16_reference", "w8a16_gemv", "w8a16_linear",
    "w8a16_reference",
]
