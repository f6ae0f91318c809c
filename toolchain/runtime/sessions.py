"""A model file's outputs on this host, computed the way the device agent will compute them
(onnxruntime for `.onnx`, the agent's own LiteRT session for `.tflite`, both opened by
`measure.make_session`). Accuracy, quantization checks and the TFLite translation check all read
outputs here, so a number promised on the host comes from the code path a board serves with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.core.tensors import Features, as_feeds, count, take
from toolchain.runtime.measure import make_session


def model_outputs(path: Path, x: Features, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of the model on `x` (one array per output, batch first), computed in batches by the
    code the device agent serves the same file with. `x` is an array for a one-input model, or a dict
    of arrays by input name."""
    session = make_session(path, threads=0)  # every core (0: the runtime's default)
    names = [i.name for i in session.get_inputs()]
    batches = [session.run(None, as_feeds(take(x, slice(i, i + batch_size)), names))
               for i in range(0, count(x), batch_size)]
    return [np.concatenate([batch[k] for batch in batches]) for k in range(len(batches[0]))]


def model_logits(path: Path, x: Features, batch_size: int = 256) -> np.ndarray:
    """The first output (a classifier's scores) in batches."""
    return model_outputs(path, x, batch_size)[0]
