"""The user's torch model: the entry called with the arguments it declares, pretrained weights loaded
into it (a state_dict, a checkpoint dict, this toolchain's own checkpoint), and one clear line for a
file or a factory that does not fit. Tiny models, seeded, no training."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from toolchain.core.artifact import Artifact
from toolchain.core.checkpoint import save_checkpoint
from toolchain.core.config import load_config
from toolchain.core.contract import BuildContext
from toolchain.core.data import load_dataset
from toolchain.core.models import build_normalized_model, call_factory, factory_defaults
from toolchain.core.weights import load_weights
from toolchain.errors import ConfigError
from toolchain.passes.torch.train import TrainPass
from toolchain.targets.profiles import resolve_target

MODEL = '''
from torch import nn

def build_model(input_shape, num_classes, hidden=8):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''


def project(root: Path, model: str = MODEL, extra: str = "", task: str = "classification") -> Path:
    """A 4-feature project (120 samples, 3 classes or one regression target) with the entry `model`."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = np.arange(120) % 3 if task == "classification" else (x @ np.array([1.0, -2.0, 0.5, 3.0]) + 40).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "data.npz", x=x, y=y)
    (root / "model.py").write_text(model)
    (root / "toolchain.toml").write_text(f'[project]\nname = "tiny"\n[model]\nentry = "model.py:build_model"\n'
                                         f'input_shape = [4]\ntask = "{task}"\n{extra}\n[data]\nsource = "npz:data.npz"\n')
    return root / "toolchain.toml"


def built(config_path: Path, **overrides) -> tuple[nn.Sequential, object]:
    config = load_config(config_path)
    dataset = load_dataset(config, 0)
    torch.manual_seed(0)
    model, _ = build_normalized_model(config, dataset, **overrides)
    return model, dataset


def train_ctx(config_path: Path, tmp_path: Path) -> BuildContext:
    config = load_config(config_path)
    return BuildContext(config=config, profile=resolve_target("rpi5"), dataset=load_dataset(config, 0),
                        out_dir=tmp_path / "out", work_dir=tmp_path, console=Console(file=io.StringIO()))


# ----------------------------------------------------------------------------- calling the entry


@pytest.mark.parametrize("source, expected", [
    ("def build_model(hidden=64):\n    return ('hidden', hidden)", ("hidden", 5)),
    ("def build_model(input_shape, **kw):\n    return (input_shape, sorted(kw.items()))", ([4], [("hidden", 5), ("num_classes", 3)])),
    ("def build_model(shape, classes, hidden=1):\n    return (shape, classes, hidden)", ([4], 3, 5)),  # the old positional convention
    ("def build_model(input_shape, num_outputs, *, hidden):\n    return (input_shape, num_outputs, hidden)", ([4], 3, 5)),
    ("def build_model(input_shape, /, num_classes, hidden=1):\n    return (input_shape, num_classes, hidden)", ([4], 3, 5)),
])
def test_the_entry_gets_only_the_arguments_it_declares(source: str, expected: tuple) -> None:
    namespace: dict = {}
    exec(source, namespace)
    assert call_factory(namespace["build_model"], [4], 3, {"hidden": 5}, "key") == expected


@pytest.mark.parametrize("source, kwargs, message", [
    ("def build_model(input_shape, num_classes, depth):\n    pass", {},
     "key: the toolchain cannot fill the entry's required parameter 'depth'"),
    ("def build_model(a, b, c, /):\n    pass", {}, "key: the toolchain cannot fill the entry's required parameter 'c'"),
    ("def build_model(hidden=64):\n    pass", {"width": 3}, "key: the entry has no parameter 'width' (it takes hidden)"),
])
def test_an_entry_the_toolchain_cannot_call_is_one_clear_error(source: str, kwargs: dict, message: str) -> None:
    namespace: dict = {}
    exec(source, namespace)
    with pytest.raises(ConfigError) as error:
        call_factory(namespace["build_model"], [4], 3, kwargs, "key")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_entry_that_raises_is_one_line_naming_its_file_and_line(tmp_path: Path) -> None:
    source = "def build_model(input_shape, num_classes):\n    raise ValueError('no such backbone')\n"
    with pytest.raises(ConfigError) as error:
        built(project(tmp_path, source))
    assert str(error.value).endswith("[model] entry: build_model() raised ValueError: no such backbone (at model.py line 2)")


