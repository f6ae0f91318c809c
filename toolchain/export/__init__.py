"""Format conversion: torch -> ONNX (`onnx`, the exporter call every path shares) and ONNX SavedModel or
Keras -> `.tflite` (`tflite`, the optional TensorFlow extra).
"""
