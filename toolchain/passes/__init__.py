"""The build passes, one module each, grouped like Olive groups its passes:

  torch/     search, train, distill, prune, export_onnx, quantize_qat (they change a torch module)
  onnx/      quantize_int8, quantize_dynamic, quantize_fp16, quantize_mixed, export_tflite (ONNX in)
  keras/     train, prune, qat, export (a Keras model, shipped as .tflite)
  shipping/  evaluate, benchmark, gate, bundle, report (every pipeline ends with these)

A pass is `name` + `run(artifact, ctx) -> artifact` (`toolchain.core.contract.Pass`). A pass never
imports another pass: what two passes share lives in a library package (training, export, quantize,
perf, runtime).
"""
