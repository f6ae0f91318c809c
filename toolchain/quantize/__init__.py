"""Quantization libraries: onnxruntime static INT8 with its representative samples and sensitivity
helpers (`int8`), and torch quantization-aware training (`qat`).
"""
