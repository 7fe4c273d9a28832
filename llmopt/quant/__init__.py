"""Quantization (lessons 01-03). So far: the primitives (uniform absmax and zero-point
quantization at tensor, channel and group granularity; FP8 e4m3; NF4) and bit packing."""
from .packing import pack, to_signed, to_unsigned, unpack  # noqa: F401
from .primitives import (  # noqa: F401
    QTensor,
    dequantize,
    dequantize_fp8,
    dequantize_nf4,
    fake_quantize,
    nf4_codebook,
    qrange,
    quantize,
    quantize_fp8,
    quantize_nf4,
)
