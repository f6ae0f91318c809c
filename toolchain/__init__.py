"""The host side of the edge toolchain: build (train, compress, export, verify, benchmark, sign) and
fleet (flash, push, monitor, close the loop). See docs/architecture.md for the packages and their layers.

Packages, top to bottom; an import may only point down this list (checked by import-linter):
  commands  the CLI (`toolchain ...`), one module per command group
  build     the build workflow (which passes, in what order), the drift -> retrain -> redeploy autopilot
            and the simulated closed loop
  fleet     monitor, store, dashboard, fleet calibration, and the simulator (`fleet/sim/`)
  deploy    broker, TLS, flash, the operator's MQTT session, push (transfer, discovery, staged rollout)
  passes    one file per pass, grouped by framework; a pass never imports another pass
  perf      graph cost, roofline, latency predictors and their calibration, bench, compare
  training  the training loop, keep-or-reject trials of compressed models, the Keras path
  export    torch -> ONNX, ONNX/Keras -> .tflite
  quantize  ONNX INT8 quantization and torch QAT
  report    the HTML report
  runtime   measurement (latency, RSS), model outputs and files, through the device agent's session code
  core      the build's vocabulary: config, data, tensors, metrics, models, weights, artifact, the pass
            contract, checkpoints
  targets   device profiles (package data) and the host probe
  (resources: the files the package ships; errors: what a user can fix)
"""
