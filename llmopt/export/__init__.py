"""Export for other runtimes: ONNX for onnxruntime and Transformers.js (the browser and Node)."""
from .onnx import OnnxDecoder, export_onnx, onnx_generate

__all__ = ["OnnxDecoder", "export_onnx", "onnx_generate"]
