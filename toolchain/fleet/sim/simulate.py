"""`toolchain fleet simulate`: a fleet of N simulated devices over MQTT, in a few processes.

Every simulated device is a real device folder (`agent.toml`, credentials, trusted key, bundle) run by
the real agent code (`toolchain.fleet.sim.device`): telemetry windows with latency sketches and drift
statistics against the bundle's reference, durable outbox with `seq`, birth and last will, commands and
pushes. Only inference is replayed: the devices of a process share one onnxruntime session and are
served in batches (`toolchain.fleet.sim.worker`), and each request is accounted in its device's agent.

What the devices serve: the held-out test split of the data the bundle was built from (the build config
and seed are in the bundle's provenance; the data's sha256 must match), sampled per device with a seeded
generator, so every request has a ground-truth label. The simulator reports accuracy per window of
simulated time and per drift phase, and each device sends an ``accuracy`` event every
``accuracy_every`` windows (``{window, n, correct, accuracy}``), so whatever reads the fleet's events
(the monitor's store, an autopilot) can measure accuracy before and after a drift.

Drift (``--drift FEATURE=SHIFT@SECONDS``, repeatable): from SECONDS after the start, add SHIFT standard
deviations (of that feature in the streamed data) to FEATURE of every request of every device. FEATURE is
a name of the bundle's drift reference, as telemetry reports it (``x0`` .. ``x63`` for 8x8 inputs; for
larger images ``c0_mean`` shifts channel 0), or ``all`` (every input value; std of all values). Several
specs add up from their own start times.

Credentials: with ``broker_dir`` (a `toolchain broker` folder) every device gets its own user, added to
the broker's password file the way `toolchain flash` adds one (in one batch), and the generated ACL
fences it into its own topics. Without, the devices connect anonymously (a test or development broker).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime_agent.bundle import read_bundle
from runtime_agent.drift import MIN_PSI_SAMPLES
from runtime_agent.reference import MAX_RAW_FEATURES, feature_names, summary_features
from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir, load_public_key
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.errors import ToolchainError
from toolchain.fleet.sim.worker import Stream, WorkerSpec

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DRIFT = re.compile(r"^(?P<feature>[^=@\s]+)=(?P<shift>[^=@]+)@(?P<at>[^=@]+)$")
DRIFT_HINT = "expected FEATURE=SHIFT@SECONDS, e.g. x21=1.5@30 (from 30 s on, add 1.5 standard deviations to feature x21)"
ALL_FEATURES = ("all", "*")
DEVICES_PER_PROCESS = 100  # below this many, another process costs more than it saves
MAX_DEVICES = 100_000


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class DriftSpec:
    """One covariate shift: ``shift`` standard deviations added to ``feature`` from ``at_s`` seconds on."""

    feature: str
    shift: float
    at_s: float
    text: str

    @classmethod
    def parse(cls, text: str) -> "DriftSpec":
        """``FEATURE=SHIFT@SECONDS`` (SECONDS may end in ``s``); ToolchainError naming what is wrong."""
        match = _DRIFT.match(text.strip())
        if match is None:
            raise ToolchainError(f"--drift {text!r}: {DRIFT_HINT}")
        shift = _finite(match["shift"])
        if shift is None:
            raise ToolchainError(f"--drift {text!r}: SHIFT {match['shift']!r} is not a number of standard deviations; "
                                 f"{DRIFT_HINT}")
        if shift == 0:
            raise ToolchainError(f"--drift {text!r}: a shift of 0 standard deviations changes nothing")
        at_s = _finite(match["at"].removesuffix("s"))
        if at_s is None or at_s < 0:
            raise ToolchainError(f"--drift {text!r}: SECONDS {match['at']!r} must be a time >= 0 after the start; {DRIFT_HINT}")
        return cls(match["feature"], shift, at_s, text.strip())


def drift_schedule(specs: list[DriftSpec], pool: np.ndarray, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The phases of a drift schedule: start times (the first 0.0) and the input delta of each phase.

    Each spec's delta is its shift times the standard deviation of its feature in `pool`, placed on the
    input values that make that feature (one value for a raw feature, a whole channel for a channel mean).
    """
    shape = pool.shape[1:]
    names = feature_names(shape)
    features = summary_features(pool)
    raw = int(np.prod(shape)) <= MAX_RAW_FEATURES  # small inputs: every feature is one input value
    deltas = []
    for spec in specs:
        if duration_s > 0 and spec.at_s >= duration_s:
            raise ToolchainError(f"--drift {spec.text!r} starts at {spec.at_s:g} s, after the simulation ends "
                                 f"(--duration {duration_s:g})")
        delta = np.zeros(shape, dtype=np.float64)
        if spec.feature in ALL_FEATURES:
            delta += spec.shift * float(pool.std())
            deltas.append((spec.at_s, delta))
            continue
        if spec.feature not in names:
            listed = f"{names[0]} .. {names[-1]}" if raw else ", ".join(names)
            raise ToolchainError(f"--drift {spec.text!r}: unknown feature {spec.feature!r}; the bundle's drift features "
                                 f"are {listed}, or 'all' for every input value")
        column = names.index(spec.feature)
        std = float(features[:, column].std())
        if std == 0:
            raise ToolchainError(f"--drift {spec.text!r}: feature {spec.feature} is constant in the data (std 0), so a "
                                 "shift in standard deviations changes nothing; pick a feature that varies")
        if raw:
            delta.reshape(-1)[column] = spec.shift * std
        elif spec.feature.endswith("_mean"):  # every value of the channel (of the whole input if it has none)
            channel = delta if len(shape) == 1 else delta[int(spec.feature[1:].split("_")[0])]
            channel += spec.shift * std
        else:
            raise ToolchainError(f"--drift {spec.text!r}: only channel means (c0_mean, ...) can be shifted in this "
                                 "input, not spreads")
        deltas.append((spec.at_s, delta))
    onsets = sorted({0.0, *(at for at, _ in deltas)})
    table = np.stack([sum((d for at, d in deltas if at <= onset), np.zeros(shape)) for onset in onsets])
    return np.asarray(onsets), table.astype(np.float32)


