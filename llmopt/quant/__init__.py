"""Quantization (lessons 01-03).

So far: the primitives (uniform absmax and zero-point quantization at tensor, channel and
group granularity; FP8 e4m3; NF4), bit packing, and weight-only `QuantLinear` with
`quantize(model, QuantConfig(...))` (round-to-nearest).

    from llmopt.quant import QuantConfig, quantize
    quantize(model, QuantConfig(bits=4, group_size=128))
"""
from .linear import QuantConfig, QuantLinear, quantize  # noqa: F401
from .packing import pack, to_signed, to_unsigned, unpack  # noqa: F401
from .primitives import (  # noqa: F401
    QTensor,
    dequantize_fp8,
    dequantize_nf4,
    fake_quantize,
    nf4_codebook,
    qrange,
    quantize_fp8,
    quantize_nf4,
)
from .primitives import dequantize as dequantize_tensor  # noqa: F401
from .primitives import quantize as quantize_tensor  # noqa: F401
