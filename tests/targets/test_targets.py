"""Device profiles: shipped boards, user files, validation messages, the measured host, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

from toolchain.targets import hostprobe
from toolchain.commands.targets import app as targets_app
from toolchain.errors import TargetError, ToolchainError
from toolchain.targets.profiles import (
    TARGETS_DIR,
    builtin_profile_paths,
    list_profiles,
    load_profile_file,
    profile_from_dict,
    resolve_target,
)

pytestmark = pytest.mark.usefixtures("narrow_terminal")  # the CLI tests prove nothing is cut at 60 columns

REQUIRED_IDS = {"jetson-orin-nano", "jetson-agx-orin", "jetson-nano", "raspberry-pi-4", "raspberry-pi-5", "host"}

BOARD_FILES = sorted(p for p in TARGETS_DIR.glob("*.toml") if p.name != "host.toml")

USER_PROFILE = """\
id = "my-board"
name = "My board"
aliases = ["mine"]

[cpu]
arch = "aarch64"
cores = 4
freq_ghz = 1.8
isa = ["neon", "dotprod"]

[memory]
ram_mb = 2048
bandwidth_gbs = 10.0

[compute]
fp32_gflops = 50.0
fp16_gflops = 100.0
int8_gops = 200
op_overhead_us = 3.0

[runtime]
formats = ["tflite", "onnx"]
providers = ["CPUExecutionProvider"]
precisions = ["int8", "fp32"]

[budget]
latency_ms = 40
model_mb = 10.0
ram_mb = 256.0
"""


@pytest.fixture(scope="module", autouse=True)
def host_values(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Measure this host once for the whole module, into a private cache (never the user's)."""
    patch = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("edge-toolchain-cache")
    patch.setenv("EDGE_TOOLCHAIN_CACHE", str(cache))
    try:
        yield hostprobe.measured_host_values()
    finally:
        patch.undo()


def _write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shipped profiles


def test_required_profiles_are_shipped() -> None:
    assert REQUIRED_IDS <= set(builtin_profile_paths())


@pytest.mark.parametrize("path", BOARD_FILES, ids=lambda p: p.stem)
def test_board_profile_loads_and_cites_sources(path: Path) -> None:
    profile = load_profile_file(path)
    assert profile.id == path.stem
    assert profile.path == path
    assert profile.cpu_cores > 0 and profile.cpu_freq_ghz > 0 and profile.ram_mb > 0
    assert profile.bandwidth_gbs > 0 and profile.op_overhead_us > 0
    assert profile.precisions[-1] == "fp32"
    assert profile.budget.latency_ms > 0 and profile.budget.model_mb > 0 and profile.budget.ram_mb > 0
    # Accelerator or not, the runtime unit is never slower than the CPU at any precision.
    for precision in ("fp32", "fp16", "int8"):
        assert profile.compute.peak_ops_per_s(precision) >= profile.cpu_compute.peak_ops_per_s(precision)
    assert "Source" in path.read_text(), "data-sheet values need their source in a comment"


def test_board_specifics() -> None:
    nano = resolve_target("jetson-nano")
    assert "int8" not in nano.precisions  # Maxwell: no INT8 acceleration
    assert nano.providers[0] == "TensorrtExecutionProvider"
    pi4 = resolve_target("raspberry-pi-4")
    assert "fp16" not in pi4.precisions  # Cortex-A72: no FP16 arithmetic
    assert pi4.formats[0] == "tflite" and resolve_target("pi5").formats[0] == "tflite"
    orin = resolve_target("jetson-orin-nano")
    assert orin.compute.int8_gops > orin.compute.fp16_gflops > orin.compute.fp32_gflops


def test_aliases_are_unique_and_never_shadow_an_id() -> None:
    ids = set(builtin_profile_paths())
    seen: list[str] = []
    for profile in list_profiles():
        seen.extend(profile.aliases)
    assert len(seen) == len(set(seen))
    assert not ids & set(seen)


@pytest.mark.parametrize(
    ("alias", "profile_id"),
    [("jetson", "jetson-orin-nano"), ("orin-nano", "jetson-orin-nano"), ("agx-orin", "jetson-agx-orin"),
     ("jetson-nano-4gb", "jetson-nano"), ("rpi4", "raspberry-pi-4"), ("pi5", "raspberry-pi-5"),
     ("local", "host"), ("x86-64", "host"), ("jetson-nano", "jetson-nano")],
)
def test_alias_resolves(alias: str, profile_id: str) -> None:
    assert resolve_target(alias).id == profile_id


def test_unknown_target_lists_known_ids() -> None:
    with pytest.raises(TargetError) as info:
        resolve_target("jetson-tx9")
    message = str(info.value)
    assert "jetson-tx9" in message
    for profile_id in REQUIRED_IDS:
        assert profile_id in message
    assert isinstance(info.value, ToolchainError)


