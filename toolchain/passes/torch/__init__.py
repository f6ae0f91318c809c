"""Passes that work on the torch module: hyper-parameter search, training, distillation, pruning,
quantization-aware training, and the ONNX export that makes the FP32 reference.
"""