@dataclass(frozen=True)
class SimulationSettings:
    """Everything `toolchain fleet simulate` takes; `validate` checks it before anything is written."""

    devices: int
    broker: str
    bundle: Path | None = None  # None: the newest bundle in dist/
    pubkey: Path = field(default_factory=lambda: default_key_dir() / PUBLIC_KEY_NAME)
    config: Path | None = None  # the build config whose held-out split is served; None: the bundle's provenance
    fleet: str = "sim"
    prefix: str = "sim"
    drift: tuple[str, ...] = ()
    duration_s: float = 60.0
    rate: float = 10.0
    window_s: float = 10.0
    processes: int | None = None
    seed: int = 0
    broker_dir: Path | None = None
    ca_file: Path | None = None
    work_dir: Path | None = None
    accuracy_every: int = 1
    fresh_data: Path | None = None  # keep this npz current with fresh labelled samples (see FreshData)

    def validate(self) -> list[DriftSpec]:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise ToolchainError(f"--devices must be between 1 and {MAX_DEVICES}, got {self.devices}")
        BrokerLogin(self.broker).address("--broker")
        for option, value in (("--fleet", self.fleet), ("--prefix", self.prefix)):
            if not _ID.match(value) or len(value) > 50:
                raise ToolchainError(f"{option} must be 1-50 letters, digits, '-' or '_', got {value!r}")
        checks = [("--rate", self.rate, 0 < self.rate <= 10_000, "requests per second per device in (0, 10000]"),
                  ("--window-s", self.window_s, 0.05 <= self.window_s <= 86_400, "seconds between 0.05 and 86400"),
                  ("--duration", self.duration_s, self.duration_s >= 0, "seconds >= 0 (0: until Ctrl-C)"),
                  ("--accuracy-every", self.accuracy_every, self.accuracy_every >= 0, "windows >= 0 (0: no accuracy events)")]
        for option, value, ok, expected in checks:
            if not ok or not math.isfinite(value):
                raise ToolchainError(f"{option} must be {expected}, got {value}")
        if self.processes is not None and not 1 <= self.processes <= self.devices:
            raise ToolchainError(f"--processes must be between 1 and --devices ({self.devices}), got {self.processes}")
        if self.broker_dir is not None and not (self.broker_dir / "broker.json").is_file():
            raise ToolchainError(f"--broker-dir {self.broker_dir} is not a broker folder (made by "
                                 "`toolchain broker start --dir`)")
        if self.fresh_data is not None and (self.fresh_data.suffix != ".npz" or not self.fresh_data.parent.is_dir()):
            raise ToolchainError(f"--fresh-data must be a .npz file in an existing folder, got {self.fresh_data}")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ToolchainError(f"--ca-file {self.ca_file} does not exist (the broker's CA certificate, PEM)")
        return [DriftSpec.parse(text) for text in self.drift]

    @property
    def process_count(self) -> int:
        return self.processes or max(1, min(os.cpu_count() or 1, math.ceil(self.devices / DEVICES_PER_PROCESS)))

    def device_ids(self) -> list[str]:
        width = len(str(self.devices))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(1, self.devices + 1)]


