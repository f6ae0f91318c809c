"""Opening and running model files on this host the way the device agent does: `measure` (sessions as
measured, interleaved latency, peak RSS in a clean child process), `sessions` (outputs in batches) and
`files` (model or bundle in, checked file out).

Below `quantize` and `perf` because both need it: quantization checks accuracy and times its
variants, calibration measures generated variants. `measure` runs its RSS child as a plain script
that imports no `toolchain` module.
"""
