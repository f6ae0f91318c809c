"""Named tensors: what a model takes and gives (`TensorSpec`), and the sample arrays fed to it.

A model with one input is fed a plain array `(n, *shape)`; a model with several inputs is fed a dict
of such arrays by input name (`Features`). The helpers here let data splitting, calibration and
evaluation treat both alike without caring which they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

Features = Union[np.ndarray, dict[str, np.ndarray]]
DTYPES = ("float32", "float16", "int64", "int32", "uint8", "int8", "bool")  # what inputs and outputs may hold


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, one sample's shape (no batch axis; -1 where it varies) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def count(x: Features) -> int:
    """Number of samples."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def take(x: Features, index: np.ndarray | slice) -> Features:
    """The samples at `index` (an index array or a slice), of the same kind as `x`."""
    return {name: array[index] for name, array in x.items()} if isinstance(x, dict) else x[index]


def as_feeds(x: Features, names: list[str]) -> dict[str, np.ndarray]:
    """The runtime's feed dict: a plain array goes to the single input, a dict is passed by name."""
    if isinstance(x, dict):
        return {name: x[name] for name in names}
    if len(names) != 1:
        raise ValueError(f"the model takes {len(names)} inputs ({', '.join(names)}); pass a dict of arrays by name")
    return {names[0]: x}


def first(x: Features) -> np.ndarray:
    """The first input's samples (what single-input code paths such as drift features read)."""
    return next(iter(x.values())) if isinstance(x, dict) else x
