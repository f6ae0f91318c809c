"""The build config (`toolchain.toml`): parsed, validated, and resolved against its own folder.

Validation is strict (unknown keys are errors) because a misspelt key that is silently ignored is a
model silently built with the wrong settings. Every message names the section, the key and what was
expected. Paths are resolved relative to the config file so a project can live anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolchain.errors import ConfigError
from toolchain.resources import default_config

DEFAULT_CONFIG = default_config()
DATA_SCHEMES = ("sklearn", "npz", "csv", "images", "python")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectSection(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]*$", max_length=64)
    version: int = Field(default=1, ge=1)


MODEL_FILE_SUFFIXES = (".onnx", ".tflite")
TASKS = ("classification", "regression")


class ModelSection(_Section):
    """Where the model comes from: `entry` (a function that builds a torch or Keras model, trained here,
    optionally from pretrained `weights`) or `file` (an ONNX/.tflite model the user already has: the
    FP32 reference, not trained). `input_shape` is one sample's shape without the batch axis; for a
    file it fixes the dynamic dimensions (one list, or a table of lists by input name)."""

    entry: str | None = Field(default=None, pattern=r"^([^:]+\.py:[A-Za-z_][A-Za-z0-9_]*|zoo:[a-z0-9_]+)$")  # file.py:function or zoo:NAME
    file: str | None = None
    weights: str | None = None  # a state_dict (or a checkpoint dict holding one) loaded into the entry's model
    input_shape: list[int] | dict[str, list[int]] | None = None
    labels: list[str] | None = Field(default=None, min_length=2)
    task: Literal["classification", "regression"] | None = None  # None: from the data (class labels -> classification)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # "auto": what the entry returns (a torch.nn.Module or a tf.keras.Model) decides the passes.
    framework: Literal["auto", "torch", "keras"] = "auto"

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, shape: list[int] | dict[str, list[int]] | None) -> list[int] | dict[str, list[int]] | None:
        for name, dims in (shape.items() if isinstance(shape, dict) else [("", shape)] if shape is not None else []):
            where = f"{name}: " if name else ""
            got = f", got {dims}" if name else ""  # one list: the message's "(got ...)" shows it
            if not 1 <= len(dims) <= 4:
                raise ValueError(f"{where}one sample's shape has 1 to 4 dimensions (no batch axis){got}")
            if any(d <= 0 for d in dims):
                raise ValueError(f"{where}every dimension must be > 0{got}")
        return shape

    @field_validator("file")
    @classmethod
    def _model_file(cls, file: str | None) -> str | None:
        if file is not None and not file.lower().endswith(MODEL_FILE_SUFFIXES):
            raise ValueError(f"a model file must be {' or '.join(MODEL_FILE_SUFFIXES)}")
        return file

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.entry is None) == (self.file is None):
            raise ValueError("give exactly one of entry = \"model.py:function\" (a model trained here) "
                             "or file = \"model.onnx\" (a model you already have)")
        if self.file is not None:
            if self.weights is not None:
                raise ValueError("weights = ... goes with entry (torch weights for the entry's model); a model file carries its own")
            if self.framework != "auto" or self.kwargs:
                raise ValueError("framework and kwargs describe an entry function; remove them for a model file")
        elif self.input_shape is None:
            raise ValueError("input_shape is required with entry: one sample's shape, e.g. [1, 8, 8]")
        elif isinstance(self.input_shape, dict):
            raise ValueError("input_shape must be one list for an entry (entries take one input), e.g. [1, 8, 8]")
        return self

    @property
    def from_file(self) -> bool:
        return self.file is not None


def _data_source(source: str) -> str:
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in DATA_SCHEMES or not rest:
        raise ValueError(f"expected one of {', '.join(s + ':...' for s in DATA_SCHEMES)}")
    return source


class DataSection(_Section):
    source: str
    validation: float = Field(default=0.2, gt=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)
    label_column: str | int | None = None

    _scheme = field_validator("source")(classmethod(lambda cls, source: _data_source(source)))

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> "DataSection":
        if self.validation + self.test >= 0.9:
            raise ValueError(f"validation + test = {self.validation + self.test:.2f} leaves too little training data (keep it < 0.9)")
        return self


class TrainSection(_Section):
    epochs: int | None = Field(default=None, ge=0, le=10_000)  # None: the budget decides; 0: keep pretrained weights as they are
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0, lt=10)
    weight_decay: float = Field(default=1e-4, ge=0)
    patience: int | None = Field(default=None, ge=1)


class ParamRange(_Section):
    """A numeric search dimension; integers when both bounds are integers."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "ParamRange":
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got {self.low} and {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log = true needs low > 0")
        return self


SEARCH_SETTINGS = ("n_trials", "sampler", "pruner", "objectives", "storage", "study_name", "cv_folds")


class SearchSection(BaseModel):
    """Hyper-parameter search. Keys other than the settings are parameters: a table {low, high, log}
    or a list of choices. `lr`, `weight_decay`, `batch_size`, `epochs` tune training; any other name
    is passed to the model's entry function as a keyword argument."""

    model_config = ConfigDict(extra="allow", frozen=True)
    n_trials: int | None = Field(default=None, ge=1, le=10_000)  # None: the budget decides
    sampler: Literal["tpe", "random", "grid", "nsga2"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    objectives: list[Literal["accuracy", "latency"]] = Field(default_factory=lambda: ["accuracy"], min_length=1, max_length=2)
    storage: str | None = None  # an Optuna storage URL; default: an SQLite file in the output folder
    study_name: str | None = None
    cv_folds: int = Field(default=0, ge=0, le=20)

    @model_validator(mode="after")
    def _space(self) -> "SearchSection":
        if self.cv_folds == 1:
            raise ValueError("cv_folds must be 0 (a validation split) or at least 2")
        if not self.space:
            raise ValueError("no parameter to search: add e.g. lr = {low = 1e-4, high = 1e-1, log = true}")
        if self.sampler == "grid" and any(not isinstance(v, list) for v in self.space.values()):
            raise ValueError("sampler = \"grid\" needs every parameter as a list of choices")
        return self

    @property
    def space(self) -> dict[str, ParamRange | list]:
        dims: dict[str, ParamRange | list] = {}
        for name, spec in (self.model_extra or {}).items():
            if isinstance(spec, dict):
                try:
                    dims[name] = ParamRange.model_validate(spec)
                except ValidationError as exc:
                    raise ValueError(f"{name}: {_describe(exc.errors()[0]).split(': ', 1)[-1]}") from None
            elif isinstance(spec, list) and spec and all(isinstance(v, (int, float, str, bool)) for v in spec):
                dims[name] = spec
            else:
                raise ValueError(f"{name}: a parameter needs {{low, high[, log]}} or a non-empty list of choices, got {spec!r}")
        return dims


class CompressSection(_Section):
    distill: bool = False
    student_width: float | Literal["auto"] = "auto"  # width multiplier of the distilled student
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1)  # weight of the teacher's soft targets
    prune_ratio: float | Literal["auto"] = Field(default=0.0)
    finetune_epochs: int | None = Field(default=None, ge=1)
    quantize: list[Literal["int8", "fp16", "dynamic"]] = Field(default_factory=lambda: ["int8", "fp16"])
    qat: bool = True  # quantization-aware training when static INT8 misses the gate on validation
    qat_epochs: int | None = Field(default=None, ge=1)  # default: as finetune_epochs
    mixed: bool = True  # keep the most sensitive layers in float when INT8 (static and QAT) misses the gate
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    min_speedup: float = Field(default=1.05, ge=1.0)
    calibration_samples: int = Field(default=256, ge=8)

    @property
    def prunes(self) -> bool:
        return self.prune_ratio == "auto" or self.prune_ratio > 0

    @model_validator(mode="after")
    def _available(self) -> "CompressSection":
        if isinstance(self.student_width, float) and not 0 < self.student_width < 1:
            raise ValueError(f"student_width must be in (0, 1) or \"auto\", got {self.student_width}")
        if isinstance(self.prune_ratio, float) and not 0 <= self.prune_ratio < 0.95:
            raise ValueError(f"prune_ratio must be in [0, 0.95) or \"auto\", got {self.prune_ratio}")
        return self


class TrackingSection(_Section):
    """MLflow experiment tracking (`toolchain.build.tracking`, the `mlflow` extra): one run per build."""

    uri: str  # http(s)://host:5000, file:/path/mlruns, sqlite:///path/mlflow.db (relative paths: to the config)
    experiment: str | None = None  # default: the project's name

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if uri.split(":", 1)[0] not in {"http", "https", "file", "sqlite", "postgresql", "mysql"}:
            raise ValueError(f"uri {uri!r} is not an MLflow tracking URI (http://host:5000, file:/path/mlruns, sqlite:///mlflow.db)")
        return uri


class RetrainSection(_Section):
    """The closed loop (`toolchain fleet autopilot`): when a share of the fleet's devices stays in drift
    alarm for a while, warm-start from the running model, fine-tune on fresh labelled data, rebuild with
    the same gates and roll out (canaries first)."""

    data: str  # fresh labelled samples, any [data] source form ("npz:fresh.npz", "python:file.py:load", ...)
    trigger_share: float = Field(default=0.3, gt=0, le=1)  # share of reporting devices in drift alarm
    trigger_seconds: float = Field(default=30.0, ge=0)  # ... for at least this long
    epochs: int | None = Field(default=None, ge=1)  # fine-tune epochs (default: as [compress] finetune_epochs)
    lr_scale: float = Field(default=0.3, gt=0, le=1)  # of [train] lr: the weights are already trained
    canary: int = Field(default=1, ge=0)
    waves: int | None = Field(default=None, ge=1)
    cooldown_s: float = Field(default=120.0, ge=0)  # after a rollout, before the next trigger can fire

    _scheme = field_validator("data")(classmethod(lambda cls, source: _data_source(source)))


BUILTIN_METRICS = ("accuracy", "top5", "f1_macro", "mae", "rmse", "r2", "agreement")


class EvalSection(_Section):
    """What the gate measures. `metric` is a built-in name or `file.py:function` (called with the
    model's outputs and the labels); None picks `accuracy` for class labels, `rmse` for regression and
    `agreement` (closeness to the reference model's outputs) when the data has no labels. `max_drop`
    is in the metric's units (None: `[compress] max_accuracy_drop` for fractions, 2% of the
    reference value for error metrics)."""

    metric: str | None = None
    max_drop: float | None = Field(default=None, ge=0)
    higher_is_better: bool | None = None  # required for a `file.py:function` metric

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str | None) -> str | None:
        if metric is None or metric in BUILTIN_METRICS:
            return metric
        if ":" in metric and metric.rpartition(":")[0].endswith(".py") and metric.rpartition(":")[2].isidentifier():
            return metric
        raise ValueError(f"unknown metric; use one of {', '.join(BUILTIN_METRICS)} or \"file.py:function\"")

    @model_validator(mode="after")
    def _direction(self) -> "EvalSection":
        custom = self.metric is not None and self.metric not in BUILTIN_METRICS
        if custom and self.higher_is_better is None:
            raise ValueError("a metric function needs higher_is_better = true or false")
        if not custom and self.higher_is_better is not None:
            raise ValueError("higher_is_better is only for a file.py:function metric (built-in metrics know their direction)")
        return self