@dataclass(frozen=True)
class Plan:
    """A validated simulation: the verified bundle, what the devices serve, and the drift schedule."""

    settings: SimulationSettings
    bundle: Path
    manifest: dict[str, Any]
    specs: list[DriftSpec]
    stream: Stream  # the held-out test split: what the devices serve
    training: tuple[np.ndarray, np.ndarray]  # the build's training and validation inputs and labels

    @property
    def notes(self) -> list[str]:
        per_window = self.settings.rate * self.settings.window_s
        if per_window >= MIN_PSI_SAMPLES:
            return []
        return [f"{per_window:g} requests per window (--rate x --window-s): below {MIN_PSI_SAMPLES}, a window's PSI must be "
                "large to cross its threshold (runtime_agent.drift.psi_threshold) and the fleet's PSI heat leaves it out; "
                "Page-Hinkley still alarms at any rate"]


def newest_bundle(folder: Path = Path("dist")) -> Path:
    bundles = sorted(folder.glob("*.bundle"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not bundles:
        raise ToolchainError(f"no --bundle given and none in {folder}/; build one with `toolchain build --target jetson` "
                             "or pass --bundle")
    return bundles[-1]


def build_data(manifest: dict[str, Any], bundle: Path, config_path: Path | None) -> Any:
    """The data the bundle was built from, split as the build split it (its provenance: config, seed, data hash)."""
    from toolchain.core.config import load_config
    from toolchain.core.data import load_dataset

    provenance = manifest.get("provenance", {})
    path = config_path or (Path(provenance["config"]) if provenance.get("config") else None)
    if path is None:
        raise ToolchainError(f"{bundle.name} does not name its build config; pass --config")
    config = load_config(path)
    data = load_dataset(config, int(provenance.get("seed", 0)))
    if provenance.get("data_sha256") and data.sha256 != provenance["data_sha256"]:
        raise ToolchainError(f"the data of {path} ({config.data.source}) is not the data {bundle.name} was built from "
                             "(sha256 differs); pass --config with the build's config")
    if list(data.x_test.shape[1:]) != list(manifest["input"]["shape"]):
        raise ToolchainError(f"{path} gives inputs of shape {list(data.x_test.shape[1:])}, the bundle's model expects "
                             f"{manifest['input']['shape']}")
    return data


def plan(settings: SimulationSettings) -> Plan:
    """Validate everything (options, bundle signature, data, drift specs) before anything is written."""
    specs = settings.validate()
    bundle = (settings.bundle or newest_bundle()).resolve()
    manifest = read_bundle(bundle, load_public_key(settings.pubkey)).manifest
    data = build_data(manifest, bundle, settings.config)
    onsets, deltas = drift_schedule(specs, data.x_test, settings.duration_s)
    return Plan(settings, bundle, manifest, specs, Stream(x=data.x_test, y=data.y_test, onsets=onsets, deltas=deltas),
                (np.concatenate([data.x_train, data.x_val]), np.concatenate([data.y_train, data.y_val])))


class FreshData:
    """Keeps an npz file current with fresh labelled samples of what the devices see now, for retraining.

    Why: the closed loop retrains on fresh labelled data; in the field it comes from labelling what devices
    served, here the simulator knows both the labels and the drift. The file (an `npz:` data source) holds
    ``x, y``: the build's training and validation inputs with the drift active now, and ``x_test, y_test``:
    the served test split with it, so a build on it trains on data the devices never serve and is judged on
    exactly what they do. Written at the start and again at every drift onset (temporary file + rename).
    """

    def __init__(self, plan: Plan, path: Path) -> None:
        self.plan, self.path = plan, path
        self.written = 0  # phases written so far

    def update(self, elapsed_s: float) -> None:
        onsets = self.plan.stream.onsets
        while self.written < len(onsets) and elapsed_s >= onsets[self.written]:
            delta = self.plan.stream.deltas[self.written]
            (x, y), stream = self.plan.training, self.plan.stream
            staged = self.path.with_name(f".{self.path.name}.tmp.npz")
            np.savez(staged, x=x + delta, y=y, x_test=stream.x + delta, y_test=stream.y)
            os.replace(staged, self.path)
            self.written += 1


def provision(plan: Plan, work: Path) -> list[Path]:
    """A device folder per simulated device (a kept folder keeps its outbox: seq goes on), with credentials."""
    from toolchain.deploy.broker import ManagedBroker
    from toolchain.deploy.flash import agent_toml, tls_credentials

    settings = plan.settings
    ids = settings.device_ids()
    managed = ManagedBroker.load(settings.broker_dir) if settings.broker_dir else None
    passwords = {device: secrets.token_urlsafe(18) for device in ids} if managed else {}
    managed_tls = managed is not None and managed.tls and settings.broker.startswith("mqtts://")
    folders = []
    for device in ids:
        folder = work / "devices" / device
        folder.mkdir(parents=True, exist_ok=True)
        if managed_tls:  # the broker folder's CA and a client certificate per device, as `toolchain flash` gives
            mqtt_lines = tls_credentials(managed, folder, device)
        else:
            mqtt_lines = [f'ca_file = "{settings.ca_file.resolve()}"'] if settings.ca_file else []
        if managed:
            (folder / "mqtt.password").write_text(passwords[device] + "\n")
            os.chmod(folder / "mqtt.password", 0o600)
            mqtt_lines += [f'username = "{device}"', 'password_file = "mqtt.password"']
        (folder / "agent.toml").write_text(agent_toml(device, settings.fleet, settings.broker, mqtt_lines, 0,
                                                      settings.window_s, writer="toolchain fleet simulate"))
        shutil.copyfile(settings.pubkey, folder / "trusted.pub")
        current = folder / "current.bundle"
        current.unlink(missing_ok=True)
        current.symlink_to(plan.bundle)
        folders.append(folder)
    if managed:
        managed.add_users(passwords)
    return folders


def worker_specs(plan: Plan, folders: list[Path], pubkey: Path) -> list[WorkerSpec]:
    settings = plan.settings
    count = settings.process_count
    devices = list(enumerate(str(folder) for folder in folders))
    return [WorkerSpec(worker=w, devices=tuple(devices[w::count]), fleet_size=len(devices), bundle=str(plan.bundle),
                       pubkey=str(pubkey), stream=plan.stream, rate=settings.rate, duration_s=settings.duration_s,
                       window_s=settings.window_s, seed=settings.seed, accuracy_every=settings.accuracy_every)
            for w in range(count)]


@dataclass
class SimulationResult:
    """What the simulated fleet did: per device what it sent, accuracy per window and per drift phase."""

    fleet: str
    bundle: str
    model_version: int
    t0: float  # wall clock of the simulation's start: drift onsets are relative to it
    t1: float
    settings: dict[str, Any]
    drift: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    phases: list[dict[str, Any]]

    @property
    def messages(self) -> dict[str, int]:
        return {"sent": sum(d["last_seq"] - d["first_seq"] + 1 for d in self.devices),
                "pending": sum(d["pending"] for d in self.devices),
                "dropped_telemetry": sum(d["dropped_telemetry"] for d in self.devices)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "messages": self.messages}


def _accuracy_rows(n: list[int], correct: list[int], edges: list[float]) -> list[dict[str, Any]]:
    return [{"from_s": round(edges[i], 6), "to_s": round(edges[i + 1], 6), "n": n[i], "correct": correct[i],
             "accuracy": round(correct[i] / n[i], 6) if n[i] else None} for i in range(len(n))]


def _summed(parts: list[list[int]]) -> list[int]:
    size = max((len(p) for p in parts), default=0)
    total = np.zeros(size, dtype=np.int64)
    for part in parts:
        total[:len(part)] += np.asarray(part, dtype=np.int64)
    return total.tolist()


def assemble(plan: Plan, t0: float, t1: float, results: list[dict[str, Any]]) -> SimulationResult:
    settings = plan.settings
    bucket_n = _summed([r["buckets"]["n"] for r in results])
    bucket_correct = _summed([r["buckets"]["correct"] for r in results])
    edges = [i * settings.window_s for i in range(len(bucket_n) + 1)]
    onsets = [float(v) for v in plan.stream.onsets]
    end = t1 - t0
    phases = _accuracy_rows(_summed([r["phases"]["n"] for r in results]), _summed([r["phases"]["correct"] for r in results]),
                            [*onsets, max(end, onsets[-1])])
    for row, onset in zip(phases, onsets):
        row["drift"] = [spec.text for spec in plan.specs if spec.at_s <= onset]
    devices = sorted((d for r in results for d in r["devices"]), key=lambda d: d["index"])
    return SimulationResult(fleet=settings.fleet, bundle=str(plan.bundle), model_version=int(plan.manifest["version"]),
                            t0=t0, t1=t1,
                            settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
                            drift=[{"feature": s.feature, "shift": s.shift, "at_s": s.at_s, "text": s.text} for s in plan.specs],
                            devices=devices, timeline=_accuracy_rows(bucket_n, bucket_correct, edges), phases=phases)


def scratch_dir() -> str | None:
    """Where temporary device folders go: memory (/dev/shm) when there is one, as a thousand outboxes
    writing to one shared disk would measure that disk rather than the fleet; else the default temp dir."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def simulate(settings: SimulationSettings, console: Any = None) -> SimulationResult:
    """Plan, provision the device folders (in `work_dir`, or a temporary folder removed afterwards), run."""
    from toolchain.fleet.sim.run import run_workers

    checked = plan(settings)
    for note in checked.notes:
        if console is not None:
            console.print(f"[yellow]note:[/] {note}")
    work = settings.work_dir or Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=scratch_dir()))
    try:
        folders = provision(checked, work)
        fresh = FreshData(checked, settings.fresh_data) if settings.fresh_data else None
        t0, t1, results = run_workers(worker_specs(checked, folders, settings.pubkey), settings.duration_s, console,
                                      on_time=fresh.update if fresh else None)
        return assemble(checked, t0, t1, results)
    finally:
        if settings.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
