"""One place that seeds every random number generator a build touches, so builds are repeatable."""

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    import torch

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
