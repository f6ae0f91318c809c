"""What flows through the passes: the model under build, its candidates, and their numbers.

A pass reads an `Artifact` and returns one (usually the same object, enriched). Candidates are the
deployable files (FP32 ONNX, INT8 QDQ, FP16, ...); each carries its own metrics and, after the gate,
its verdict, so the report and the bundle can show every decision with its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISION_ORDER = {"fp32": 0, "fp16": 1, "mixed": 2, "int8": 3}  # higher = less precise: the gate's walk
SOURCE = "onnx-fp32"  # the FP32 ONNX candidate every other candidate is made from


@dataclass
class Candidate:
    name: str
    precision: str
    path: Path
    format: str = "onnx"
    runtime: str = "onnxruntime"
    metrics: dict[str, Any] = field(default_factory=dict)
    accepted: bool | None = None
    verdict: str = ""

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "format": self.format, "runtime": self.runtime,
                "bytes": self.bytes, **self.metrics, "accepted": self.accepted, "verdict": self.verdict}


@dataclass
class Artifact:
    module: Any = None  # the trained torch.nn.Module (typed loosely so this file needs no torch import)
    candidates: list[Candidate] = field(default_factory=list)
    shipped: Candidate | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # training history, export checks, ...
    outputs: dict[str, Path] = field(default_factory=dict)  # staged files to publish: role -> path
    teacher: Any = None  # the trained model a distilled student learned from (pruning fine-tunes from it too)
    trained_state: dict[str, Any] | None = None  # the trained module's weights before compression: the build's checkpoint
    reference_name: str | None = None  # set when the yardstick is not the source (the trained model, an imported .tflite)
    trained: Any = None  # the module as trained, before distillation or pruning replaced it

    @property
    def source(self) -> Candidate:
        """The FP32 ONNX file the other candidates are made from (exported or imported; after
        distillation and pruning, the compressed model's)."""
        for candidate in self.candidates:
            if candidate.name == SOURCE:
                return candidate
        raise LookupError("no FP32 ONNX source; the export or import pass must run first")

    @property
    def reference(self) -> Candidate:
        """The yardstick every candidate's metric drop is measured against: the model as trained (so
        the drops of distillation, pruning and quantization add up in one number the gate bounds),
        the imported file, or the user's `.tflite` file when that is all there is. Without a name set:
        the source, else the first FP32 candidate (a Keras build's FP32 `.tflite`)."""
        named = [c for c in self.candidates if c.name == (self.reference_name or SOURCE)]
        fallback = [c for c in self.candidates if c.precision == "fp32" and self.reference_name is None]
        if not named + fallback:
            raise LookupError("no reference candidate; the export or import pass must run first")
        return (named + fallback)[0]

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)
