"""The layers stay layered: the import directions ARCHITECTURE.md states, checked on every import
statement of the source (function-level ones too), plus the size limit on pipeline modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the dotted package it installs as (pyproject's package-dir)
PACKAGES = {"codec": "facetier.codec", "io": "facetier.io", "pipelines": "facetier.pipelines", "facetier": "facetier"}

# (modules under this package, must not import anything under these)
FORBIDDEN = [
    ("facetier.codec", ("facetier.io", "facetier.pipelines", "facetier.cli")),
    ("facetier.io", ("facetier.pipelines", "facetier.cli")),
    ("facetier.pipelines.jobs", ("facetier.pipelines.training", "facetier.pipelines.evaluation", "facetier.cli")),
    ("facetier.pipelines.training", ("facetier.pipelines.evaluation", "facetier.cli")),
    ("facetier.pipelines.evaluation", ("facetier.cli",)),
]
MAX_PIPELINE_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for folder, dotted in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([dotted, *parts])] = path
    return out


def imported_modules(module: str, path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``module``'s package."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from facetier.pipelines import training`
    return found


def _violations(modules: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in modules.items():
        imports = imported_modules(module, path)
        for owner, banned in FORBIDDEN:
            if module != owner and not module.startswith(owner + "."):
                continue
            for imp in sorted(imports):
                if any(imp == b or imp.startswith(b + ".") for b in banned):
                    bad.append(f"{module} imports {imp}")
    return bad


def test_import_directions():
    modules = _modules()
    assert "facetier.pipelines.jobs.encode" in modules and "facetier.codec.model" in modules
    assert _violations(modules) == []


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """A forbidden import, written the ways code writes it (lazy, relative, from-package), is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..training import prior\n")
    assert "facetier.pipelines.training.prior" in imported_modules("facetier.pipelines.jobs.bad", bad)
    assert _violations({"facetier.pipelines.jobs.bad": bad}) != []
    bad.write_text("from facetier.pipelines import evaluation\n")
    assert _violations({"facetier.pipelines.jobs.bad": bad}) != []
    bad.write_text("import facetier.io.table\n")
    assert _violations({"facetier.codec.bad": bad}) != []
    bad.write_text("from facetier.codec import model\n")
    assert _violations({"facetier.io.bad": bad}) == []


@pytest.mark.parametrize("part", ["jobs", "training", "evaluation"])
def test_pipeline_modules_stay_small(part):
    for path in sorted((ROOT / "pipelines" / part).glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_PIPELINE_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by job"


def test_pipelines_holds_only_the_three_parts():
    entries = {p.name for p in (ROOT / "pipelines").iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", "jobs", "training", "evaluation"}
