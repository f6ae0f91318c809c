"""`toolchain targets compare`, the report's every-profile chart, and `toolchain bench` with a calibration."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import run_cli
from toolchain.perf.calibrate_host import CalibrationSettings, calibrate_host
from toolchain.perf.calibration import default_path, write_calibration
from toolchain.perf.compare import compare_targets
from toolchain.report.html import targets_section
from toolchain.targets.profiles import builtin_profile_paths, list_profiles, resolve_target
from toolchain.perf.variants import VariantSpec, write_variant

SHIPPED = sorted(builtin_profile_paths())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_variant(VariantSpec("cnn", 32, 2, 3, 24, "int8"), tmp_path_factory.mktemp("compare"))


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough (~9 MB fp32) that boards with small flash budgets do not fit it."""
    return write_variant(VariantSpec("mlp", 1024, 3, 1, 256, "fp32"), tmp_path_factory.mktemp("compare-heavy"))


def test_compare_prints_one_row_per_target_in_order(model: Path) -> None:
    result = run_cli("toolchain", "targets", "compare", str(model), "--targets", "pi5,jetson,pi4,rpi5", check=True)
    body = [line for line in result.stdout.splitlines() if re.match(r"\s+(raspberry|jetson|host)", line)]
    assert [line.split()[0] for line in body] == ["raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4"]
    assert all("≤" in line or ">" in line for line in body)


def test_compare_json_has_predictions_and_budget_verdicts(heavy_model: Path) -> None:
    result = run_cli("toolchain", "targets", "compare", str(heavy_model), "--json", check=True)
    data = json.loads(result.stdout)
    rows = {row["target"]: row for row in data["targets"]}
    assert sorted(rows) == SHIPPED  # default: every shipped profile
    for profile in list_profiles():
        row = rows[profile.id]
        assert row["latency_ms"] > 0 and row["memory_mb"] > 0 and row["prediction"] in ("calibrated", "roofline")
        assert set(row["budget"]) == {"latency_ms", "model_mb", "ram_mb"}
        assert row["budget"]["model_mb"]["budget"] == profile.budget.model_mb
        assert row["fits"] == all(v["met"] for v in row["budget"].values())
    # 9 MB of weights fit the Pi 4's 25 MB flash budget; a faster board is predicted faster
    assert rows["raspberry-pi-4"]["budget"]["model_mb"]["met"]
    assert rows["jetson-agx-orin"]["latency_ms"] < rows["raspberry-pi-4"]["latency_ms"]


@pytest.mark.parametrize("targets, message", [
    ("pi5,nope", "unknown target 'nope'; known targets: "),
    ("pi5,,host", "--targets must be a comma-separated list of profiles"),
    ("missing/board.toml", "profile file missing/board.toml does not exist"),
])
def test_compare_bad_targets_are_one_clear_line(model: Path, targets: str, message: str) -> None:
    result = run_cli("toolchain", "targets", "compare", str(model), "--targets", targets)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_compare_bad_model_is_one_clear_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    for path, message in ((tmp_path / "absent.onnx", "does not exist"), (broken, "is not a valid ONNX model")):
        result = run_cli("toolchain", "targets", "compare", str(path), "--targets", "pi5")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0]


def test_every_profile_chart_has_a_bar_per_profile(heavy_model: Path) -> None:
    rows = compare_targets(heavy_model, list_profiles())
    html = targets_section(rows)
    svg = ET.fromstring(html[html.index("<svg"):html.index("</svg>") + 6])
    ns = {"s": "http://www.w3.org/2000/svg"}
    bars = svg.findall("s:rect", ns)
    assert len(bars) == len(SHIPPED)
    titles = [bar.find("s:title", ns).text for bar in bars]
    for row, bar, title in zip(rows, bars, titles):
        assert title.startswith(f"{row['target']}: {row['latency_ms']:.4g} ms")
        assert bar.get("class") == ("fits" if row["fits"] else "misses")
    widths = {row["target"]: float(bar.get("width")) for row, bar in zip(rows, bars)}
    slowest = max(rows, key=lambda r: r["latency_ms"])["target"]
    assert widths[slowest] == max(widths.values())
    assert 'id="targets-table"' in html and html.count("<tr") == len(SHIPPED) + 1
    assert targets_section(None) == ""


def test_a_board_that_cannot_run_the_model_says_why_in_the_report(model: Path) -> None:
    rows = {row["target"]: row for row in compare_targets(model, list_profiles())}
    nano = rows["jetson-nano"]  # an INT8 model; the Maxwell GPU has no INT8 path
    assert all(v["met"] for v in nano["budget"].values()) and not nano["fits"]
    assert nano["not_supported"] == ["does not list precision int8 in its runtime"]
    assert rows["raspberry-pi-5"]["not_supported"] == [] and rows["stm32h7"]["not_supported"] == []  # ONNX: a build translates it
    assert "<td>no; does not list precision int8 in its runtime</td>" in targets_section(list(rows.values()))


@pytest.mark.slow  # three benches and a calibration, each measuring for seconds
def test_bench_shows_measured_next_to_calibrated_prediction(model: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TOOLCHAIN_CALIBRATION", str(tmp_path / "calibration"))
    before = json.loads(run_cli("toolchain", "bench", str(model), "--target", "host", "--seconds", "0.5", "--json",
                                check=True).stdout)
    assert before["prediction"] == "roofline" and before["latency_ms_predicted"] == before["latency_ms_predicted_roofline"]
    settings = CalibrationSettings(variants=18, seconds=1.0, memory_variants=4, seed=1)
    write_calibration(calibrate_host(resolve_target("host"), settings).calibration, default_path("host"))
    after = json.loads(run_cli("toolchain", "bench", str(model), "--target", "host", "--seconds", "0.5", "--json",
                               check=True).stdout)
    assert after["prediction"] == "calibrated" and after["memory_basis"] == "process"
    assert after["latency_ms_predicted"] != after["latency_ms_predicted_roofline"]
    assert after["prediction_error_host"] == pytest.approx(after["latency_ms_predicted_host"] / after["latency_ms_p50_host"] - 1,
                                                           abs=1e-3)
    assert 0 < after["roofline_fraction_host"]
    assert set(after["budget"]) == {"latency_ms", "model_mb", "ram_mb"}
    assert after["budget"]["ram_mb"]["value"] == pytest.approx(after["peak_memory_mb_predicted"], abs=1e-3)
    table = run_cli("toolchain", "bench", str(model), "--target", "pi5", "--seconds", "0.5", check=True).stdout
    assert "calibrated" in table and "budget flash" in table and "budget RAM" in table
