"""Every bad key of the build config gives a message naming the section, the key and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from toolchain.core.config import DEFAULT_CONFIG, load_config, parse_config
from toolchain.errors import ConfigError

GOOD = """
[project]
name = "demo"
[model]
entry = "model.py:build_model"
input_shape = [1, 8, 8]
[data]
source = "npz:data.npz"
"""


def with_overrides(**sections: str) -> str:
    """GOOD with some sections replaced by the given TOML bodies."""
    blocks = {"project": 'name = "demo"', "model": 'entry = "model.py:build_model"\ninput_shape = [1, 8, 8]',
              "data": 'source = "npz:data.npz"'}
    blocks.update(sections)
    return "\n".join(f"[{name}]\n{body}" for name, body in blocks.items())


@pytest.mark.parametrize("text, expected", [
    (with_overrides(compress="max_accuracy_drop = 3"), "[compress] max_accuracy_drop: Input should be less than or equal to 1 (got 3)"),
    (with_overrides(compress="prune_ratoi = 0.5"), "[compress] prune_ratoi: unknown key (known keys here: distill, student_width, temperature, alpha, prune_ratio"),
    (with_overrides(compress='quantize = ["int4"]'), "[compress] quantize.0: Input should be 'int8', 'fp16' or 'dynamic' (got 'int4')"),
    (with_overrides(compress="distill = true\ntemperature = 0"), "[compress] temperature: Input should be greater than 0 (got 0)"),
    (with_overrides(compress="prune_ratio = 0.97"), "[compress]: prune_ratio must be in [0, 0.95) or \"auto\", got 0.97"),
    (with_overrides(compress="student_width = 1.5"), "[compress]: student_width must be in (0, 1) or \"auto\", got 1.5"),
    (with_overrides(data='source = "s3://bucket"'), "[data] source: expected one of sklearn:..., npz:..., csv:..., images:..., python:..."),
    (with_overrides(data='source = "npz:x.npz"\ntest = 0.5\nvalidation = 0.45'), "[data]: validation + test = 0.95 leaves too little training data"),
    (with_overrides(model='entry = "model.py"\ninput_shape = [1, 8, 8]'), "[model] entry: String should match pattern"),
    (with_overrides(model='entry = "m.py:f"\ninput_shape = [1, 0, 8]'), "[model] input_shape: every dimension must be > 0 (got [1, 0, 8])"),
    (with_overrides(model='entry = "m.py:f"'), "[model]: input_shape is required with entry"),
    (with_overrides(project='name = "demo"\nversion = 0'), "[project] version: Input should be greater than or equal to 1 (got 0)"),
    (with_overrides(project='name = "bad name!"'), "[project] name: String should match pattern"),
    (with_overrides(train="lr = -1"), "[train] lr: Input should be greater than 0 (got -1)"),
    (GOOD + "\n[serach]\nn_trials = 3\n", "[serach]: unknown key (known keys here: project, model, data, train, search, compress, retrain, eval, tracking)"),
    (GOOD + '\n[retrain]\ndata = "fresh.npz"\n', "[retrain] data: expected one of sklearn:..., npz:..."),
    (GOOD + '\n[retrain]\ndata = "npz:f.npz"\ntrigger_share = 1.5\n', "[retrain] trigger_share: Input should be less than or equal to 1"),
    ("[project\nname=1", "not valid TOML"),
    (GOOD + "\n[search]\nn_trials = 3\n", "[search]: no parameter to search: add e.g. lr = {low = 1e-4, high = 1e-1, log = true}"),
    (GOOD + "\n[search]\nlr = {low = 1, high = 0.1}\n", "[search]: lr: low must be < high, got 1.0 and 0.1"),
    (GOOD + "\n[search]\nsampler = \"grid\"\nlr = {low = 0.1, high = 1}\n", "[search]: sampler = \"grid\" needs every parameter as a list of choices"),
    (GOOD + "\n[search]\nwidth = 3\n", "[search]: width: a parameter needs {low, high[, log]} or a non-empty list of choices, got 3"),
    (GOOD + "\n[search]\nsampler = \"bayes\"\nwidth = [1, 2]\n", "[search] sampler: Input should be 'tpe', 'random', 'grid' or 'nsga2' (got 'bayes')"),
])
def test_each_bad_key_names_itself(text: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, tmp_path / "toolchain.toml")
    message = str(error.value)
    assert message.startswith(f"config {tmp_path / 'toolchain.toml'}: ")
    assert expected in message
    assert "\n" not in message


def test_paths_resolve_relative_to_the_config_file(tmp_path: Path) -> None:
    config = parse_config(GOOD, tmp_path / "proj" / "toolchain.toml")
    assert config.resolve("data.npz") == tmp_path / "proj" / "data.npz"
    assert config.resolve("/abs/x.npz") == Path("/abs/x.npz")


def test_defaults_match_the_design() -> None:
    config = parse_config(GOOD, Path("/p/toolchain.toml"))
    assert config.compress.max_accuracy_drop == 0.01
    assert config.compress.quantize == ["int8", "fp16"]
    assert config.data.validation == 0.2 and config.data.test == 0.2


def test_the_embedded_default_is_used_without_config() -> None:
    config = load_config(None)
    assert config.path == DEFAULT_CONFIG and config.project.name == "digits"
    assert config.data.source == "sklearn:digits" and len(config.model.labels) == 10


def test_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(tmp_path / "nope.toml")


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "toolchain.toml").write_text(with_overrides(compress="max_accuracy_drop = -0.5"))
    out = tmp_path / "dist"
    result = run_cli("toolchain", "build", "--target", "jetson", "--config", str(tmp_path / "toolchain.toml"), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config {tmp_path / 'toolchain.toml'}: [compress] max_accuracy_drop: Input should be greater than or equal to 0 (got -0.5)"]
    assert not out.exists()


def test_the_command_line_form_names_the_options_in_its_errors(tmp_path: Path) -> None:
    from toolchain.core.config import command_line_config

    config = command_line_config(Path("models/det.onnx"), "npz:images.npz", "3,64,64", "agreement")
    assert (config.project.name, config.model.file, config.model.input_shape) == ("det", "models/det.onnx", [3, 64, 64])
    assert config.data.source == "npz:images.npz" and config.eval.metric == "agreement"
    for args, expected in ((("m.pt", "npz:d.npz", None, None), "--model: a model file must be .onnx or .tflite (got 'm.pt')"),
                           (("m.onnx", "s3://d", None, None), "--data: expected one of sklearn:..."),
                           (("m.onnx", "npz:d.npz", "3,a", None), "--input-shape '3,a': expected sizes separated by commas"),
                           (("m.onnx", "npz:d.npz", None, "accurasy"), "--metric: unknown metric")):
        with pytest.raises(ConfigError) as error:
            command_line_config(Path(args[0]), *args[1:])
        assert str(error.value).startswith(expected), str(error.value)


def test_later_errors_of_the_command_line_form_name_the_options_too(tmp_path: Path) -> None:
    """What the data and the model file raise once the build runs (`commands.build` rewrites them)."""
    from toolchain.core.config import COMMAND_LINE, command_line_message

    where = Path.cwd() / COMMAND_LINE
    for message, expected in (
        (f"config {where}: [data] source: /d/x.npz does not exist (paths are relative to the config file)",
         "--data: /d/x.npz does not exist (paths are relative to the current folder)"),
        (f"config {where}: [eval] metric: accuracy needs labels (an array y), and the data has none; use metric = \"agreement\" "
         "or add y to the data", "--metric: accuracy needs labels (an array y), and the data has none; use --metric agreement "
                                 "or add y to the data"),
        ("model m.onnx: input 'x' has dims ['n', 'c'] with sizes that are not fixed after the batch axis; fix them with "
         "[model] input_shape (or --input-shape), e.g. [N]", "model m.onnx: input 'x' has dims ['n', 'c'] with sizes that are "
                                                             "not fixed after the batch axis; fix them with --input-shape, e.g. [N]"),
    ):
        assert command_line_message(message) == expected