class BuildConfig(_Section):
    project: ProjectSection
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    search: SearchSection | None = None
    compress: CompressSection = Field(default_factory=CompressSection)
    retrain: RetrainSection | None = None
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection | None = None

    # Not part of the TOML: where the file was, for resolving paths, and its hash for provenance.
    path: Path = Field(default=Path("."), exclude=True)
    sha256: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _fits_the_model_source(self) -> "BuildConfig":
        model = self.model
        if model.from_file:
            trains = [name for name, on in (("[search]", self.search is not None), ("[retrain]", self.retrain is not None),
                                            ("[compress] distill", self.compress.distill), ("[compress] prune_ratio", self.compress.prunes))
                      if on]
            if trains:
                raise ValueError(f"{', '.join(trains)} need{'s' if len(trains) == 1 else ''} a model trained here, and [model] file is used as it is; "
                                 "remove them (or build from an entry function)")
        if self.train.epochs == 0 and model.weights is None:
            raise ValueError("[train] epochs = 0 keeps pretrained weights as they are, so it needs [model] weights = \"ckpt.pt\"")
        return self

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        candidate = Path(relative).expanduser()
        return candidate if candidate.is_absolute() else (self.base_dir / candidate).resolve()


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-after")]
    if not parts:
        return "config"
    section, *rest = parts
    return f"[{section}]" + (f" {'.'.join(rest)}" if rest else "")


