"""Passes for a Keras model: trained, pruned and quantization-aware-trained with Keras and TF Model
Optimization, shipped as `.tflite`.
"""
