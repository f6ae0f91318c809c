"""Data sources end as float32 `(n, *input_shape)` arrays; bad data is refused with the key at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolchain.core.config import parse_config
from toolchain.core.data import load_dataset
from toolchain.errors import ConfigError


def config_for(tmp_path: Path, source: str, shape: str = "[4]", extra: str = ""):
    text = f"""[project]\nname = "t"\n[model]\nentry = "m.py:f"\ninput_shape = {shape}\n{extra}
[data]\nsource = "{source}"\n"""
    return parse_config(text, tmp_path / "toolchain.toml")


def blobs(n: int = 90, features: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return rng.normal(size=(n, features)) + y[:, None] * 3, y


def test_npz_split_is_seeded_stratified_and_complete(tmp_path: Path) -> None:
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    first = load_dataset(config_for(tmp_path, "npz:d.npz"), seed=1)
    again = load_dataset(config_for(tmp_path, "npz:d.npz"), seed=1)
    assert np.array_equal(first.x_test, again.x_test) and first.sha256 == again.sha256
    assert len(first.y_train) + len(first.y_val) + len(first.y_test) == 90
    assert len(first.y_test) == 18 and len(first.y_val) == 18
    assert np.bincount(first.y_test).tolist() == [6, 6, 6]
    assert first.x_train.dtype == np.float32 and first.input_shape == (4,)
    assert first.labels == ["0", "1", "2"]


def test_npz_with_its_own_test_split(tmp_path: Path) -> None:
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:10], y_test=y[:10])
    data = load_dataset(config_for(tmp_path, "npz:d.npz"), seed=0)
    assert np.array_equal(data.x_test, x[:10].astype(np.float32))
    assert len(data.y_train) + len(data.y_val) == 90


def test_csv_with_header_and_named_label_column(tmp_path: Path) -> None:
    x, y = blobs()
    names = np.array(["cat", "dog", "eel"])[y]
    rows = ["a,b,label,c,d"] + [f"{r[0]},{r[1]},{n},{r[2]},{r[3]}" for r, n in zip(x, names)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    data = load_dataset(config_for(tmp_path, "csv:d.csv", extra="", shape="[4]").model_copy(
        update={"data": config_for(tmp_path, "csv:d.csv").data.model_copy(update={"label_column": "label"})}), seed=0)
    assert data.labels == ["cat", "dog", "eel"]
    assert data.x_train.shape[1:] == (4,)


def test_images_one_folder_per_class(tmp_path: Path) -> None:
    for label, value in (("dark", 10), ("light", 240)):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((12, 10), value + i, dtype=np.uint8)).save(tmp_path / "img" / label / f"{i}.png")
    data = load_dataset(config_for(tmp_path, "images:img", shape="[1, 6, 5]"), seed=0)
    assert data.labels == ["dark", "light"] and data.input_shape == (1, 6, 5)
    everything = np.concatenate([data.x_train, data.x_val, data.x_test])
    assert everything.min() >= 0 and everything.max() <= 1


def test_a_file_that_is_not_an_image_is_named_in_one_line(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / "img" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((6, 5), dtype=np.uint8)).save(tmp_path / "img" / label / "0.png")
    (tmp_path / "img" / "b" / "1.png").write_bytes(b"<html>a download that failed</html>")
    with pytest.raises(ConfigError) as error:
        load_dataset(config_for(tmp_path, "images:img", shape="[1, 6, 5]"), seed=0)
    assert str(error.value).endswith(f"[data] source: {tmp_path / 'img' / 'b' / '1.png'} cannot be read as an image "
                                     f"(cannot identify image file '{tmp_path / 'img' / 'b' / '1.png'}'); fix or remove it")


def test_python_source(tmp_path: Path) -> None:
    (tmp_path / "load.py").write_text("import numpy as np\ndef load():\n    return np.ones((30, 4)), np.arange(30) % 2\n")
    data = load_dataset(config_for(tmp_path, "python:load.py:load"), seed=0)
    assert data.labels == ["0", "1"]


def test_a_python_loader_that_raises_is_one_line_naming_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "load.py").write_text("import numpy as np\ndef load():\n    return np.load('gone.npy'), None\n")
    with pytest.raises(ConfigError) as error:
        load_dataset(config_for(tmp_path, "python:load.py:load"), seed=0)
    assert str(error.value).endswith("[data] source: load() raised FileNotFoundError: [Errno 2] No such file or "
                                     "directory: 'gone.npy' (at load.py line 3)")


@pytest.mark.parametrize("arrays, extra, expected", [
    ({"x": np.ones((30, 5)), "y": np.arange(30) % 3}, "", "[model] input_shape [4] needs 4 values per sample, but x has 5"),
    ({"x": np.full((30, 4), np.nan), "y": np.arange(30) % 3}, "", "x contains 120 NaN or infinite value(s)"),
    ({"x": np.ones((30, 4)), "y": np.arange(30) * 0.5}, 'task = "classification"', "y must be integers in [0, "),
    ({"x": np.ones((30, 4)), "y": np.arange(30) * 0.5}, 'labels = ["a", "b"]', "y must be integers in [0, 2)"),
    ({"x": np.ones((30, 4)), "y": np.full(30, np.inf)}, 'task = "regression"', "y contains 30 NaN or infinite value(s)"),
    ({"x": np.ones((30, 4))}, "", "lacks array 'y' (the labels a model is trained on)"),
    ({"x": np.ones((30, 4)), "y": np.array(["cat", "dog"] * 15)}, "",
     "y holds text (e.g. 'cat'); give class indices 0..K-1 and name the classes in [model] labels"),
    ({"x": np.ones((30, 4)), "y": np.zeros(30, np.int64)}, "",
     "y holds a single class ('0'); a classifier is trained on examples of at least two"),
])
def test_bad_data_is_refused_with_the_reason(tmp_path: Path, arrays: dict, extra: str, expected: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ConfigError) as error:
        load_dataset(config_for(tmp_path, "npz:d.npz", extra=extra), seed=0)
    assert expected in str(error.value)


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_samples_to_split_is_one_line(tmp_path: Path, n: int) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((n, 4)), y=np.arange(n) + 0.5)  # regression targets: one sample is one class
    with pytest.raises(ConfigError) as error:
        load_dataset(config_for(tmp_path, "npz:d.npz"), seed=0)
    assert str(error.value).endswith(f"[data] source: {n} samples are too few to split into training, validation (0.2) "
                                     "and test (0.2) sets; give more samples")


@pytest.mark.parametrize("returned, expected", [
    ("1, 2, 3", "must return a tuple (x, y), got a tuple of 3"),
    ("[[1.0, 2.0], [1.0]], [0, 1]", "returned arrays numpy cannot make rectangular (setting an array element with a sequence."),
])
def test_a_python_loader_returning_the_wrong_shape_of_thing_is_one_line(tmp_path: Path, returned: str, expected: str) -> None:
    (tmp_path / "load.py").write_text(f"def load():\n    return {returned}\n")
    with pytest.raises(ConfigError) as error:
        load_dataset(config_for(tmp_path, "python:load.py:load"), seed=0)
    assert f"[data] source: python:load.py:load {expected}" in str(error.value)


def test_missing_file_and_unknown_sklearn_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist \\(paths are relative to the config file\\)"):
        load_dataset(config_for(tmp_path, "npz:missing.npz"), seed=0)
    with pytest.raises(ConfigError, match="not a data set bundled with scikit-learn"):
        load_dataset(config_for(tmp_path, "sklearn:mnist"), seed=0)
