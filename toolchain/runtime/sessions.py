"""Sessions on this host that run a model file the way the device agent will: onnxruntime for `.onnx`,
the agent's own LiteRT session for `.tflite`. Accuracy, benchmarks and quantization checks all open
models here, so a number measured on the host comes from the same code path a board serves with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime_agent.litert import LiteRtSession


def make_session(model_path: Path | str, threads: int = 1) -> ort.InferenceSession | LiteRtSession:
    """A CPU session configured as measured: fixed threads, full graph optimization, no spinning.

    Spinning is off because interleaved sessions would otherwise steal cores from each other
    with idle-spinning pool threads after every run (only matters with threads > 1). A `.tflite`
    file gets the device agent's LiteRT session (XNNPACK, the same thread count), which answers
    the same calls.
    """
    if Path(model_path).suffix == ".tflite":
        return LiteRtSession(model_path, threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def model_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits in batches, run by the code the device agent serves the same file with."""
    session = make_session(path, threads=0)  # every core (0: the runtime's default)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
