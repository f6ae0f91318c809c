"""Export the trained module to ONNX (the FP32 reference candidate) and prove the export is faithful.

Uses torch's supported exporter (`dynamo=True`; the TorchScript one is deprecated in torch 2.9+) with
a dynamic batch axis, then checks the file with `onnx.checker` and compares onnxruntime's outputs
with torch's on real validation samples: a silent exporter bug fails the build here, not on a device.
"""

from __future__ import annotations

from typing import ClassVar

import onnx

from toolchain.core.artifact import SOURCE, Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.errors import ToolchainError
from toolchain.export.onnx import TOLERANCE, export_module, max_abs_difference


TRAINED = "onnx-fp32-trained"


class ExportOnnxPass:
    name: ClassVar[str] = "export-onnx"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        path = ctx.work_path("model-fp32.onnx")
        with ctx.console.status("  exporting with torch.onnx (dynamo)"):
            export_module(artifact.module, ctx.dataset.input_shape, path)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        difference, scale = max_abs_difference(artifact.module, path, ctx.dataset.x_val[:64])
        if difference > TOLERANCE * scale:
            raise ToolchainError(f"the ONNX export differs from torch by {difference:.2e} (> {TOLERANCE} x the outputs' "
                                 f"scale {scale:.3g}); the model uses an operator the exporter translates wrongly")
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        artifact.metrics["export"] = {"opset": opset, "max_abs_difference_vs_torch": difference, "output_scale": scale,
                                      "nodes": len(model.graph.node)}
        artifact.candidates.append(Candidate(name=SOURCE, precision="fp32", path=path))
        ctx.console.print(f"  opset {opset}, {len(model.graph.node)} nodes, max |onnx - torch| = {difference:.1e}")
        if artifact.trained is not None and artifact.trained is not artifact.module:
            self.export_trained(artifact, ctx)
        return artifact

    @staticmethod
    def export_trained(artifact: Artifact, ctx: BuildContext) -> None:
        """Distillation or pruning replaced the trained model: export it too, as the yardstick. Their
        keep-or-reject decisions were made on validation data; the gate then bounds the *total* drop
        (compression and quantization together) against the model as trained, on the test split that
        none of those decisions saw, and can still ship the trained model if the compressed one
        loses too much there."""
        path = ctx.work_path("model-fp32-trained.onnx")
        with ctx.console.status("  exporting the model as trained (the gate's yardstick)"):
            export_module(artifact.trained, ctx.dataset.input_shape, path)
        artifact.candidates.append(Candidate(name=TRAINED, precision="fp32", path=path,
                                             metrics={"method": "the model as trained, before distillation and pruning"}))
        artifact.reference_name = TRAINED
        artifact.metrics["export"]["reference"] = f"{TRAINED}: the model as trained, before distillation and pruning"
        ctx.console.print(f"  {TRAINED}: the uncompressed model, the yardstick of every drop")
