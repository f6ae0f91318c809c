"""Data sources named by `[data] source` and the seeded train/validation/test split.

Every source ends as arrays shaped `(n, *input_shape)` in each input's dtype (float32 for a trained
model; a dict of arrays by input name for a model file with several inputs), and targets `y` that
are int64 class labels in `[0, n_labels)`, float32 values for regression, or absent (a model file
with unlabelled data, judged by agreement with itself). The passes never care where the data came
from. Problems (wrong sizes, NaN, unknown labels, arrays that do not match the model's inputs) are
reported against the config key that caused them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.model_selection import train_test_split

from toolchain.core.config import BuildConfig
from toolchain.core.tensors import Features, TensorSpec, count, first, take
from toolchain.errors import ConfigError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm"}
SKLEARN_BUNDLED = ("digits", "iris", "wine", "breast_cancer")


TASKS = ("classification", "regression", "unlabelled")


@dataclass(frozen=True)
class Dataset:
    x_train: Features
    y_train: np.ndarray | None
    x_val: Features
    y_val: np.ndarray | None
    x_test: Features
    y_test: np.ndarray | None
    labels: list[str]  # class names; empty unless the task is classification
    sha256: str  # of the loaded arrays, before splitting: identifies the data in provenance
    inputs: tuple[TensorSpec, ...] = ()
    task: str = "classification"  # one of TASKS

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape of the (first) input."""
        return tuple(first(self.x_train).shape[1:])


@dataclass(frozen=True)
class RawData:
    x: Features
    y: np.ndarray | None
    labels: list[str] | None = None
    x_test: Features | None = None
    y_test: np.ndarray | None = None


def _fail(config: BuildConfig, message: str) -> ConfigError:
    return ConfigError(f"config {config.path}: [data] source: {message}")


