"""The host side of the edge toolchain: build (train, compress, export, verify, benchmark, sign) and
fleet (flash, push, monitor, close the loop). See docs/architecture.md for the packages and their layers.

Packages, top to bottom; an import may only point down this list (checked by import-linter):
  commands  the CLI (`toolchain ...`), one module per command group
  build     the build workflow (which passes, in what order) and the drift -> retrain -> redeploy autopilot
  fleet     monitor, store, dashboard, fleet calibration, and the simulator (`fleet/sim/`)
  deploy    broker, TLS, flash, push (transfer and staged rollout)
  passes    one file per pass, grouped by framework; a pass never imports another pass
  perf      graph cost, latency predictors and their calibration, measurement, bench, compare
  training  the training loop and the Keras model helpers
  export    torch -> ONNX, ONNX/Keras -> .tflite
  quantize  ONNX INT8 quantization and torch QAT
  report    the HTML report
  runtime   host sessions and model files, through the device agent's own session code
  core      the build's vocabulary: config, data, models, artifact, the pass contract, checkpoints
  targets   device profiles (package data) and the host probe
"""
