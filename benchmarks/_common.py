"""Shared by every benchmark: machine description, table printing, and the results contract of DESIGN.md.

`benchmarks/results/NAME.json` = {"machine": {...}, "rows": [...], "targets": {goal: {value, target, met}}}.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    versions = {}
    for name in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions}


def target(value: float, op: str, bound: float) -> dict[str, Any]:
    met = value <= bound if op == "<=" else value >= bound
    return {"value": round(value, 5), "target": f"{op} {bound}", "met": bool(met)}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(name: str, rows: list[dict[str, Any]], targets: dict[str, dict[str, Any]], **extra: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), "rows": rows, "targets": targets, **extra}, indent=2) + "\n")
    os.replace(tmp, path)
    print()
    for goal, result in targets.items():
        print(f"{'MET ' if result['met'] else 'MISS'}  {goal}: {result['value']} (target {result['target']})")
    print(f"\nwrote {path}")
    return path


def require_trained(model: str, accuracy: float, classes: int, factor: float = 3.0) -> None:
    """Stop before reporting accuracy drops of a model that did not learn: a drop measured at chance says nothing.

    "Well above chance" is `factor` times the chance accuracy of `classes` balanced classes."""
    floor = factor / classes
    if accuracy < floor:
        raise SystemExit(f"{model}: FP32 test accuracy {accuracy:.3f} is not well above chance ({1 / classes:.3f}; "
                         f"needs >= {floor:.3f}): train it longer before its accuracy drops mean anything")
