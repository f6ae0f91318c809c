"""Data sources named by `[data] source` and the seeded train/validation/test split.

Every source ends as float32 arrays shaped `(n, *input_shape)` and int64 labels in `[0, n_labels)`,
so the passes never care where the data came from. Problems (wrong sizes, NaN, unknown labels) are
reported against the config key that caused them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.model_selection import train_test_split

from toolchain.core.config import BuildConfig
from toolchain.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm"}
SKLEARN_BUNDLED = ("digits", "iris", "wine", "breast_cancer")


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]
    sha256: str  # of the loaded arrays, before splitting: identifies the data in provenance

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class RawData:
    x: np.ndarray
    y: np.ndarray
    labels: list[str] | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def _fail(config: BuildConfig, message: str) -> ConfigError:
    return ConfigError(f"config {config.path}: [data] source: {message}")


def _load_sklearn(name: str, config: BuildConfig) -> RawData:
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


def _load_npz(relative: str, config: BuildConfig) -> RawData:
    path = _existing(config, relative)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as exc:
        raise _fail(config, f"{path} is not a readable .npz file ({exc})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise _fail(config, f"{path} lacks array(s) {missing}; save it with numpy.savez(path, x=..., y=...)")
    return RawData(x=arrays["x"], y=arrays["y"], x_test=arrays.get("x_test"), y_test=arrays.get("y_test"))


def _load_csv(relative: str, config: BuildConfig) -> RawData:
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


def _load_images(relative: str, config: BuildConfig) -> RawData:
    from PIL import Image

    root = _existing(config, relative)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise _fail(config, f"{root} needs one sub-folder per class (found {len(classes)})")
    shape = config.model.input_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ConfigError(f"config {config.path}: [model] input_shape: images need [channels(1|3), height, width], got {shape}")
    mode = "L" if shape[0] == 1 else "RGB"
    xs, ys = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert(mode).resize((shape[2], shape[1])), dtype=np.float32) / 255.0
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


def _load_python(spec: str, config: BuildConfig) -> RawData:
    function = load_python_function(spec, config.base_dir, f"config {config.path}: [data] source")
    result = function()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise _fail(config, f"python:{spec} must return a tuple (x, y), got {type(result).__name__}")
    return RawData(x=np.asarray(result[0]), y=np.asarray(result[1]))


LOADERS: dict[str, Callable[[str, BuildConfig], RawData]] = {
    "sklearn": _load_sklearn, "npz": _load_npz, "csv": _load_csv, "images": _load_images, "python": _load_python,
}


def _as_inputs(x: np.ndarray, config: BuildConfig, what: str) -> np.ndarray:
    shape = tuple(config.model.input_shape)
    per_sample = int(np.prod(shape))
    if x.ndim == 0 or x.shape[0] == 0:
        raise _fail(config, f"{what} is empty")
    if int(np.prod(x.shape[1:])) != per_sample:
        raise ConfigError(f"config {config.path}: [model] input_shape {list(shape)} needs {per_sample} values per sample, "
                          f"but {what} has {int(np.prod(x.shape[1:]))} (shape {list(x.shape)})")
    if not np.issubdtype(x.dtype, np.number):
        raise _fail(config, f"{what} has dtype {x.dtype}; expected numbers")
    x = x.reshape(x.shape[0], *shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise _fail(config, f"{what} contains {int((~np.isfinite(x)).sum())} NaN or infinite value(s); clean them first")
    return x


def _as_labels(y: np.ndarray, n_labels: int, config: BuildConfig, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_labels:
        raise _fail(config, f"{what} must be integers in [0, {n_labels}) matching [model] labels, got {y.dtype} in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def load_dataset(config: BuildConfig, seed: int) -> Dataset:
    scheme, _, rest = config.data.source.partition(":")
    raw = LOADERS[scheme](rest, config)
    labels = config.model.labels or raw.labels or [str(i) for i in range(int(np.max(raw.y)) + 1)]
    x = _as_inputs(raw.x, config, "x")
    y = _as_labels(raw.y, len(labels), config, "y")
    if len(x) != len(y):
        raise _fail(config, f"x has {len(x)} samples but y has {len(y)}")
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    stratify = y if np.bincount(y).min() >= 3 else None
    if raw.x_test is not None and raw.y_test is not None:
        x_test, y_test = _as_inputs(raw.x_test, config, "x_test"), _as_labels(raw.y_test, len(labels), config, "y_test")
        x_rest, y_rest = x, y
    else:
        x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=config.data.test, random_state=seed, stratify=stratify)
    val_fraction = config.data.validation / (1 - config.data.test)
    stratify_rest = y_rest if stratify is not None else None
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val_fraction, random_state=seed,
                                                      stratify=stratify_rest)
    return Dataset(x_train, y_train, x_val, y_val, x_test, y_test, labels=list(labels), sha256=digest)