def test_factory_defaults_leave_out_what_the_toolchain_fills() -> None:
    def make(input_shape, num_outputs=1, hidden=64, *, width_mult=1.0):
        pass

    assert factory_defaults(make) == {"hidden": 64, "width_mult": 1.0}


def test_a_make_hidden_factory_builds_for_classification_and_regression(tmp_path: Path) -> None:
    source = "from torch import nn\ndef build_model(hidden=64):\n    return nn.Sequential(nn.Linear(4, hidden), nn.Linear(hidden, {n}))\n"
    model, dataset = built(project(tmp_path / "c", source.format(n=3), "kwargs = { hidden = 6 }"))
    assert model[1][0].out_features == 6 and model(torch.zeros(2, 4)).shape == (2, 3)
    model, dataset = built(project(tmp_path / "r", source.format(n=1), task="regression"))
    assert model[1][0].out_features == 64 and model(torch.zeros(2, 4)).shape == (2, 1)
    mean, std = float(dataset.y_train.mean()), float(dataset.y_train.std())
    assert (float(model[2].mean), float(model[2].std)) == pytest.approx((mean, std))  # outputs in the targets' units


def test_a_regression_model_with_the_wrong_output_width_is_refused(tmp_path: Path) -> None:
    expected = r"outputs shape \[2, 3\] for a batch of 2, expected \[2, 1\] \(one value per regression target\)"
    with pytest.raises(ConfigError, match=expected):
        built(project(tmp_path, MODEL.replace("num_classes)", "3)"), task="regression"))


# ----------------------------------------------------------------------------- pretrained weights


def source_and_target(tmp_path: Path, save) -> tuple[nn.Module, nn.Sequential]:
    """A trained-elsewhere module (seed 1) saved by `save(module, path)`, and the build's model loaded from it."""
    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    save(source, tmp_path / "ckpt.pt")
    config = load_config(project(tmp_path, extra='weights = "ckpt.pt"'))
    model, _ = built(config.path)
    assert load_weights(model, config) == "the entry's module"
    return source, model


@pytest.mark.parametrize("save", [
    lambda module, path: torch.save(module.state_dict(), path),
    lambda module, path: torch.save({"epoch": 7, "model_state_dict": module.state_dict(), "optimizer": {}}, path),
    lambda module, path: torch.save({"model": {f"module.{k}": v for k, v in module.state_dict().items()}}, path),
], ids=["state_dict", "checkpoint-dict", "data-parallel"])
def test_pretrained_weights_load_into_the_entrys_module(tmp_path: Path, save) -> None:
    source, model = source_and_target(tmp_path, save)
    x = torch.randn(16, 4)
    assert (float(model[0].mean), float(model[0].std)) == (0.0, 1.0)  # no normalisation the weights never saw
    assert torch.equal(model.eval()(x), source.eval()(x))


def test_a_checkpoint_of_the_whole_model_keeps_its_constants(tmp_path: Path) -> None:
    config = load_config(project(tmp_path, extra='weights = "ckpt.pt"'))
    trained, _ = built(project(tmp_path / "elsewhere"))  # normalised from its own data
    with torch.no_grad():
        trained[0].mean.fill_(0.25)
    save_checkpoint(tmp_path / "ckpt.pt", trained.state_dict(), {}, "tiny")
    model, _ = built(config.path)
    assert load_weights(model, config).startswith("the whole model")
    x = torch.randn(16, 4)
    assert float(model[0].mean) == 0.25 and torch.equal(model.eval()(x), trained.eval()(x))


