"""The build config (`toolchain.toml`): parsed, validated, and resolved against its own folder.

Validation is strict (unknown keys are errors) because a misspelt key that is silently ignored is a
model silently built with the wrong settings. Every message names the section, the key and what was
expected. Paths are resolved relative to the config file so a project can live anywhere.
"""

from __future__ import annotations

import hashlib
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


class ModelSection(_Section):
    entry: str = Field(pattern=r"^([^:]+\.py:[A-Za-z_][A-Za-z0-9_]*|zoo:[a-z0-9_]+)$")  # file.py:function or zoo:NAME
    input_shape: list[int] = Field(min_length=1, max_length=4)
    labels: list[str] | None = Field(default=None, min_length=2)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # "auto": what the entry returns (a torch.nn.Module or a tf.keras.Model) decides the passes.
    framework: Literal["auto", "torch", "keras"] = "auto"

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"every dimension must be > 0, got {shape}")
        return shape


def _data_source(source: str) -> str:
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in DATA_SCHEMES or not rest:
        raise ValueError(f"expected one of {', '.join(s + ':...' for s in DATA_SCHEMES)}, got {source!r}")
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
    epochs: int | None = Field(default=None, ge=1, le=10_000)  # None: the budget decides
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


class BuildConfig(_Section):
    project: ProjectSection
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    search: SearchSection | None = None
    compress: CompressSection = Field(default_factory=CompressSection)
    retrain: RetrainSection | None = None

    # Not part of the TOML: where the file was, for resolving paths, and its hash for provenance.
    path: Path = Field(default=Path("."), exclude=True)
    sha256: str = Field(default="", exclude=True)

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
