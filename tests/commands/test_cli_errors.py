"""Bad input at the command line: one clear line, exit 2, nothing written."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from runtime_agent.signing import write_keypair
from tests.conftest import BIN, REPO, run_cli
from toolchain.core.contract import BuildContext
from toolchain.errors import ToolchainError
from toolchain.passes.shipping.bundle import check_signing_key, signing_key_path

pytestmark = pytest.mark.usefixtures("narrow_terminal")  # one clear line however narrow the terminal


@pytest.mark.parametrize("command", [[], ["build"], ["bench"], ["verify"], ["keys", "generate"], ["targets", "list"], ["push"], ["flash"],
                                     ["broker", "start"], ["fleet", "status"], ["calibrate"],
                                     ["targets", "compare"], ["fleet", "monitor"], ["fleet", "dashboard"], ["fleet", "simulate"],
                                     ["fleet", "autopilot"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli("toolchain", *command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_unknown_target_lists_the_known_ones_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    result = run_cli("toolchain", "build", "--target", "jetsno", "--out", str(out))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: unknown target 'jetsno'; known targets: ")
    for known in ("jetson-orin-nano (jetson", "jetson-agx-orin", "jetson-nano", "raspberry-pi-4", "raspberry-pi-5", "host"):
        assert known in line
    assert not out.exists()


def test_bad_budget_is_refused(tmp_path: Path) -> None:
    result = run_cli("toolchain", "build", "--target", "jetson", "--budget", "huge", "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "--budget must be one of quick, standard, thorough, got 'huge'" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("content", [b"", b"not a protobuf at all \x00\xff" * 10, b"\x08\x07\x12\x03abc"])
def test_corrupt_onnx_model_is_one_clear_line(tmp_path: Path, content: bytes) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(content)
    result = run_cli("toolchain", "bench", str(model), "--target", "host")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: model {model} ") and "re-export it" in line


def test_bench_of_a_folder_says_it_is_one(tmp_path: Path) -> None:
    result = run_cli("toolchain", "bench", str(tmp_path), "--target", "jetson")
    assert result.returncode == 2 and result.stderr.strip() == (f"error: model {tmp_path} is a folder; pass the model file "
                                                                "(.onnx or .tflite) or a .bundle")


def test_missing_bundle_and_missing_key(tmp_path: Path) -> None:
    missing = run_cli("toolchain", "verify", str(tmp_path / "none.bundle"), "--pubkey", str(tmp_path / "k.pub"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_user_profile_file_is_accepted_as_target(tmp_path: Path) -> None:
    from toolchain.targets.profiles import builtin_profile_paths

    text = builtin_profile_paths()["raspberry-pi-5"].read_text().replace('id = "raspberry-pi-5"', 'id = "my-board"')
    (tmp_path / "my-board.toml").write_text(text)
    result = run_cli("toolchain", "targets", "show", str(tmp_path / "my-board.toml"), "--json")
    assert result.returncode == 0 and '"id": "my-board"' in result.stdout


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("toolchain", "--debug", "verify", str(tmp_path / "none.bundle"), "--pubkey", str(tmp_path / "k.pub"))
    assert result.returncode == 2 and "Traceback" in result.stderr and result.stderr.strip().endswith("does not exist; pass --pubkey with the key that signed the bundle")


@pytest.mark.parametrize("out", ["taken", "taken/keys"])
def test_keys_generate_into_a_file_is_one_clear_line(tmp_path: Path, out: str) -> None:
    (tmp_path / "taken").write_text("not a folder")
    result = run_cli("toolchain", "keys", "generate", "--out", str(tmp_path / out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {tmp_path / out}: cannot write the key pair there (") and line.endswith("pass a folder you can write to")


def test_a_key_folder_that_is_a_file_fails_the_bundle_stage_in_one_line(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "taken").write_text("not a folder")
    monkeypatch.setenv("EDGE_TOOLCHAIN_KEYS", str(tmp_path / "taken"))
    ctx = BuildContext(config=None, profile=None, dataset=None, out_dir=tmp_path / "out", work_dir=tmp_path,
                       console=Console(file=io.StringIO()))
    with pytest.raises(ToolchainError, match=f"cannot create the signing key in {tmp_path / 'taken'} \\(File exists\\); set "):
        signing_key_path(ctx)


def test_bench_of_a_model_with_dynamic_sizes_says_how_to_fix_them(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["img"], ["out"])], "dyn",
                              [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3, "h", "w"])])
    model = tmp_path / "dyn.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    result = run_cli("toolchain", "bench", str(model), "--target", "jetson")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == (f"error: model {model}: input 'img' needs fixed sizes after the batch axis, got ['n', 3, 'h', 'w']; export it "
                    "with fixed sizes, or build it (`toolchain build --model FILE --input-shape ...` fixes them) and bench its bundle")


def test_a_model_file_builds_errors_name_the_options_typed_not_a_config(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["img"], ["out"])], "relu",
                              [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])])
    model = tmp_path / "relu.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    np.savez(tmp_path / "named.npz", image=np.ones((20, 4), np.float32))
    result = run_cli("toolchain", "build", "--target", "jetson", "--out", str(tmp_path / "dist"), "--model", str(model),
                     "--data", f"npz:{tmp_path / 'named.npz'}")
    assert result.returncode == 2 and f"(--model {model})" in result.stderr.replace("\n", "")
    assert result.stderr.strip().splitlines()[-1] == (f"error: --data: {tmp_path / 'named.npz'} lacks array 'x' (or 'img', the "
                                                      "model's input); it has ['image']; save it with numpy.savez(path, x=..., y=...)")
    assert not (tmp_path / "dist").exists()


def test_calibrate_to_a_path_it_cannot_write_fails_before_measuring(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    for out, reason in ((tmp_path / "taken" / "pi5.json", f"{tmp_path / 'taken'} is a file, not a folder"), (tmp_path, "it is a folder")):
        # before the fleet database is even opened (it does not exist): the check comes first
        result = run_cli("toolchain", "calibrate", "--target", "rpi5", "--from-fleet", str(tmp_path / "fleet.sqlite"),
                         "--models", str(tmp_path), "--out", str(out))
        assert result.returncode == 2
        assert result.stderr.strip() == f"error: cannot write calibration file {out}: {reason}; pass --out FILE in a folder you can write to"


def test_a_key_that_cannot_sign_fails_the_build_before_training(tmp_path: Path) -> None:
    write_keypair(tmp_path / "keys")
    public = tmp_path / "keys" / "signing.pub"  # the wrong half
    result = run_cli("toolchain", "build", "--target", "jetson", "--out", str(tmp_path / "dist"), "--key", str(public))
    assert result.returncode == 2 and "train" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: signing key {public} is not a readable PEM key")
    assert not (tmp_path / "dist").exists()
    with pytest.raises(ToolchainError, match=f"is a folder; pass the key file in it \\(--key {tmp_path / 'keys' / 'signing.key'}\\)"):
        check_signing_key(tmp_path / "keys")


@pytest.mark.parametrize("command", [["build", "--target", "jetson", "--seed", "-1"],
                                     ["search", "--target", "jetson", "--config", "x.toml", "--storage", "sqlite://", "--seed", str(2**32)],
                                     ["calibrate", "--target", "host", "--seed", "-5"]])
def test_a_seed_numpy_cannot_take_is_a_usage_error_not_a_traceback(command: list[str]) -> None:
    result = run_cli("toolchain", *command)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Invalid value for '--seed'" in result.stderr


@pytest.mark.slow  # a real build up to its training (~5 s)
@pytest.mark.parametrize("stop, line", [(signal.SIGTERM, "stopped by SIGTERM"), (signal.SIGINT, "stopped by Ctrl-C (SIGINT)")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_build_removes_the_work_folder_writes_nothing_and_says_so(
        tmp_path: Path, stop: signal.Signals, line: str) -> None:
    """`timeout`, a cancelled CI job (SIGTERM) or Ctrl-C: the build unwinds (exit 128 + the signal) instead of
    dying with its work folder (every candidate model) left in the temp folder, and its last line says why it
    stopped (Typer's own Ctrl-C exit said nothing). The child gets SIGINT's default back: a test runner started
    in the background inherits it ignored."""
    scratch, out = tmp_path / "tmp", tmp_path / "dist"
    scratch.mkdir()
    child = subprocess.Popen([str(BIN / "toolchain"), "build", "--target", "jetson", "--out", str(out)], cwd=REPO,
                             env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for progress in child.stderr:
            if "train" in progress:  # the work folder exists from here on
                break
        assert list(scratch.glob("toolchain-build-*")), "the build should be running in its work folder"
        child.send_signal(stop)
        assert child.wait(60) == 128 + stop
        rest = child.stderr.read()
    finally:
        child.kill()
    assert rest.strip().splitlines()[-1] == line and "Traceback" not in rest, rest[-500:]
    assert not list(scratch.glob("toolchain-build-*")) and not out.exists()
