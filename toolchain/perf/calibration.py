"""Calibration files: a profile's fitted predictor, versioned, stored next to where profiles are found.

Why a separate file and not values written into the profile TOML: a profile is the data sheet (what
the board *can* do, with sources); a calibration is what the runtime *achieved* on it, measured on
one machine with one set of libraries at one date. It goes stale when any of those change, so the
file says which (format version, profile id, machine fingerprint, package versions, date) and how
good the fit was, and the loader refuses what it cannot trust.

Lookup for a profile `ID`: `$EDGE_TOOLCHAIN_CALIBRATION/ID.json` when that variable is set, else
`<cache>/calibration/ID.json` (written by `toolchain calibrate`), else `calibration/ID.json` beside
the profile's TOML file (a calibration shipped with a profile). One runtime's kernels say nothing
about another's, so each runtime has its own file: `ID.json` for onnxruntime, `ID-litert.json` for
LiteRT (`.tflite` models are predicted with the latter).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError
from toolchain.targets.hostprobe import cache_dir, fingerprint, write_json_atomic
from toolchain.perf.predictor import LatencyModel, MemoryModel, Peaks
from toolchain.core.provenance import package_versions
from toolchain.targets.profiles import Profile

FORMAT = "edge-toolchain-calibration"
FORMAT_VERSION = 1
RUNTIMES = ("onnxruntime", "litert")


@dataclass
class Calibration:
    """A fitted predictor for one profile, with where it came from and how well it fits."""

    profile: str
    source: str  # "variants" (measured here) | "fleet" (device telemetry)
    threads: int  # onnxruntime intra-op threads the measurements used
    peaks: Peaks
    latency: LatencyModel
    memory: MemoryModel | None
    fit: dict[str, Any]  # statistics on the samples the fit used
    validation: dict[str, Any] | None = None  # statistics on held-out samples never used in the fit
    fingerprint: dict[str, Any] | None = None  # the machine measured (None: a board, from its fleet)
    packages: dict[str, str | None] = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    runtime: str = "onnxruntime"  # whose kernels were measured (see RUNTIMES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "profile": self.profile, "runtime": self.runtime,
            "source": self.source,
            "created": self.created, "threads": self.threads, "fingerprint": self.fingerprint,
            "packages": self.packages, "peaks": vars(self.peaks), "latency": self.latency.to_dict(),
            "memory": self.memory.to_dict() if self.memory else None, "fit": self.fit, "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str) -> Calibration:
        """Parse a calibration file's JSON; a wrong format, version or shape is one clear error."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ToolchainError(f"{origin} is not a calibration file (written by `toolchain calibrate`)")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ToolchainError(f"{origin} has calibration format version {version!r}; this toolchain reads "
                                 f"version {FORMAT_VERSION}: run `toolchain calibrate --target {data.get('profile', 'ID')}` again")
        try:
            return cls(profile=str(data["profile"]), source=str(data["source"]), threads=int(data["threads"]),
                       peaks=Peaks(**{k: float(v) for k, v in data["peaks"].items()}),
                       latency=LatencyModel.from_dict(data["latency"]),
                       memory=MemoryModel.from_dict(data["memory"]) if data.get("memory") else None,
                       fit=dict(data["fit"]), validation=data.get("validation"), fingerprint=data.get("fingerprint"),
                       packages=dict(data.get("packages") or {}), created=str(data["created"]),
                       runtime=str(data.get("runtime", "onnxruntime")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ToolchainError(f"{origin}: calibration file is incomplete or malformed ({type(exc).__name__}: {exc}); "
                                 "run `toolchain calibrate` again") from None

    def summary(self) -> str:
        """One line for tables: source, date, and the held-out (else in-fit) median error."""
        stats = (self.validation or {}).get("latency") or self.fit
        which = "held-out" if stats is not self.fit else "in-fit"
        error = stats.get("median_abs_error")
        quality = f", {which} median error {100 * error:.1f}%" if isinstance(error, (int, float)) else ""
        return f"calibrated ({self.source}, {self.created[:10]}, {self.fit.get('samples', '?')} models{quality})"


def calibration_dir() -> Path:
    """Where `toolchain calibrate` writes: `$EDGE_TOOLCHAIN_CALIBRATION`, else `<cache>/calibration`."""
    override = os.environ.get("EDGE_TOOLCHAIN_CALIBRATION")
    return Path(override).expanduser() if override else cache_dir() / "calibration"


def file_name(profile_id: str, runtime: str = "onnxruntime") -> str:
    if runtime not in RUNTIMES:
        raise ToolchainError(f"unknown runtime {runtime!r}; calibrations exist for {', '.join(RUNTIMES)}")
    return f"{profile_id}.json" if runtime == "onnxruntime" else f"{profile_id}-{runtime}.json"


def default_path(profile_id: str, runtime: str = "onnxruntime") -> Path:
    return calibration_dir() / file_name(profile_id, runtime)


def candidate_paths(profile: Profile, runtime: str = "onnxruntime") -> list[Path]:
    """Where a calibration of `profile` for `runtime` may be, in lookup order."""
    paths = [default_path(profile.id, runtime)]
    if profile.path is not None:
        paths.append(profile.path.parent / "calibration" / file_name(profile.id, runtime))
    return paths


def read_calibration(path: Path) -> Calibration:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ToolchainError(f"calibration file {path} does not exist") from None
    except OSError as exc:
        raise ToolchainError(f"cannot read calibration file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ToolchainError(f"{path} is not valid JSON; run `toolchain calibrate` again") from None
    return Calibration.from_dict(data, str(path))


def write_calibration(calibration: Calibration, path: Path) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a calibration."""
    try:
        write_json_atomic(Path(path), calibration.to_dict())
    except OSError as exc:
        raise ToolchainError(f"cannot write calibration file {path}: {exc.strerror}") from None
    return Path(path)


def find_calibration(profile: Profile, runtime: str = "onnxruntime") -> tuple[Calibration | None, str]:
    """The calibration of `runtime` to use for `profile`, or None and why not (shown next to roofline numbers).

    A file for another profile, a stale host calibration (the machine or its libraries changed
    since: the fingerprint differs) or an unreadable/old-format file is skipped, never fatal: the
    predictor falls back to the uncalibrated roofline and says so.
    """
    reasons: list[str] = []
    for path in candidate_paths(profile, runtime):
        if not path.is_file():
            continue
        try:
            calibration = read_calibration(path)
        except ToolchainError as exc:
            reasons.append(f"ignored {exc}")
            continue
        if calibration.profile != profile.id:
            reasons.append(f"ignored {path}: it calibrates '{calibration.profile}', not '{profile.id}'")
            continue
        if calibration.runtime != runtime:
            reasons.append(f"ignored {path}: it calibrates {calibration.runtime}, not {runtime}")
            continue
        if profile.raw.get("measured") is True and calibration.fingerprint != fingerprint():
            reasons.append(f"ignored {path}: measured on another machine or library versions; "
                           f"run `toolchain calibrate --target {profile.id}` again")
            continue
        return calibration, calibration.summary()
    which = profile.id if runtime == "onnxruntime" else f"{profile.id} with {runtime}"
    return None, "; ".join(reasons) or f"uncalibrated roofline (no calibration for {which})"
