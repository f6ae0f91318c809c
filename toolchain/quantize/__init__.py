"""Quantization libraries: onnxruntime static INT8 with its representative samples, calibration methods
and sensitivity helpers (`int8`), the calibration chosen by the build's metric on validation
(`calibration_choice`), per-layer times from onnxruntime's profiler (`profiling`), and torch
quantization-aware training (`qat`).
"""
