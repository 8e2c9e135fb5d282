"""The one-way layout of README.md: a lower room never imports a higher one, and nothing imports experiments/.

Read from the source with `ast` (no package is imported), so the test sees every import, lazy ones included."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package -> the packages of ours it may import (README.md, "Layout: data flows one way")
ALLOWED = {
    "data_pipeline": set(),
    "kernels": set(),
    "model": {"kernels"},
    "checkpoints": {"data_pipeline", "model", "kernels"},  # data_pipeline.staging: one folder-switch mechanism
    "pretrain": {"data_pipeline", "kernels", "model", "checkpoints"},
    "launch": {"data_pipeline", "kernels", "model", "checkpoints", "pretrain"},
    "experiments": {"data_pipeline", "kernels", "model", "checkpoints", "pretrain", "launch"},
}
EXCEPTIONS: set[tuple[str, str]] = set()  # (file, package) pairs of known debt, kept visible: none today


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names} & set(ALLOWED)


def test_packages_import_only_lower_rooms_and_nothing_imports_experiments():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for dep in imported_packages(path) - allowed - {package}:
                if (rel, dep) not in EXCEPTIONS:
                    violations.append(f"{rel} imports {dep}")
    assert not violations, violations


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom model.moe import lpr_loss\n\ndef f():\n    import experiments.moe_lpr\n"
                      "    from . import sibling\n")
    assert imported_packages(source) == {"model", "experiments"}