def _load_sklearn(name: str, config: BuildConfig, inputs: tuple[TensorSpec, ...]) -> RawData:
    if name not in SKLEARN_BUNDLED:
        raise _fail(config, f"sklearn:{name} is not a data set bundled with scikit-learn; use one of {', '.join(SKLEARN_BUNDLED)}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    labels = [str(t) for t in bunch.target_names]
    return RawData(x=bunch.data, y=bunch.target, labels=labels)


def _existing(config: BuildConfig, relative: str) -> Path:
    path = config.resolve(relative)
    if not path.exists():
        raise _fail(config, f"{path} does not exist (paths are relative to the config file)")
    return path


def _load_npz(relative: str, config: BuildConfig, inputs: tuple[TensorSpec, ...]) -> RawData:
    """`x` (or, for a model with several inputs, one array per input name), `y` unless the model is a
    file judged by agreement, optionally the same with a `_test` suffix for a fixed test split."""
    path = _existing(config, relative)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as exc:
        raise _fail(config, f"{path} is not a readable .npz file ({exc})") from None
    names = [spec.name for spec in inputs]
    if len(names) > 1 or (names and names[0] in arrays and "x" not in arrays):
        missing = [name for name in names if name not in arrays]
        if missing:
            raise _fail(config, f"{path} lacks array(s) {missing} for the model's inputs {names} (it has {sorted(arrays)}); "
                                "save one array per input, named after it")
        x: Features = {name: arrays[name] for name in names}
        x_test = {name: arrays[f"{name}_test"] for name in names} if all(f"{name}_test" in arrays for name in names) else None
    else:
        if "x" not in arrays:
            named = f" (or {names[0]!r}, the model's input)" if names and names[0] != "x" else ""
            raise _fail(config, f"{path} lacks array 'x'{named}; it has {sorted(arrays)}; save it with numpy.savez(path, x=..., y=...)")
        x, x_test = arrays["x"], arrays.get("x_test")
    if "y" not in arrays and not config.model.from_file:
        raise _fail(config, f"{path} lacks array 'y' (the labels a model is trained on); save it with numpy.savez(path, x=..., y=...)")
    return RawData(x=x, y=arrays.get("y"), x_test=x_test, y_test=arrays.get("y_test"))


def _load_csv(relative: str, config: BuildConfig, inputs: tuple[TensorSpec, ...]) -> RawData:
    path = _existing(config, relative)
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise _fail(config, f"{path} is empty")
    header = rows[0] if not _is_number(rows[0][0]) or not all(map(_is_number, rows[0])) else None
    body = rows[1:] if header else rows
    column = config.data.label_column
    if column is None:
        index = len(rows[0]) - 1
    elif isinstance(column, int):
        index = column
    elif header and column in header:
        index = header.index(column)
    else:
        raise ConfigError(f"config {config.path}: [data] label_column: {column!r} is not a column of {path} (columns: {header})")
    try:
        features = np.array([[float(v) for i, v in enumerate(r) if i != index] for r in body], dtype=np.float64)
    except ValueError as exc:
        raise _fail(config, f"{path} has a non-numeric feature value ({exc})") from None
    raw_labels = [r[index] for r in body]
    names = sorted(set(raw_labels), key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
    y = np.array([names.index(v) for v in raw_labels])
    return RawData(x=features, y=y, labels=names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_images(relative: str, config: BuildConfig, inputs: tuple[TensorSpec, ...]) -> RawData:
    from PIL import Image

    root = _existing(config, relative)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise _fail(config, f"{root} needs one sub-folder per class (found {len(classes)})")
    shape = inputs[0].shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ConfigError(f"config {config.path}: [model] input_shape: images need [channels(1|3), height, width], got {shape}")
    mode = "L" if shape[0] == 1 else "RGB"
    xs, ys = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(file) as image:
                        pixels = np.asarray(image.convert(mode).resize((shape[2], shape[1])), dtype=np.float32) / 255.0
                except OSError as exc:  # not an image, truncated (PIL's UnidentifiedImageError is an OSError)
                    raise _fail(config, f"{file} cannot be read as an image ({first_line(exc)}); fix or remove it") from None
                xs.append(pixels.reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1))
                ys.append(label)
    if not xs:
        raise _fail(config, f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return RawData(x=np.stack(xs), y=np.array(ys), labels=classes)


def load_python_function(spec: str, base_dir: Path, key: str) -> Callable[..., Any]:
    """`file.py:function` relative to `base_dir` -> the function (shared by data and model entries)."""
    file_name, _, function_name = spec.rpartition(":")
    path = Path(file_name).expanduser()
    path = path if path.is_absolute() else (base_dir / path).resolve()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist (paths are relative to the config file)")
    module_name = f"_toolchain_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"{key}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{key}: {path} has no function {function_name!r}")
    return function


def call_user_function(function: Callable[..., Any], key: str, *args: Any, **kwargs: Any) -> Any:
    """Call a function of the user's project (a data loader, a model entry). What it raises is the
    user's own bug, so it is one line naming the exception and the line of their file that raised it,
    not a traceback through the toolchain (`--debug` shows that, the exception chained)."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:
        code = getattr(function, "__code__", None)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if code is not None and f.filename == code.co_filename]
        where = f" (at {Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""
        raise ConfigError(f"{key}: {getattr(function, '__name__', 'the function')}() raised "
                          f"{type(exc).__name__}: {first_line(exc)}{where}") from exc


def _load_python(spec: str, config: BuildConfig, inputs: tuple[TensorSpec, ...]) -> RawData:
    key = f"config {config.path}: [data] source"
    result = call_user_function(load_python_function(spec, config.base_dir, key), key)
    if not (isinstance(result, tuple) and len(result) == 2):
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise _fail(config, f"python:{spec} must return a tuple (x, y), got {got}")
    try:
        x = {k: np.asarray(v) for k, v in result[0].items()} if isinstance(result[0], dict) else np.asarray(result[0])
        y = None if result[1] is None else np.asarray(result[1])
    except ValueError as exc:  # nested lists of different lengths
        raise _fail(config, f"python:{spec} returned arrays numpy cannot make rectangular ({first_line(exc)})") from None
    return RawData(x=x, y=y)


LOADERS: dict[str, Callable[[str, BuildConfig, tuple[TensorSpec, ...]], RawData]] = {
    "sklearn": _load_sklearn, "npz": _load_npz, "csv": _load_csv, "images": _load_images, "python": _load_python,
}


def _as_input(x: np.ndarray, spec: TensorSpec, config: BuildConfig, what: str) -> np.ndarray:
    shape = spec.shape
    per_sample = int(np.prod(shape))
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise _fail(config, f"{what} is empty")
    if int(np.prod(x.shape[1:])) != per_sample:
        key = "[model] input_shape" if not config.model.from_file else f"the model's input {spec.name!r} of shape"
        raise ConfigError(f"config {config.path}: {key} {list(shape)} needs {per_sample} values per sample, "
                          f"but {what} has {int(np.prod(x.shape[1:]))} (shape {list(x.shape)})")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise _fail(config, f"{what} has dtype {x.dtype}; expected numbers")
    want = np.dtype(spec.dtype)
    if np.issubdtype(want, np.integer) and not np.issubdtype(x.dtype, np.integer):
        if not (np.isfinite(x).all() and np.array_equal(x, np.round(x))):
            raise _fail(config, f"{what} holds non-integer values, but the model's input {spec.name!r} is {spec.dtype}")
    x = x.reshape(x.shape[0], *shape).astype(want)
    if np.issubdtype(want, np.floating) and not np.isfinite(x).all():
        raise _fail(config, f"{what} contains {int((~np.isfinite(x)).sum())} NaN or infinite value(s); clean them first")
    return x


def _as_inputs(x: Features, inputs: tuple[TensorSpec, ...], config: BuildConfig, what: str) -> Features:
    if isinstance(x, dict):
        arrays = {spec.name: _as_input(x[spec.name], spec, config, f"{what} {spec.name!r}") for spec in inputs}
        sizes = {name: len(array) for name, array in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise _fail(config, f"the input arrays hold different numbers of samples: {sizes}")
        return arrays
    if len(inputs) > 1:
        raise _fail(config, f"the model takes {len(inputs)} inputs ({', '.join(s.name for s in inputs)}); "
                            "give one array per input, named after it (npz:) or a dict of them (python:)")
    return _as_input(x, inputs[0], config, what)


def _task(config: BuildConfig, y: np.ndarray | None) -> str:
    if y is None:
        if config.model.task is not None:
            raise _fail(config, f"[model] task = {config.model.task!r} needs targets (an array y), and the data has none")
        return "unlabelled"
    if config.model.task is not None:
        return config.model.task
    if config.model.labels:
        return "classification"
    y = np.asarray(y)
    integral = np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y)))
    return "classification" if integral and y.ndim == 1 else "regression"


def _as_labels(y: np.ndarray, n_labels: int, config: BuildConfig, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.array_equal(y, np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_labels:
        raise _fail(config, f"{what} must be integers in [0, {n_labels}) matching [model] labels, got {y.dtype} in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _as_targets(y: np.ndarray, config: BuildConfig, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind in "USO":  # text: class names, which only a csv: source maps to indices itself
        raise _fail(config, f"{what} holds text (e.g. {str(y.reshape(-1)[0])!r}); give class indices 0..K-1 and name the classes "
                            "in [model] labels")
    if not np.issubdtype(y.dtype, np.number):
        raise _fail(config, f"{what} has dtype {y.dtype}; regression targets must be numbers")
    y = y.astype(np.float32)
    if not np.isfinite(y).all():
        raise _fail(config, f"{what} contains {int((~np.isfinite(y)).sum())} NaN or infinite value(s); clean them first")
    return y.reshape(len(y)) if y.ndim == 2 and y.shape[1] == 1 else y


def default_inputs(config: BuildConfig) -> tuple[TensorSpec, ...]:
    """An entry function's model takes one float32 input named `input` (the exporter's name)."""
    return (TensorSpec("input", tuple(config.model.input_shape), "float32"),)


def _split(config: BuildConfig, index: np.ndarray, fraction: float, seed: int, stratify: np.ndarray | None,
           total: int) -> list[np.ndarray]:
    """`index` split in two, seeded; a split left empty (a handful of samples) is the user's to fix."""
    try:
        return train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:
        raise _fail(config, f"{total} samples are too few to split into training, validation ({config.data.validation:g}) "
                            f"and test ({config.data.test:g}) sets; give more samples") from None


def load_dataset(config: BuildConfig, seed: int, inputs: tuple[TensorSpec, ...] | None = None) -> Dataset:
    """Load `[data] source` for a model taking `inputs` (default: the entry's one input) and split it."""
    inputs = inputs or default_inputs(config)
    scheme, _, rest = config.data.source.partition(":")
    raw = LOADERS[scheme](rest, config, inputs)
    x = _as_inputs(raw.x, inputs, config, "x")
    task = _task(config, raw.y)
    labels: list[str] = []
    if task == "classification":
        labels = list(config.model.labels or raw.labels or [str(i) for i in range(int(np.max(raw.y)) + 1)])
        y = _as_labels(raw.y, len(labels), config, "y")
        if len(np.unique(y)) < 2 and not config.model.from_file:
            raise _fail(config, f"y holds a single class ({labels[int(y[0])]!r}); a classifier is trained on examples of at least two")
    elif task == "regression":
        y = _as_targets(raw.y, config, "y")
    else:
        y = None
    if y is not None and count(x) != len(y):
        raise _fail(config, f"x has {count(x)} samples but y has {len(y)}")
    arrays = [*(x.values() if isinstance(x, dict) else [x]), *([] if y is None else [y])]
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()
    stratify = y if task == "classification" and np.bincount(y).min() >= 3 else None
    everything = np.arange(count(x))
    if raw.x_test is not None and (raw.y_test is not None or y is None):
        x_test = _as_inputs(raw.x_test, inputs, config, "x_test")
        y_test = None if y is None else (_as_labels(raw.y_test, len(labels), config, "y_test") if task == "classification"
                                         else _as_targets(raw.y_test, config, "y_test"))
        rest_index = everything
    else:
        rest_index, test_index = _split(config, everything, config.data.test, seed, stratify, count(x))
        x_test, y_test = take(x, test_index), None if y is None else y[test_index]
    val_fraction = config.data.validation / (1 - config.data.test)
    train_index, val_index = _split(config, rest_index, val_fraction, seed, None if stratify is None else y[rest_index],
                                   count(x))
    pick = (lambda index: None) if y is None else (lambda index: y[index])
    return Dataset(take(x, train_index), pick(train_index), take(x, val_index), pick(val_index), x_test, y_test,
                   labels=labels, sha256=digest, inputs=tuple(inputs), task=task)