@pytest.mark.parametrize("write, message", [
    (lambda path: torch.save({"0.weight": torch.zeros(8, 4), "9.weight": torch.zeros(1)}, path),
     r"does not fit the entry's model: missing keys 0\.bias, 2\.weight, 2\.bias; unexpected keys 9\.weight; build the model"),
    (lambda path: torch.save(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).state_dict(), path),
     r"shapes differ: 0\.weight \[5, 4\] vs the model's \[8, 4\], 0\.bias \[5\] vs the model's \[8\], 2\.weight \[3, 5\]"),
    (lambda path: path.write_bytes(b"PK\x03\x04 not really a zip"),
     r"cannot be read as torch weights \(\w+\): it is not a torch.save file"),
    (lambda path: torch.save(nn.Linear(4, 3), path), r"cannot be read as torch weights \(\w+\): it holds pickled objects beyond tensors"),
    (lambda path: torch.save({"epoch": 3, "step": 9}, path), r"holds a dict with keys epoch, step, not a state_dict"),
    (lambda path: None, r"ckpt\.pt does not exist"),
], ids=["keys", "shapes", "corrupt", "whole-module", "no-state-dict", "missing"])
def test_weights_that_do_not_fit_are_one_clear_error(tmp_path: Path, write, message: str) -> None:
    write(tmp_path / "ckpt.pt")
    config = load_config(project(tmp_path, extra='weights = "ckpt.pt"'))
    model, _ = built(config.path)
    with pytest.raises(ConfigError, match=r"^config .*toolchain\.toml: \[model\] weights: .*" + message) as error:
        load_weights(model, config)
    assert "\n" not in str(error.value)


def test_epochs_0_keeps_the_weights_bit_identical_through_the_train_pass(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    torch.save(source.state_dict(), tmp_path / "ckpt.pt")
    ctx = train_ctx(project(tmp_path, MODEL.replace("num_classes", "num_outputs"),
                            'weights = "ckpt.pt"\n[train]\nepochs = 0', task="regression"), tmp_path)
    dataset = ctx.dataset
    artifact = TrainPass().run(Artifact(), ctx)
    body = artifact.module[1]
    assert all(torch.equal(body.state_dict()[k], v) for k, v in source.state_dict().items())
    train = artifact.metrics["train"]
    assert train["pretrained"]["use"] == "kept as they are ([train] epochs = 0)" and train["epochs_run"] == 0
    expected = np.sqrt(((source(torch.from_numpy(dataset.x_val)).detach().numpy()[:, 0] - dataset.y_val) ** 2).mean())
    assert train["metric"] == "rmse" and train["val_rmse"] == pytest.approx(expected, rel=1e-4)
    assert train["normalize"] == {"mean": 0.0, "std": 1.0, "target_mean": 0.0, "target_std": 1.0}


def test_without_epochs_0_training_fine_tunes_from_the_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict(), tmp_path / "ckpt.pt")
    ctx = train_ctx(project(tmp_path, extra='weights = "ckpt.pt"\n[train]\nepochs = 2'), tmp_path)
    train = TrainPass().run(Artifact(), ctx).metrics["train"]
    assert train["pretrained"]["use"] == "fine-tuned for up to 2 epochs" and train["epochs_run"] == 2
    assert [sorted(epoch) for epoch in train["history"]] == [["epoch", "val_accuracy", "val_loss"]] * 2


def test_a_keras_entry_for_regression_or_with_torch_weights_is_one_clear_error(tmp_path: Path) -> None:
    from toolchain.passes.keras.train import KerasTrainPass

    ctx = train_ctx(project(tmp_path / "r", task="regression"), tmp_path)
    with pytest.raises(ConfigError, match=r"Keras models are trained for classification only \(this task is regression\)"):
        KerasTrainPass().run(Artifact(), ctx)
    torch.save({"w": torch.zeros(1)}, tmp_path / "ckpt.pt")
    ctx = train_ctx(project(tmp_path / "w", extra='weights = "../ckpt.pt"'), tmp_path)
    with pytest.raises(ConfigError, match=r"\[model\] weights loads torch weights, and the entry returns a Keras model"):
        KerasTrainPass().run(Artifact(), ctx)
