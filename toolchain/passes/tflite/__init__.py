"""Passes for `.tflite` files that did not come from this build's own ONNX reference (a user's file)."""
