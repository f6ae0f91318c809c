"""The architecture holds: import-linter's contracts (pyproject.toml), no import cycles, no pass
importing another pass, and a top level of `toolchain/` that stays a handful of modules."""

from __future__ import annotations

import importlib.util
import subprocess

import grimp

from tests.conftest import BIN, REPO

SCRIPT = REPO / "scripts" / "import_graph.py"


def load_script():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lint_imports_keeps_every_contract() -> None:
    result = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
    for contract in ("runtime_agent never imports", "Host layers point down", "A pass never imports another pass",
                     "No import cycles"):
        assert contract in result.stdout


def test_the_import_graph_has_no_cycles_and_no_pass_to_pass_imports() -> None:
    result = subprocess.run([str(BIN / "python"), str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert "import cycles: 0" in result.stdout and "pass-to-pass imports: 0" in result.stdout


def test_the_graph_script_finds_a_cycle_and_a_pass_importing_a_pass() -> None:
    script = load_script()
    graph = grimp.ImportGraph()
    for importer, imported in [("toolchain.a", "toolchain.b"), ("toolchain.b", "toolchain.c"), ("toolchain.c", "toolchain.a"),
                               ("toolchain.c", "toolchain.d"),
                               ("toolchain.passes.onnx.quantize_mixed", "toolchain.passes.onnx.quantize_int8")]:
        graph.add_import(importer=importer, imported=imported)
    assert script.module_cycles(graph, set(graph.modules)) == [["toolchain.a", "toolchain.b", "toolchain.c"]]
    assert script.pass_to_pass_imports(graph) == [("toolchain.passes.onnx.quantize_mixed", "toolchain.passes.onnx.quantize_int8")]


def test_the_top_level_of_toolchain_is_a_handful_of_modules() -> None:
    top = sorted(p.name for p in (REPO / "toolchain").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "errors.py", "resources.py"]  # __main__: python -m toolchain (torchrun)
    packages = sorted(p.name for p in (REPO / "toolchain").iterdir() if (p / "__init__.py").is_file())
    for package in packages:  # each package says what it owns
        doc = (REPO / "toolchain" / package / "__init__.py").read_text().strip()
        assert doc.startswith('"""') and len(doc) > 80, package


def test_every_package_data_link_points_at_a_tracked_top_level_file() -> None:
    for name in ("targets", "examples", "requirements.lock"):
        link = REPO / "toolchain" / "packaged" / name
        assert link.is_symlink() and link.resolve() == (REPO / name).resolve()
    assert sorted(p.name for p in (REPO / "toolchain" / "packaged" / "targets").glob("*.toml")) == \
        sorted(p.name for p in (REPO / "targets").glob("*.toml"))
