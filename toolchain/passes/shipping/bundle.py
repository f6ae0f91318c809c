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
from typing import ClassVar

import numpy as np

from runtime_agent.bundle import bundle_filename, write_bundle
from runtime_agent.reference import build_reference
from runtime_agent.signing import PRIVATE_KEY_NAME, default_key_dir, load_private_key, write_keypair
from toolchain.core.artifact import Artifact
from toolchain.core.checkpoint import save_checkpoint
from toolchain.errors import ToolchainError
from toolchain.runtime.sessions import model_logits
from toolchain.core.provenance import provenance
from toolchain.core.contract import BuildContext

SELF_TEST_SAMPLES = 8


def next_version(out_dir: Path, name: str, floor: int) -> int:
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)-.+\.bundle$")
    found = [int(m.group(1)) for p in out_dir.glob(f"{name}-*.bundle") if (m := pattern.match(p.name))] if out_dir.is_dir() else []
    return max([floor - 1, *found]) + 1


def signing_key_path(ctx: BuildContext) -> Path:
    if ctx.key_path is not None:
        if not ctx.key_path.is_file():
            raise ToolchainError(f"signing key {ctx.key_path} does not exist; create one with `toolchain keys generate --out DIR`")
        return ctx.key_path
    path = default_key_dir() / PRIVATE_KEY_NAME
    if not path.exists():
        private, public = write_keypair(path.parent)
        ctx.notes.append(f"created a new signing key {private}; give devices its public half {public}")
        ctx.console.print(f"  [yellow]no signing key yet: created {private} (public key: {public})[/]")
    return path


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class BundlePass:
    name: ClassVar[str] = "bundle"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        shipped, reference, data = artifact.shipped, artifact.reference, ctx.dataset
        project = ctx.config.project
        version = next_version(ctx.out_dir, project.name, project.version)
        train_predictions = model_logits(shipped.path, data.x_train).argmax(axis=1)
        samples = data.x_test[:SELF_TEST_SAMPLES]
        model_file = f"model.{shipped.format}"
        files = {model_file: shipped.path.read_bytes(),
                 "samples.npz": _npz_bytes(x=samples, y=data.y_test[:SELF_TEST_SAMPLES], logits=model_logits(shipped.path, samples))}
        manifest = {
            "name": project.name, "version": version, "target": ctx.profile.id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "providers": list(ctx.profile.providers),
            "artifacts": [
                {"path": model_file, "format": shipped.format, "precision": shipped.precision,
                 "runtime": shipped.runtime, "role": "model"},
                {"path": "samples.npz", "format": "npz", "precision": None, "runtime": None, "role": "samples"},
            ],
            "input": {"name": "input", "shape": list(data.input_shape), "dtype": "float32",
                      "preprocessing": {"normalize": "in-graph", **artifact.metrics["train"]["normalize"],
                                        "note": "send raw features as the data source produced them"}},
            "labels": data.labels,
            "metrics": {
                "reference": {"precision": "fp32", "accuracy": reference.metrics["accuracy"],
                              "latency_ms_p50_host": reference.metrics["latency_ms_p50_host"]},
                "shipped": {"name": shipped.name, "precision": shipped.precision, "accuracy": shipped.metrics["accuracy"],
                            "latency_ms_p50_host": shipped.metrics["latency_ms_p50_host"],
                            "latency_ms_predicted": shipped.metrics["latency_ms_predicted"], "bytes": shipped.bytes},
                "candidates": [c.to_dict() for c in artifact.candidates],
            },
            "reference": build_reference(data.x_train, train_predictions, len(data.labels)),
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
