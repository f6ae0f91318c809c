"""Device profiles: what a board can do, read from the shipped `targets/*.toml` (or a user's own file).

A profile is data, not code: the passes, the gate and the latency predictor only read it. The
`host` profile is the one exception whose numbers are measured on this machine (see
`toolchain.targets.hostprobe`) instead of copied from a data sheet.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import TargetError
from toolchain.resources import profiles_dir

TARGETS_DIR = profiles_dir()
PRECISIONS = ("int8", "fp16", "fp32")
FORMATS = ("onnx", "tflite")


@dataclass(frozen=True)
class ComputeSpec:
    """Peak throughput of one compute unit, per precision (GFLOP/s or GOP/s)."""

    fp32_gflops: float
    fp16_gflops: float
    int8_gops: float

    def peak_ops_per_s(self, precision: str) -> float:
        per_giga = {"fp32": self.fp32_gflops, "fp16": self.fp16_gflops, "int8": self.int8_gops}
        return per_giga[precision] * 1e9


@dataclass(frozen=True)
class Budget:
    latency_ms: float
    model_mb: float
    ram_mb: float


@dataclass(frozen=True)
class Profile:
    """A device the toolchain compiles for."""

    id: str
    name: str
    aliases: tuple[str, ...]
    cpu_arch: str
    cpu_cores: int
    cpu_freq_ghz: float
    cpu_isa: tuple[str, ...]
    ram_mb: int
    bandwidth_gbs: float
    compute: ComputeSpec  # the unit the runtime runs models on (the accelerator when there is one)
    cpu_compute: ComputeSpec
    formats: tuple[str, ...]
    providers: tuple[str, ...]
    precisions: tuple[str, ...]  # preferred order, least precise first
    budget: Budget
    op_overhead_us: float  # fixed cost per operator launch; dominates tiny models
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def weights_in_flash(self) -> bool:
        """Microcontrollers (TFLite Micro) read weights from flash in place: RAM holds only the
        tensor arena, so RAM is budgeted on activations and the model file on `model_mb`."""
        return "tflite-micro" in self.providers

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain data, for `--json`, reports and bundle manifests."""
        return {
            "id": self.id,
            "name": self.name,
            "aliases": list(self.aliases),
            "path": str(self.path) if self.path else None,
            "cpu": {"arch": self.cpu_arch, "cores": self.cpu_cores, "freq_ghz": self.cpu_freq_ghz,
                    "isa": list(self.cpu_isa)},
            "memory": {"ram_mb": self.ram_mb, "bandwidth_gbs": self.bandwidth_gbs},
            "compute": {**vars(self.compute), "op_overhead_us": self.op_overhead_us,
                        "cpu": vars(self.cpu_compute)},
            "runtime": {"formats": list(self.formats), "providers": list(self.providers),
                        "precisions": list(self.precisions)},
            "budget": vars(self.budget),
        }


