"""Checks a pushed bundle must pass before it may replace the running model.

Order matters: the signature and hashes first (nothing unverified is even parsed further), then
whether it is meant for this device (target) and newer than what runs (rollback protection; versions
that were rolled back are refused too), then a self-test of the loaded model on the sample inputs the
build stored in the bundle.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtime_agent.bundle import Bundle, read_bundle
from runtime_agent.errors import AgentError
from runtime_agent.model import LoadedModel


def check_update(path: Path, public_key: Ed25519PublicKey, running: dict[str, Any], refused: set[int]) -> Bundle:
    bundle = read_bundle(path, public_key)
    manifest = bundle.manifest
    if manifest["target"] != running["target"]:
        raise AgentError(f"bundle is built for target {manifest['target']!r}, this device is {running['target']!r}")
    if manifest["name"] != running["name"]:
        raise AgentError(f"bundle is model {manifest['name']!r}, this device serves {running['name']!r}")
    if manifest["version"] <= running["version"]:
        raise AgentError(f"version {manifest['version']} is not newer than the installed version {running['version']}")
    if manifest["version"] in refused:
        raise AgentError(f"version {manifest['version']} was rolled back on this device before; build a new version")
    return bundle


def self_test(model: LoadedModel) -> None:
    """The model must reproduce the outputs the build recorded for the bundle's sample inputs."""
    artifact = next((a for a in model.bundle.manifest["artifacts"] if a["role"] == "samples"), None)
    if artifact is None:
        raise AgentError("self-test impossible: the bundle carries no sample inputs")
    samples = np.load(io.BytesIO(model.bundle.files[artifact["path"]]), allow_pickle=False)
    got = model.logits(samples["x"])
    expected = samples["logits"]
    if got.shape != expected.shape or not np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)) \
            or not np.allclose(got, expected, rtol=1e-2, atol=1e-3):
        worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
        raise AgentError(f"self-test failed: outputs on the bundle's {len(expected)} sample inputs differ from "
                         f"the build's (max difference {worst:.3g})")
