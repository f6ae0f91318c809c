"""MLflow experiment tracking of a build (`[tracking] uri = ...` or `toolchain build --track URI`).

One MLflow run per build, opened before anything is trained so that a tracking server that is down
fails the build at once, not after an hour of training. At the start it records what the build was
asked for (the config, the profile, seed, budget, package versions, as params); at the end what it
found, taken from the build's own records so the run and the report never disagree: the training's
per-epoch validation metrics, one nested run per search trial (and per cross-validation fold inside
it), every candidate's metric, drop, host and predicted latency, size and gate verdict, the published
files (bundle, report, checkpoint) and every candidate's model file as artifacts. The shipped model
becomes a new version of the registered model named after the project, tagged with the target, its
precision and the bundle's sha256. A build that fails ends its run FAILED.

MLflow is the optional `mlflow` extra; it is imported only when a build asks for tracking.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.core.artifact import Artifact
from toolchain.core.config import BuildConfig
from toolchain.core.contract import BuildContext
from toolchain.core.provenance import package_versions
from toolchain.errors import ToolchainError
from toolchain.targets.profiles import Profile

INSTALL = "pip install 'edge-toolchain[mlflow]' (in a checkout: bash scripts/setup.sh --dev)"
PROBE_TIMEOUT_S = 5.0
BATCH = 100  # MLflow's limit of params (and of tags) in one log_batch call
CANDIDATE_METRICS = ("metric_value", "metric_drop", "latency_ms_p50_host", "latency_ms_predicted")


def resolve_uri(uri: str, base: Path) -> str:
    """A file or SQLite tracking URI with a relative path is relative to `base` (the config's folder)."""
    for prefix in ("sqlite:///", "file:"):
        rest = uri.removeprefix(prefix)
        if uri.startswith(prefix) and not rest.startswith("/"):
            return f"{prefix}{(base / rest).resolve()}" if prefix == "file:" else f"sqlite:///{(base / rest).resolve()}"
    return uri


def _probe(uri: str) -> None:
    """An HTTP tracking server answers /health, or the build stops here, before any training."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ToolchainError(f"[tracking] the MLflow server {uri} does not answer ({reason}); start it "
                             "(mlflow server ...) or fix [tracking] uri / --track") from None


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    return {prefix: str(value)[:6000]}


@dataclass
class Tracker:
    client: Any  # mlflow.MlflowClient
    run_id: str
    model_name: str

    # ------------------------------------------------------------------ writing helpers

    def log_params(self, params: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id or self.run_id, params=items[start:start + BATCH])

    def log_metrics(self, values: dict[str, float | None], run_id: str | None = None, step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, step) for k, v in values.items() if isinstance(v, (int, float))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=items[start:start + 1000])

    def _child(self, name: str, parent: str) -> str:
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return self.client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id

    # ------------------------------------------------------------------ what a build records

    def training(self, artifact: Artifact) -> None:
        """Per-epoch validation metrics of the training (step = epoch)."""
        from mlflow.entities import Metric

        history = (artifact.metrics.get("train") or {}).get("history") or []
        stamp = int(time.time() * 1000)
        items = [Metric(f"train.{key}", float(value), stamp, int(row["epoch"]))
                 for row in history for key, value in row.items() if key != "epoch"]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def search(self, artifact: Artifact) -> None:
        """One nested run per trial (params, objective values, state), and per CV fold inside it."""
        search = artifact.metrics.get("search") or {}
        for row in search.get("trials", []):
            trial = self._child(f"trial {row['number']}", self.run_id)
            self.log_params({k: str(v) for k, v in row["params"].items()}, trial)
            self.log_metrics({**row["values"], "latency_ms": row.get("latency_ms"), "cv_mean": row.get("cv_mean"),
                           "cv_sd": row.get("cv_sd"), "epochs_run": row.get("epochs_run")}, trial)
            self.client.set_tag(trial, "state", row["state"])
            for fold, score in enumerate(row.get("cv_scores") or [], start=1):
                run = self._child(f"trial {row['number']} fold {fold}", trial)
                self.log_metrics({f"val_{search.get('metric', 'metric')}": score}, run)
                self.client.set_terminated(run)
            self.client.set_terminated(trial, "FINISHED" if row["state"] in ("COMPLETE", "PRUNED") else "FAILED")
        if "chosen" in search:
            self.client.set_tag(self.run_id, "search.chosen_trial", str(search["chosen"]["number"]))

    def candidates(self, artifact: Artifact) -> None:
        """Every candidate's metric, drop, latency (host and predicted), size and the gate's verdict."""
        for candidate in artifact.candidates:
            values = {f"{candidate.name}.{key}": candidate.metrics.get(key) for key in CANDIDATE_METRICS}
            values[f"{candidate.name}.bytes"] = candidate.bytes
            values[f"{candidate.name}.accepted"] = float(bool(candidate.accepted))
            self.log_metrics(values)
            self.client.set_tag(self.run_id, f"{candidate.name}.verdict", candidate.verdict[:5000])
        if artifact.shipped is not None:
            self.client.set_tag(self.run_id, "shipped", artifact.shipped.name)

    def files(self, artifact: Artifact, published: dict[str, Path]) -> None:
        """The published files (bundle, report, checkpoint) and every candidate's model file."""
        for path in published.values():
            self.client.log_artifact(self.run_id, str(path), "build")
        for candidate in artifact.candidates:
            self.client.log_artifact(self.run_id, str(candidate.path), "models")

    def register(self, artifact: Artifact, ctx: BuildContext, published: dict[str, Path]) -> str:
        """The shipped model as a new version of the project's registered model; returns the version."""
        from mlflow.exceptions import MlflowException

        shipped = artifact.shipped
        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        bundle = published.get("bundle")
        tags = {"target": ctx.profile.id, "precision": shipped.precision, "format": shipped.format,
                "bundle": bundle.name if bundle else "",
                "bundle_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest() if bundle else ""}
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/models/{shipped.path.name}"
        version = self.client.create_model_version(self.model_name, source, run_id=self.run_id, tags=tags)
        return version.version

    def finish(self, artifact: Artifact, ctx: BuildContext, published: dict[str, Path]) -> None:
        self.training(artifact)
        self.search(artifact)
        self.candidates(artifact)
        self.files(artifact, published)
        if artifact.shipped is not None:
            version = self.register(artifact, ctx, published)
            ctx.console.print(f"  tracked: MLflow run {self.run_id}, registered model {self.model_name!r} version {version}")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        """Mark the run FAILED, if the server still answers: the build's own error is the one to report."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except (MlflowException, OSError):
            pass


def open_tracking(config: BuildConfig, track: str | None, profile: Profile, *, seed: int, budget: str) -> Tracker | None:
    """The build's MLflow run, started (params logged), or None without `[tracking]` and `--track`.
    Every way it can fail (no MLflow, a server that is down, a store that cannot be opened) is one
    clear line, raised before the build trains anything."""
    section = config.tracking
    if track is None and section is None:
        return None
    uri = track if track is not None else resolve_uri(section.uri, config.base_dir)
    experiment = (section.experiment if section else None) or config.project.name
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ToolchainError(f"[tracking] needs MLflow, which is not installed: {INSTALL}") from None
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that dies mid-build: fail, not hang
        _probe(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=f"{config.project.name}-{profile.id}-seed{seed}",
                                tags={"target": profile.id, "budget": budget, "seed": str(seed)})
    except MlflowException as exc:
        raise ToolchainError(f"[tracking] MLflow at {uri} refused the run: {str(exc).splitlines()[0]}") from None
    tracker = Tracker(client=client, run_id=run.info.run_id, model_name=config.project.name)
    config_values = config.model_dump(mode="json", exclude_none=True, exclude={"tracking"})
    if config.search is not None and config.search.storage:
        from toolchain.passes.torch.search import public_url

        config_values["search"]["storage"] = public_url(config.search.storage)  # never a password in a param
    tracker.log_params({**_flatten("config", config_values), "config.file": str(config.path),
                     "config.sha256": config.sha256, "profile": profile.id, "seed": str(seed), "budget": budget,
                     **_flatten("packages", {k: v or "absent" for k, v in package_versions().items()})})
    return tracker


__all__ = ["Tracker", "open_tracking", "resolve_uri"]
