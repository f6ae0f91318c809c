"""How fast and how big a model is, measured and predicted.

  graph_cost, graph_cost_tflite  read an ONNX or .tflite graph into one `GraphCost` (per-op FLOPs, bytes)
  predictor, predictor_fit       roofline and calibrated latency/memory predictors, and their fitting
  calibration                    the stored calibration files (one per profile and runtime)
  calibrate_host, variants       calibrating on this host: generated model variants, measured and fitted
  estimate                       the prediction a build and `bench` use, saying what it rests on
  bench, compare                 the `bench` row (measured by `toolchain.runtime.measure`), every-profile comparison
  module_cost                    what a torch module costs on a target, via its ONNX export

"Calibration" here always means fitting the latency predictor; quantization's sample inputs are
"representative samples" (`toolchain.quantize.int8`).
"""