# ----------------------------------------------------------------------------- user profiles


def test_user_profile_file_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_PROFILE)
    profile = resolve_target(str(path))
    assert profile.id == "my-board" and profile.path == path
    assert profile.compute.int8_gops == 200.0 and profile.cpu_compute == profile.compute
    assert profile.budget.latency_ms == 40.0
    assert profile.to_dict()["compute"]["op_overhead_us"] == 3.0


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="does not exist"):
        resolve_target(str(tmp_path / "nope.toml"))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="not valid TOML"):
        resolve_target(str(_write(tmp_path, "id = [unclosed")))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("cores = 4\n", "", "cores"),
        ("cores = 4\n", 'cores = "four"\n', "cores"),
        ("freq_ghz = 1.8\n", "freq_ghz = true\n", "freq_ghz"),
        ("bandwidth_gbs = 10.0\n", "", "bandwidth_gbs"),
        ("int8_gops = 200\n", "int8_gops = -1\n", "int8_gops"),
        ("op_overhead_us = 3.0\n", 'op_overhead_us = "fast"\n', "op_overhead_us"),
        ('precisions = ["int8", "fp32"]\n', 'precisions = ["int4"]\n', "precisions"),
        ('formats = ["tflite", "onnx"]\n', "formats = []\n", "formats"),
        ("latency_ms = 40\n", "", "latency_ms"),
        ('id = "my-board"\n', "", "id"),
        ('isa = ["neon", "dotprod"]\n', "isa = [1]\n", "isa"),
        ('aliases = ["mine"]\n', 'aliases = "mine"\n', "aliases"),
        ("ram_mb = 2048\n", "ram_mb = 2048.5\n", "ram_mb"),
        ("ram_mb = 2048\n", "ram_mb = -5\n", "ram_mb"),  # sizes, speeds and budgets must be > 0
        ("cores = 4\n", "cores = 0\n", "cores"),
        ("bandwidth_gbs = 10.0\n", "bandwidth_gbs = 0\n", "bandwidth_gbs"),
        ("latency_ms = 40\n", "latency_ms = -1\n", "latency_ms"),
        ("latency_ms = 40\n", "latency_ms = 40\nlatncy_ms = 5\n", "latncy_ms"),  # a typo is an unknown key, not ignored
        ("op_overhead_us = 3.0\n", "op_overhead_us = 3.0\nop_overhead = 1.0\n", "op_overhead"),
        ('id = "my-board"\n', 'id = "my-board"\nunit = "npu"\n', "unit"),
        ('id = "my-board"\n', 'id = "my board/x"\n', "id"),  # it names the bundle file
    ],
)
def test_bad_profile_names_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in USER_PROFILE
    path = _write(tmp_path, USER_PROFILE.replace(old, new, 1))
    with pytest.raises(TargetError) as info:
        resolve_target(str(path))
    assert f"'{key}'" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_section_is_named() -> None:
    with pytest.raises(TargetError, match=r"\[memory\]"):
        profile_from_dict({"id": "x", "aliases": [], "cpu": {}}, "inline")


# ----------------------------------------------------------------------------- measured host


def test_host_values_are_positive_and_shaped(host_values: dict[str, Any]) -> None:
    cpu, memory, compute = host_values["cpu"], host_values["memory"], host_values["compute"]
    assert isinstance(cpu["arch"], str) and cpu["arch"]
    assert isinstance(cpu["cores"], int) and cpu["cores"] >= 1
    assert cpu["freq_ghz"] > 0
    assert all(isinstance(flag, str) for flag in cpu["isa"])
    assert isinstance(memory["ram_mb"], int) and memory["ram_mb"] > 0
    assert memory["bandwidth_gbs"] > 0
    for table in (compute, compute["cpu"]):
        assert table["fp32_gflops"] > 0 and table["fp16_gflops"] > 0 and table["int8_gops"] > 0
    assert compute["op_overhead_us"] > 0
    assert set(host_values) == {"cpu", "memory", "compute"}  # cache bookkeeping stays in the file


def test_host_profile_uses_measured_values(host_values: dict[str, Any]) -> None:
    profile = resolve_target("host")
    assert profile.raw["measured"] is True
    assert profile.cpu_cores == host_values["cpu"]["cores"]
    assert profile.compute.fp32_gflops == host_values["compute"]["fp32_gflops"]
    assert profile.cpu_compute.int8_gops == host_values["compute"]["cpu"]["int8_gops"]
    assert profile.op_overhead_us == host_values["compute"]["op_overhead_us"]
    assert profile.providers == ("CPUExecutionProvider",)


