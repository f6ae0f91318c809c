"""Make `.tflite` files: ONNX -> TensorFlow SavedModel (onnx2tf), or a Keras model, -> TFLite converter.

TensorFlow is the optional extra `pip install .[tflite]` (about 2 GB); nothing here imports it until a
conversion is asked for, and a missing extra is one clear error with the install line.

Why the SavedModel step and our own converter call instead of onnx2tf's built-in quantization:
onnx2tf is excellent at the graph translation (NCHW -> NHWC, op mapping) but its quantizer wants
calibration data in files of its own format. `tf.lite.TFLiteConverter` with a representative dataset
is the documented path to full-integer INT8, and the same call converts Keras models, so both inputs
(torch via ONNX, and Keras) share one converter with one set of precisions:

- `fp32`: the graph as is.
- `fp16`: FP16 weights (half the size); LiteRT's XNNPACK runs them in FP16 where the CPU can, else
  dequantizes once at load time.
- `int8`: full-integer: every op and the model's input and output are int8 (what microcontrollers
  and integer-only NPUs need). Activation ranges come from the representative samples, or from the
  fake-quant ranges of a quantization-aware-trained Keras model.

The input stays NCHW like the ONNX model's (`keep_ncw_or_nchw_or_ncdhw_input_names`): onnx2tf puts
one transpose into the graph, and every artifact of a bundle keeps the same input contract.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from toolchain.core.artifact import Candidate
from toolchain.core.contract import BuildContext
from toolchain.errors import ToolchainError, first_line
from toolchain.quantize.int8 import representative_samples

TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "install the TFLite extra: `.venv/bin/pip install -e '.[tflite]'` (or `bash scripts/setup.sh --tflite`)"
REPRESENTATIVE_SAMPLES = 200


def tflite_extra_missing() -> str | None:
    """None when onnx2tf, TensorFlow and the LiteRT interpreter import; else which one is missing."""
    for module in ("tensorflow", "tf_keras", "tensorflow_model_optimization", "onnx2tf", "ai_edge_litert"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def require_tflite_extra(why: str) -> None:
    missing = tflite_extra_missing()
    if missing:
        raise ToolchainError(f"{why} needs the '{missing}' package; {INSTALL_HINT}")


def tensorflow_environment() -> None:
    """Before TensorFlow is first imported (by us or a user's model file): `tf.keras` must be Keras 2
    (tf-keras, which tfmot supports), and its C++ logging quiet."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def tensorflow() -> Any:
    """Import TensorFlow the way this project needs it (see `tensorflow_environment`), quiet."""
    tensorflow_environment()
    if "tensorflow" not in sys.modules:
        with quiet_native_output():  # absl and oneDNN announce themselves on import, whatever the log level
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]


def onnx_to_saved_model(onnx_path: Path, out_dir: Path, input_name: str) -> Path:
    """Translate an ONNX model into a TensorFlow SavedModel in `out_dir` (input kept NCHW)."""
    require_tflite_extra("converting to TFLite")
    tensorflow()
    import onnx
    import onnx2tf

    graph_input = next(i for i in onnx.load(str(onnx_path), load_external_data=False).graph.input if i.name == input_name)
    channels_first = len(graph_input.type.tensor_type.shape.dim) >= 3  # images and sequences; feature vectors have no layout
    try:
        with quiet_native_output():
            onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out_dir), non_verbose=True,
                            not_use_onnxsim=True, keep_ncw_or_nchw_or_ncdhw_input_names=[input_name] if channels_first else None,
                            output_signaturedefs=True)
    except BaseException as exc:  # onnx2tf reports unsupported ops with SystemExit as well as exceptions
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # onnx2tf colours its messages
        raise ToolchainError(f"onnx2tf cannot translate {onnx_path.name} to TensorFlow: {type(exc).__name__}: "
                             f"{message.splitlines()[0] if message else 'no message'} (use ops onnx2tf supports)") from None
    return out_dir


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence fds 1 and 2 while TensorFlow works: its converter and onnx2tf print from C++ and
    Python straight to the process's streams, between our own progress lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _representative(samples: np.ndarray) -> Iterator[list[np.ndarray]]:
    for row in samples[:REPRESENTATIVE_SAMPLES]:
        yield [row[np.newaxis].astype(np.float32)]


def convert(source: Path | Any, precision: str, samples: np.ndarray | None = None) -> bytes:
    """A `.tflite` flatbuffer of `source` (a SavedModel folder or a Keras model) at `precision`.

    `samples` (raw training inputs) calibrate full-integer INT8; a quantization-aware-trained Keras
    model brings its own ranges and may leave them out.
    """
    if precision not in TFLITE_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {TFLITE_PRECISIONS}")
    tf = tensorflow()
    converter = (tf.lite.TFLiteConverter.from_saved_model(str(source)) if isinstance(source, (str, Path))
                 else tf.lite.TFLiteConverter.from_keras_model(source))
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if samples is not None:
            converter.representative_dataset = lambda: _representative(samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        with quiet_native_output():
            return converter.convert()
    except Exception as exc:
        raise ToolchainError(f"the TFLite converter failed at {precision}: {first_line(exc)}") from None


def tflite_precisions(precisions: tuple[str, ...]) -> list[str]:
    """FP32 always (the format's fallback), then the profile's FP16 and INT8."""
    return [p for p in TFLITE_PRECISIONS if p == "fp32" or p in precisions]


def convert_candidates(source: Any, ctx: BuildContext, methods: dict[str, str]) -> list[Candidate]:
    """`source` (a SavedModel folder or a Keras model) as one `.tflite` candidate per precision the
    profile takes, INT8 calibrated on seeded training samples."""
    samples = representative_samples(ctx.dataset.x_train, REPRESENTATIVE_SAMPLES, ctx.seed)
    candidates = []
    for precision in tflite_precisions(ctx.profile.precisions):
        with ctx.console.status(f"  converting to TFLite {precision}"):
            path = ctx.work_path(f"model-{precision}.tflite")
            path.write_bytes(convert(source, precision, samples))
        candidates.append(Candidate(name=f"tflite-{precision}", precision=precision, path=path, format="tflite",
                                    runtime="litert", metrics={"method": methods[precision]}))
        ctx.console.print(f"  {path.name}: {path.stat().st_size:,} bytes")
    return candidates
