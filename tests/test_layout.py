"""The house's floors: a stage imports shared services only, never another stage or what sits
above the stages (the CLI, the study, the demo)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
ABOVE = ("pipeline.cli", "pipeline.study", "pipeline.demo", "pipeline.__main__")


def imported(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_stage_imports_another_stage_or_a_floor_above():
    stage_modules = {module for module, _, _ in STAGES.values()}
    for module in stage_modules:
        path = ROOT / (module.replace(".", "/") + ".py")
        wrong = sorted(name for name in imported(path)
                       if (name in stage_modules and name != module) or name.startswith(ABOVE))
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}: move what it needs into a shared service"


def test_shared_services_import_no_stage():
    """Below the stages nothing reaches up: inference/, distill/ and the service modules."""
    services = [p for p in (ROOT / "pipeline").rglob("*.py")
                if p.parent.name in ("pipeline", "inference", "distill") and p.name not in ("cli.py", "__main__.py")]
    assert len(services) > 8
    for path in services:
        wrong = sorted(n for n in imported(path) if n.startswith(("pipeline.stages.", *ABOVE)))
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_the_check_sees_a_stage_import(tmp_path):
    """The reader above finds imports wherever they are (a check that cannot fail proves nothing)."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from pipeline.stages.generate import generate\n")
    assert "pipeline.stages.generate" in imported(source)


@pytest.mark.slow  # a process (ruff), though a quick one
def test_ruff_passes_on_the_source_tree():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