def _describe(error: dict[str, Any]) -> str:
    where = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        section = error["loc"][0] if len(error["loc"]) > 1 else None
        known = list((BuildConfig.model_fields[section].annotation.model_fields if section else BuildConfig.model_fields))
        known = [k for k in known if k not in ("path", "sha256")]
        return f"{where}: unknown key (known keys here: {', '.join(known)})"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    return f"{where}: {message}" + (f" (got {given!r})" if given is not None and not isinstance(given, dict) else "")


def parse_config(text: str, path: Path) -> BuildConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from None
    try:
        config = BuildConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"config {path}: {problems}") from None
    return config.model_copy(update={"path": path.resolve(), "sha256": hashlib.sha256(text.encode()).hexdigest()})


def load_config(path: Path | None) -> BuildConfig:
    """Load a config file, or the embedded default example when `path` is None."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {path} does not exist; pass --config with the path to your toolchain.toml") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} cannot be read as a TOML file ({exc})") from None
    return parse_config(text, path)


def with_search(config: BuildConfig, storage: str | None = None, n_trials: int | None = None) -> BuildConfig:
    """The config with the command line's `--storage` / `--n-trials` in its [search] section."""
    if storage is None and n_trials is None:
        return config
    if config.search is None:
        raise ConfigError(f"config {config.path}: --storage and --n-trials set up a search, and the config has no "
                          "[search] section (its space)")
    changes = {k: v for k, v in (("storage", storage), ("n_trials", n_trials)) if v is not None}
    return config.model_copy(update={"search": config.search.model_copy(update=changes)})


