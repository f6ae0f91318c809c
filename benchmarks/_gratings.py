"""The synthetic image task of the MobileNetV2 benchmarks (agent.py, compression.py, tflite.py), in one place.

Ten classes of 3xSxS images, seeded. A class is an orientation (5 steps of 36 degrees) x a frequency
band (2 or 4 cycles per image), and a colour balance (which channels carry the grating strongly) that
repeats every three classes. The task is hard on purpose, so that a compressed model has accuracy to
lose (with clean gratings every variant scored 1.000 and no drop could show):
- the classes overlap: each image's orientation and frequency are drawn around its class's with a
  spread that crosses the boundary to a neighbouring class now and then (about 5% of images in
  orientation, 2% in frequency), and the colour gains are drawn with a spread too, so they resolve only
  part of that; even a perfect model misclassifies some images, so accuracy stays below 100% however
  large the model, the images or the training (MobileNetV2 levelled off at 0.90 after 12 epochs on 1200
  training images at 32x32), and many test images lie near a decision boundary, where quantization
  error can flip them (tflite.py --quick: INT8 agrees with FP32 on 98.5% of the test images);
- per-image contrast, a random illumination gradient and pixel noise.
It stays quick to learn: MobileNetV2 from scratch is well above chance (0.10) after a few epochs
(tflite.py --quick: 0.79 after 6 epochs on 1200 training images at 32x32).

`data_py(size, samples)` is the source of a `data.py` for a project's `[data] source =
"python:data.py:load"`; the benchmarks write it into their temporary project folders.
"""

from __future__ import annotations

DATA_PY = '''\
"""Synthetic image data of the MobileNetV2 benchmarks (benchmarks/_gratings.py): seeded, 10 overlapping
classes of 3xSxS gratings, with random contrast, an illumination gradient and noise."""
import numpy as np

SIZE = {size}
N_SAMPLES = {samples}
N_CLASSES = 10


def load(seed=0, n=N_SAMPLES):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % N_CLASSES
    rng.shuffle(y)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    x = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i, c in enumerate(y):
        angle = np.pi * (c % 5) / 5 + rng.normal(0, {angle_sd})
        frequency = 2 + 2 * (c // 5) + rng.normal(0, {frequency_sd})
        phase = rng.uniform(0, 2 * np.pi)
        signal = rng.uniform(0.6, 1.4) * np.sin(2 * np.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        light = rng.normal(0, 0.5) * (xx - 0.5) + rng.normal(0, 0.5) * (yy - 0.5)
        for channel in range(3):
            gain = 0.4 + 0.3 * ((c + channel) % 3) + rng.normal(0, {gain_sd})
            x[i, channel] = gain * signal + light + {noise} * rng.standard_normal((SIZE, SIZE))
    return x, y.astype(np.int64)
'''

# The spread of each class parameter around its class's value (neighbouring classes lie 0.63 rad, 2 cycles
# and 0.3 in gain apart) and the pixel noise, as standard deviations.
DIFFICULTY = {"angle_sd": 0.16, "frequency_sd": 0.5, "gain_sd": 0.15, "noise": 0.5}


def data_py(size: int, samples: int) -> str:
    """The `data.py` of a benchmark project: `samples` images of 3x`size`x`size`."""
    return DATA_PY.format(size=size, samples=samples, **DIFFICULTY)
