"""Opening and running model files on this host the way the device agent does: `sessions`
(onnxruntime / LiteRT sessions, logits in batches) and `files` (model or bundle in, checked file out).
"""
