"""A model file's outputs on this host, computed the way the device agent will compute them
(onnxruntime for `.onnx`, the agent's own LiteRT session for `.tflite`, both opened by
`measure.make_session`). Accuracy, quantization checks and the TFLite translation check all read
outputs here, so a number promised on the host comes from the code path a board serves with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.runtime.measure import make_session


def model_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits in batches, run by the code the device agent serves the same file with."""
    session = make_session(path, threads=0)  # every core (0: the runtime's default)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
