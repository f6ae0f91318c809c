"""Sign and pack the shipped candidate into `NAME-VERSION-TARGET.bundle` (format: runtime_agent.bundle).

The version is the next integer above any bundle of this project already in the output folder (and
never below `[project] version`), so every build in one place rises and devices accept it as newer.
The first build without a key makes one in the documented default place and says so.
"""

from __future__ import annotations

import io
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime_agent.bundle import bundle_filename, write_bundle
from runtime_agent.reference import build_reference
from runtime_agent.signing import PRIVATE_KEY_NAME, default_key_dir, load_private_key, write_keypair
from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.checkpoint import save_checkpoint
from toolchain.core.contract import BuildContext
from toolchain.core.provenance import provenance
from toolchain.core.tensors import Features, TensorSpec, take
from toolchain.errors import ToolchainError
from toolchain.runtime.files import graph_output_names
from toolchain.runtime.sessions import model_outputs

SELF_TEST_SAMPLES = 8


def next_version(out_dir: Path, name: str, floor: int) -> int:
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)-.+\.bundle$")
    found = [int(m.group(1)) for p in out_dir.glob(f"{name}-*.bundle") if (m := pattern.match(p.name))] if out_dir.is_dir() else []
    return max([floor - 1, *found]) + 1


def check_signing_key(key_path: Path | None) -> None:
    """Before the build's work: a `--key` (or the key folder's key, once there is one) that cannot sign
    fails now, not at the bundle stage after training and measuring."""
    path = key_path if key_path is not None else default_key_dir() / PRIVATE_KEY_NAME
    if key_path is not None and path.is_dir():
        raise ToolchainError(f"signing key {path} is a folder; pass the key file in it (--key {path / PRIVATE_KEY_NAME})")
    if key_path is not None or path.exists():
        load_private_key(path)


def signing_key_path(ctx: BuildContext) -> Path:
    if ctx.key_path is not None:
        check_signing_key(ctx.key_path)
        return ctx.key_path
    path = default_key_dir() / PRIVATE_KEY_NAME
    if not path.exists():
        try:
            private, public = write_keypair(path.parent)
        except OSError as exc:
            raise ToolchainError(f"cannot create the signing key in {path.parent} ({exc.strerror or exc}); set "
                                 "$EDGE_TOOLCHAIN_KEYS to a folder you can write to, or pass --key") from exc
        ctx.notes.append(f"created a new signing key {private}; give devices its public half {public}")
        ctx.console.print(f"  [yellow]no signing key yet: created {private} (public key: {public})[/]")
    return path


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def self_test_samples(x: Features, y: np.ndarray | None, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """`samples.npz` (docs/bundle.md): inputs as `x` (one input) or `x__NAME`, the first output as
    `logits`, every output as `output__K` when there are several, and `y` when the data has targets."""
    arrays = dict({f"x__{name}": array for name, array in x.items()} if isinstance(x, dict) else {"x": x})
    arrays["logits"] = outputs[0]
    if len(outputs) > 1:
        arrays.update({f"output__{k}": out for k, out in enumerate(outputs)})
    if y is not None:
        arrays["y"] = y
    return arrays


def output_specs(candidate: Candidate, samples: list[np.ndarray]) -> list[dict[str, Any]]:
    """Every output by its name, with one sample's shape as the shipped model gives it on real inputs
    (the agent serves a `.tflite` file's one output as `logits`)."""
    names = graph_output_names(candidate.path) if candidate.format == "onnx" else ["logits"]
    return [TensorSpec(name, tuple(out.shape[1:]), str(out.dtype)).to_dict() for name, out in zip(names, samples)]


def preprocessing(artifact: Artifact) -> dict[str, Any]:
    train = artifact.metrics.get("train")
    if train is None:
        return {"normalize": "none", "note": "a model file's own: send inputs the way the model file expects them"}
    return {"normalize": "in-graph", **train["normalize"], "note": "send raw features as the data source produced them"}


def quality(candidate: Candidate) -> dict[str, Any]:
    """The metric fields of a candidate record (and accuracy when the task has it)."""
    keys = ("metric", "metric_value", "metric_drop", "accuracy")
    return {key: candidate.metrics[key] for key in keys if key in candidate.metrics}


class BundlePass:
    name: ClassVar[str] = "bundle"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        shipped, reference, data = artifact.shipped, artifact.reference, ctx.dataset
        project = ctx.config.project
        version = next_version(ctx.out_dir, project.name, project.version)
        inputs = list(data.inputs) or [TensorSpec("input", data.input_shape, "float32")]
        samples = take(data.x_test, slice(0, SELF_TEST_SAMPLES))
        sample_outputs = model_outputs(shipped.path, samples)
        model_file = f"model.{shipped.format}"
        y_samples = None if data.y_test is None else data.y_test[:SELF_TEST_SAMPLES]
        files = {model_file: shipped.path.read_bytes(), "samples.npz": _npz_bytes(**self_test_samples(samples, y_samples, sample_outputs))}
        manifest = {
            "name": project.name, "version": version, "target": ctx.profile.id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "providers": list(ctx.profile.providers),
            "task": data.task,
            "artifacts": [
                {"path": model_file, "format": shipped.format, "precision": shipped.precision,
                 "runtime": shipped.runtime, "role": "model"},
                {"path": "samples.npz", "format": "npz", "precision": None, "runtime": None, "role": "samples"},
            ],
            "input": {**inputs[0].to_dict(), "preprocessing": preprocessing(artifact)},
            "inputs": [spec.to_dict() for spec in inputs],
            "outputs": output_specs(shipped, sample_outputs),
            "labels": data.labels,
            "metrics": {
                "gate": artifact.metrics["gate"],
                "reference": {"name": reference.name, "precision": reference.precision, **quality(reference),
                              "latency_ms_p50_host": reference.metrics["latency_ms_p50_host"]},
                "shipped": {"name": shipped.name, "precision": shipped.precision, **quality(shipped),
                            "latency_ms_p50_host": shipped.metrics["latency_ms_p50_host"],
                            "latency_ms_predicted": shipped.metrics["latency_ms_predicted"], "bytes": shipped.bytes},
                "candidates": [c.to_dict() for c in artifact.candidates],
            },
            "reference": build_reference(data.x_train, model_outputs(shipped.path, data.x_train)[0], data.task, len(data.labels),
                                         validation=(model_outputs(shipped.path, data.x_val)[0], data.y_val)),
            "provenance": provenance(ctx.config.path, ctx.config.sha256, ctx.config.data.source, data.sha256,
                                     ctx.seed, ctx.budget),
        }
        path = ctx.work_path(bundle_filename(project.name, version, ctx.profile.id))
        write_bundle(path, manifest, files, load_private_key(signing_key_path(ctx)))
        artifact.outputs["bundle"] = path
        if artifact.trained_state is not None:  # what a later build warm-starts from
            artifact.outputs["checkpoint"] = save_checkpoint(path.with_suffix(".pt"), artifact.trained_state,
                                                             artifact.metrics["train"]["model_kwargs"], project.name)
        artifact.metrics["bundle"] = {"file": path.name, "version": version, "bytes": path.stat().st_size}
        ctx.console.print(f"  {path.name}: version {version}, {path.stat().st_size:,} bytes, signed")
        return artifact
