"""Quantization (lessons 01-03).

- primitives: uniform absmax and zero-point quantization at tensor, channel and group
  granularity (INT8/4/3/2); FP8 e4m3; NF4; bit packing.
- modules: weight-only `QuantLinear` (W8A16, W4A16 packed, group scales and zeros),
  `NF4Linear` (with double quantization), `W8A8Linear` (int8 weights and activations),
  `QuantExperts` (a Mixture-of-Experts layer's experts, each matrix a QuantLinear, NF4Linear or
  W8A8Linear; every method below quantizes them).
- algorithms, all through `quantize(model, QuantConfig(method=...), calibration)`:
  round-to-nearest, GPTQ, AWQ, NF4, SmoothQuant; QAT in `qat`; bitsandbytes in `bnb`.
- `save_quantized` / `load_quantized`: the packed model on disk and back.

    from llmopt.quant import QuantConfig, quantize
    from llmopt.data import calibration_batches
    quantize(model, QuantConfig(bits=4, group_size=128, method="gptq"), calibration_batches(tok))
"""
from . import awq, bnb, calibrate, gptq, qat, smoothquant  # noqa: F401
from .experts import QuantExperts  # noqa: F401
from .io import load_quantized, save_quantized  # noqa: F401
from .linear import METHODS, QuantConfig, QuantLinear, quantize, targets  # noqa: F401
from .nf4 import NF4Linear, double_dequantize, double_quantize  # noqa: F401
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
from .qat import FakeQuantLinear, convert, prepare_qat  # noqa: F401
from .smoothquant import W8A8Linear  # noqa: F401