def command_line_config(model: Path, data: str, input_shape: str | None, metric: str | None) -> BuildConfig:
    """The config `toolchain build --model FILE --data SOURCE [--input-shape 3,48,192] [--metric M]`
    stands for: the project is named after the file, paths are relative to the current folder."""
    name = re.sub(r"[^A-Za-z0-9_.]", "_", model.stem).lstrip("_.") or "model"
    lines = ["[project]", f"name = {json.dumps(name[:64])}", "[model]", f"file = {json.dumps(str(model))}"]
    if input_shape is not None:
        try:
            dims = [int(d) for d in input_shape.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise ConfigError(f"--input-shape {input_shape!r}: expected sizes separated by commas, e.g. 3,48,192") from None
        lines.append(f"input_shape = {json.dumps(dims)}")
    lines += ["[data]", f"source = {json.dumps(data)}"]
    if metric is not None:
        lines += ["[eval]", f"metric = {json.dumps(metric)}"]
    try:
        return parse_config("\n".join(lines) + "\n", Path.cwd() / COMMAND_LINE)
    except ConfigError as exc:
        raise ConfigError(command_line_message(str(exc))) from None


COMMAND_LINE = "command line"  # the config file a `--model` build stands for, in the current folder


def command_line_message(message: str) -> str:
    """A config error of a `--model` build (when parsing it, or later from the data or the model) in the
    options the user typed, not in the config they stand for."""
    message = message.replace(f"config {Path.cwd() / COMMAND_LINE}: ", "")
    for key, option in (("[model] input_shape (or --input-shape)", "--input-shape"), ("[model] file", "--model"),
                        ("[data] source", "--data"), ("[model] input_shape", "--input-shape"), ("[eval] metric", "--metric"),
                        ('metric = "agreement"', "--metric agreement"),
                        ("(paths are relative to the config file)", "(paths are relative to the current folder)")):
        message = message.replace(key, option)
    return message