def _require(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise TargetError(f"profile {where}: missing key '{key}'")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TargetError(f"profile {where}: '{key}' must be {expected}, got {value!r}")
    return value


def _section(data: dict[str, Any], name: str, origin: str) -> dict[str, Any]:
    section = data.get(name)
    if not isinstance(section, dict):
        raise TargetError(f"profile {origin}: missing section [{name}]")
    return section


def _compute_spec(table: dict[str, Any], where: str) -> ComputeSpec:
    return ComputeSpec(**{k: _positive(float(_require(table, k, (int, float), where)), k, where)
                          for k in ("fp32_gflops", "fp16_gflops", "int8_gops")})


def _str_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _require(table, key, list, where)
    if not all(isinstance(v, str) for v in values):
        raise TargetError(f"profile {where}: '{key}' must be a list of strings, got {values!r}")
    return tuple(values)


def _op_overhead_us(compute: dict[str, Any], where: str) -> float:
    """Optional (5 us when absent), but a present value must be a non-negative number."""
    if "op_overhead_us" not in compute:
        return 5.0
    value = float(_require(compute, "op_overhead_us", (int, float), where))
    if value < 0:
        raise TargetError(f"profile {where}: 'op_overhead_us' must be >= 0, got {value}")
    return value


def _choices(values: list[Any], allowed: tuple[str, ...], key: str, where: str) -> tuple[str, ...]:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise TargetError(f"profile {where}: '{key}' must be a non-empty list from {list(allowed)}, got {values!r}")
    return tuple(values)


# Every key a profile may have, by section: a typo (`[budget] latncy_ms`) must not leave a default in force.
KNOWN_KEYS: dict[str, set[str]] = {
    "": {"id", "name", "aliases", "measured", "cpu", "memory", "compute", "runtime", "budget"},
    "cpu": {"arch", "cores", "freq_ghz", "isa"},
    "memory": {"ram_mb", "bandwidth_gbs"},
    "compute": {"fp32_gflops", "fp16_gflops", "int8_gops", "op_overhead_us", "cpu"},
    "compute.cpu": {"fp32_gflops", "fp16_gflops", "int8_gops"},
    "runtime": {"formats", "providers", "precisions"},
    "budget": {"latency_ms", "model_mb", "ram_mb"},
}


def _check_keys(data: dict[str, Any], origin: str) -> None:
    for section, known in KNOWN_KEYS.items():
        table = data
        for part in filter(None, section.split(".")):
            table = table.get(part) if isinstance(table, dict) else None
        unknown = sorted(set(table) - known) if isinstance(table, dict) else []
        if unknown:
            where = f" [{section}]" if section else ""
            raise TargetError(f"profile {origin}{where}: unknown key '{unknown[0]}' (known keys here: {', '.join(sorted(known))})")


def _profile_id(value: str, origin: str) -> str:
    """The id names bundle and report files (`NAME-VERSION-ID.bundle`) and devices' status: no path parts."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise TargetError(f"profile {origin}: 'id' must be letters, digits, '_', '.' or '-' (it names the bundle file), got {value!r}")
    return value


def _positive(value: float, key: str, where: str) -> float:
    if value <= 0:
        raise TargetError(f"profile {where}: '{key}' must be > 0, got {value}")
    return value


def profile_from_dict(data: dict[str, Any], origin: str, path: Path | None = None) -> Profile:
    """Validate a parsed profile; every message names the file, the section and the key."""
    _check_keys(data, origin)
    cpu = _section(data, "cpu", origin)
    memory = _section(data, "memory", origin)
    compute = _section(data, "compute", origin)
    runtime = _section(data, "runtime", origin)
    budget = _section(data, "budget", origin)
    accel = _compute_spec(compute, f"{origin} [compute]")
    cpu_table = compute.get("cpu")
    cpu_compute = _compute_spec(cpu_table, f"{origin} [compute.cpu]") if isinstance(cpu_table, dict) else accel
    return Profile(
        id=_profile_id(_require(data, "id", str, origin), origin),
        name=str(data.get("name", data["id"])),
        aliases=_str_list(data, "aliases", origin),
        cpu_arch=_require(cpu, "arch", str, f"{origin} [cpu]"),
        cpu_cores=int(_positive(_require(cpu, "cores", int, f"{origin} [cpu]"), "cores", f"{origin} [cpu]")),
        cpu_freq_ghz=_positive(float(_require(cpu, "freq_ghz", (int, float), f"{origin} [cpu]")), "freq_ghz", f"{origin} [cpu]"),
        cpu_isa=_str_list(cpu, "isa", f"{origin} [cpu]"),
        ram_mb=int(_positive(_require(memory, "ram_mb", int, f"{origin} [memory]"), "ram_mb", f"{origin} [memory]")),
        bandwidth_gbs=_positive(float(_require(memory, "bandwidth_gbs", (int, float), f"{origin} [memory]")), "bandwidth_gbs",
                                f"{origin} [memory]"),
        compute=accel,
        cpu_compute=cpu_compute,
        formats=_choices(_require(runtime, "formats", list, f"{origin} [runtime]"), FORMATS, "formats", f"{origin} [runtime]"),
        providers=_str_list(runtime, "providers", f"{origin} [runtime]"),
        precisions=_choices(_require(runtime, "precisions", list, f"{origin} [runtime]"), PRECISIONS, "precisions", f"{origin} [runtime]"),
        budget=Budget(**{k: _positive(float(_require(budget, k, (int, float), f"{origin} [budget]")), k, f"{origin} [budget]")
                         for k in ("latency_ms", "model_mb", "ram_mb")}),
        op_overhead_us=_op_overhead_us(compute, f"{origin} [compute]"),
        path=path,
        raw=data,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"profile {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise TargetError(f"profile {path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise TargetError(f"profile {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_profile_file(path: Path) -> Profile:
    data = _read_toml(path)
    if data.get("measured") is True:
        from toolchain.targets.hostprobe import measured_host_values

        data = _merge(data, measured_host_values())
    return profile_from_dict(data, str(path), path)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def builtin_profile_paths() -> dict[str, Path]:
    """Map of profile id -> shipped file (ids are read from the files, not their names)."""
    paths: dict[str, Path] = {}
    for path in sorted(TARGETS_DIR.glob("*.toml")):
        profile_id = _read_toml(path).get("id")
        if isinstance(profile_id, str):
            paths[profile_id] = path
    return paths


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for profile_id, path in builtin_profile_paths().items():
        for alias in _read_toml(path).get("aliases", []):
            table[alias] = profile_id
    return table


def resolve_target(spec: str) -> Profile:
    """A profile id, an alias, or a path to a profile TOML file of the user's."""
    candidate = Path(spec).expanduser()
    if spec.endswith(".toml") or "/" in spec:  # a path; a bare word is an id or alias even if a file has that name
        if not candidate.is_file():
            raise TargetError(f"profile file {spec} does not exist")
        return load_profile_file(candidate)
    builtins = builtin_profile_paths()
    profile_id = spec if spec in builtins else _aliases().get(spec)
    if profile_id is None:
        known = ", ".join(f"{pid} ({', '.join(a)})" if (a := list(_read_toml(p).get("aliases", []))) else pid
                          for pid, p in builtins.items())
        raise TargetError(f"unknown target '{spec}'; known targets: {known}; or pass a path to a profile .toml file")
    return load_profile_file(builtins[profile_id])


def list_profiles() -> list[Profile]:
    return [load_profile_file(path) for path in builtin_profile_paths().values()]