def test_host_cache_file(host_values: dict[str, Any]) -> None:
    path = hostprobe.cache_path()
    record = json.loads(path.read_text())
    assert record["values"] == host_values
    assert record["fingerprint"] == hostprobe.fingerprint()
    assert record["measured_at"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the module's cache, so faking a re-measure cannot spoil the real numbers."""
    shutil.copy(hostprobe.cache_path(), tmp_path / hostprobe.CACHE_FILE_NAME)
    monkeypatch.setenv("EDGE_TOOLCHAIN_CACHE", str(tmp_path))
    return tmp_path / hostprobe.CACHE_FILE_NAME


def _fake_measure(calls: list[int], values: dict[str, Any]) -> Any:
    def measure() -> dict[str, Any]:
        calls.append(1)
        fake = json.loads(json.dumps(values))
        fake["compute"]["fp32_gflops"] = 12345.0
        return fake

    return measure


def test_second_call_reads_the_cache(private_cache: Path, host_values: dict[str, Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(hostprobe, "measure", _fake_measure(calls, host_values))
    assert hostprobe.measured_host_values() == host_values
    assert calls == []


def test_changed_fingerprint_measures_again(private_cache: Path, host_values: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(hostprobe, "measure", _fake_measure(calls, host_values))
    changed = {**hostprobe.fingerprint(), "onnxruntime": "0.0.0-other"}
    monkeypatch.setattr(hostprobe, "fingerprint", lambda: changed)
    assert hostprobe.measured_host_values()["compute"]["fp32_gflops"] == 12345.0
    assert calls == [1]
    record = json.loads(private_cache.read_text())
    assert record["fingerprint"] == changed
    assert hostprobe.measured_host_values()["compute"]["fp32_gflops"] == 12345.0
    assert calls == [1]  # the new numbers are cached under the new fingerprint


@pytest.mark.parametrize("content", ["{not json", '{"fingerprint": {}, "values": {}}', "[]"])
def test_broken_cache_measures_again(private_cache: Path, host_values: dict[str, Any],
                                     monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    calls: list[int] = []
    monkeypatch.setattr(hostprobe, "measure", _fake_measure(calls, host_values))
    private_cache.write_text(content)
    assert hostprobe.measured_host_values()["compute"]["fp32_gflops"] == 12345.0
    assert calls == [1]


def test_cache_location_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_TOOLCHAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hostprobe.cache_path() == tmp_path / "edge-toolchain" / "host-profile.json"


# ----------------------------------------------------------------------------- CLI


def test_cli_list_json() -> None:
    result = CliRunner().invoke(targets_app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    ids = {entry["id"] for entry in json.loads(result.stdout)}
    assert ids == set(builtin_profile_paths())
    assert REQUIRED_IDS <= ids


def test_cli_list_table_keeps_every_id_and_alias_whole() -> None:
    result = CliRunner().invoke(targets_app, ["list"])
    assert result.exit_code == 0, result.output
    assert REQUIRED_IDS <= set(builtin_profile_paths())
    words = set(result.output.replace(",", " ").replace("(", " ").replace(")", " ").split())
    for profile in list_profiles():
        assert {profile.id, *profile.aliases} <= words, profile.id


def test_cli_show_alias_json() -> None:
    result = CliRunner().invoke(targets_app, ["show", "jetson", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["id"] == "jetson-orin-nano"
    assert data["path"].endswith("jetson-orin-nano.toml")
    assert data == resolve_target("jetson").to_dict()


def test_cli_show_table_and_user_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(targets_app, ["show", "rpi5"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("raspberry-pi-5  Raspberry Pi 5")
    assert f"source: {builtin_profile_paths()['raspberry-pi-5']}\n" in result.output
    path = _write(tmp_path, USER_PROFILE)
    result = CliRunner().invoke(targets_app, ["show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "my-board"


def test_cli_show_prints_a_long_path_whole(tmp_path: Path) -> None:
    """Wherever the file lives, its path is printed verbatim on one line, to be copied (never cut to the table)."""
    folder = tmp_path.joinpath(*(f"a-deeply-nested-folder-with-a-long-name-{i}" for i in range(6)))
    folder.mkdir(parents=True)
    path = _write(folder, USER_PROFILE, "my-board-profile-with-a-rather-long-file-name.toml")
    assert len(str(path)) > 300
    result = CliRunner().invoke(targets_app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert f"\nsource: {path}\n" in result.output
    assert "my-board" in result.output and "tflite, onnx" in result.output


def test_cli_show_unknown_raises_target_error() -> None:
    result = CliRunner().invoke(targets_app, ["show", "no-such-board"])
    assert isinstance(result.exception, TargetError)  # the main CLI turns it into one line
    assert "jetson-orin-nano" in str(result.exception)
