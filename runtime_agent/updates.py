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
from runtime_agent.keyring import Keyring
from runtime_agent.model import CLASSIFICATION, LoadedModel


def check_update(path: Path, trusted: Ed25519PublicKey | Keyring, running: dict[str, Any], refused: set[int]) -> Bundle:
    bundle = read_bundle(path, trusted)
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


def _sample_names(model: LoadedModel) -> tuple[dict[str, str], list[str]]:
    """The arrays of `samples.npz` holding each input (`x`, or `x__{name}` for several) and each output
    (`logits` is the first, `output__{k}` the k-th, 0-based, when there are several)."""
    inputs = {model.inputs[0].name: "x"} if len(model.inputs) == 1 else {s.name: f"x__{s.name}" for s in model.inputs}
    return inputs, ["logits", *(f"output__{k}" for k in range(1, len(model.outputs)))]


def _matches(got: np.ndarray, expected: np.ndarray, classifier_scores: bool) -> bool:
    """Within the tolerance of a different build of the same runtime; exact for integer and bool outputs,
    and a classifier's scores must rank the same class first."""
    if got.shape != expected.shape:
        return False
    if not np.issubdtype(expected.dtype, np.floating):
        return np.array_equal(got, expected)
    if classifier_scores and not np.array_equal(got.argmax(axis=-1), expected.argmax(axis=-1)):
        return False
    return np.allclose(got, expected, rtol=1e-2, atol=1e-3)


def self_test(model: LoadedModel) -> None:
    """The model must reproduce every output the build recorded for the bundle's sample inputs: `logits`
    is the first output, `output__{k}` the k-th (0-based) when there are several."""
    artifact = next((a for a in model.bundle.manifest["artifacts"] if a["role"] == "samples"), None)
    if artifact is None:
        raise AgentError("self-test impossible: the bundle carries no sample inputs")
    samples = np.load(io.BytesIO(model.bundle.files[artifact["path"]]), allow_pickle=False)
    inputs, outputs = _sample_names(model)
    if missing := [name for name in [*inputs.values(), *outputs] if name not in samples.files]:
        raise AgentError(f"self-test impossible: {artifact['path']} lacks {', '.join(missing)}")
    got = model.predict({name: samples[key] for name, key in inputs.items()}).outputs
    recorded = [samples[name] for name in outputs]
    for index, (spec, expected) in enumerate(zip(model.outputs, recorded)):
        output = got[spec.name]
        if not _matches(output, expected, index == 0 and model.task == CLASSIFICATION):
            worst = float(np.abs(output.astype(np.float64) - expected).max()) if output.shape == expected.shape else float("nan")
            what = "outputs" if len(model.outputs) == 1 else f"output {spec.name!r}"
            raise AgentError(f"self-test failed: {what} on the bundle's {len(expected)} sample inputs differ from "
                             f"the build's (max difference {worst:.3g})")
