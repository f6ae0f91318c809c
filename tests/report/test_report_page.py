"""The HTML report, opened in headless Chromium with no network: tables, charts and the decision render."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.browser import chromium
from tests.conftest import Build

pytestmark = pytest.mark.slow  # starts Chromium on a real build's report


def test_report_is_self_contained(default_build: Build) -> None:
    html = (default_build.out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script" not in html and "@import" not in html


def test_report_renders_candidates_charts_and_decision(default_build: Build, tmp_path: Path) -> None:
    report = json.loads((default_build.out / "report.json").read_text())
    dom = chromium("--dump-dom", (default_build.out / "report.html").as_uri(), profile=tmp_path / "profile").stdout
    rows = re.findall(r'<tr class="(ship|reject|)">\s*<td>([^<]+)</td>', dom)
    assert [name for _, name in rows[:3]] == [c["name"] for c in report["candidates"]]
    assert [cls for cls, name in rows[:3] if cls == "ship"] == ["ship"]
    assert dict((name, cls) for cls, name in rows[:3])[report["shipped"]["name"]] == "ship"
    for chart in ("chart-metric", "chart-latency", "chart-predicted", "chart-size"):
        assert f'id="{chart}"' in dom
        svg = dom.split(f'id="{chart}"')[1].split("</svg>")[0]
        assert svg.count("<rect") == len(report["candidates"])
    assert f"Shipped <strong>{report['shipped']['name']}</strong>" in dom
    assert 'id="budgets"' in dom and "latency_ms" in dom
    # The gate's rule names its metric and limit; the INT8 calibration trials are listed, the chosen one marked.
    assert re.search(r"Gate: accuracy \(higher is better, task classification\) may drop by at most\s+1 pp", dom)
    trials = report["int8_calibration"]["trials"]
    calibration = dom.split('id="calibration-trials"')[1].split("</table>")[0]
    assert calibration.count("<tr") == len(trials) + 1 and calibration.count('class="ship"') == 1


def test_report_screenshot_is_not_blank(default_build: Build, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1400", (default_build.out / "report.html").as_uri(),
             profile=tmp_path / "profile")
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert image.size == (1200, 1400) and colours is not None and len(colours) > 50


def test_report_predicts_the_shipped_model_on_every_profile(default_build: Build) -> None:
    from toolchain.targets.profiles import builtin_profile_paths

    report = json.loads((default_build.out / "report.json").read_text())
    assert sorted(row["target"] for row in report["targets"]) == sorted(builtin_profile_paths())
    html = (default_build.out / "report.html").read_text()
    svg = html.split('id="chart-targets"')[1].split("</svg>")[0]
    assert svg.count("<rect") == len(report["targets"])
    assert 'id="targets-table"' in html
