"""Device side of the toolchain: verify, serve and report on signed model bundles.

Imports only numpy, onnxruntime, paho-mqtt, cryptography and the standard library (a test enforces
it), so it installs on a board without torch or TensorFlow.
"""

__version__ = "0.1.0"
