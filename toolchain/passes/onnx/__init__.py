"""Passes that take the FP32 ONNX reference and make more candidates from it: INT8 (static, dynamic,
mixed), FP16 and `.tflite`.
"""
