"""The one-way layout of README.md: every import of ours goes through the `fuxi` namespace, a lower room never
imports a higher one, and nothing imports experiments/.

Read from the source with `ast` (no package is imported), so the test sees every import, lazy ones included."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# room -> the rooms of ours it may import (README.md, "Layout: data flows one way")
ALLOWED = {
    "common": set(),  # the lowest floor: configs, errors, atomic files and folders, tables
    "data_pipeline": {"common"},
    "kernels": {"common"},
    "model": {"common", "kernels"},
    "checkpoints": {"common", "model", "kernels"},
    "pretrain": {"common", "data_pipeline", "kernels", "model", "checkpoints"},
    "launch": {"common", "data_pipeline", "kernels", "model", "checkpoints", "pretrain"},
    "experiments": {"common", "data_pipeline", "kernels", "model", "checkpoints", "pretrain", "launch"},
}
EXCEPTIONS: set[tuple[str, str]] = set()  # (file, room) pairs of known debt, kept visible: none today


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "fuxi":  # `from fuxi import kernels`
                names.update(f"fuxi.{alias.name}" for alias in node.names)
    return names


def imported_rooms(path: Path) -> set[str]:
    """The rooms of ours a file imports, through the namespace (`fuxi.model.config` -> model)."""
    return {name.split(".")[1] for name in imported_modules(path)
            if name.startswith("fuxi.") and name.split(".")[1] in ALLOWED}


def bare_imports(path: Path) -> set[str]:
    """Imports of a room by its bare folder name (`from kernels import ...`), which another distribution's
    package of that name (Hugging Face's `kernels`) shadows."""
    return {name for name in imported_modules(path) if name.split(".")[0] in ALLOWED}


def python_files() -> list[Path]:
    return sorted(p for folder in [*ALLOWED, "tests"] for p in (REPO / folder).rglob("*.py")
                  if "hf_files" not in p.parts)  # hf_files: remote-code files written into exports


def test_packages_import_only_lower_rooms_and_nothing_imports_experiments():
    violations = []
    for room, allowed in ALLOWED.items():
        for path in sorted((REPO / room).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for dep in imported_rooms(path) - allowed - {room}:
                if (rel, dep) not in EXCEPTIONS:
                    violations.append(f"{rel} imports {dep}")
    assert not violations, violations


def test_every_import_of_ours_goes_through_the_fuxi_namespace():
    violations = [f"{path.relative_to(REPO)}: {sorted(names)}" for path in python_files()
                  if (names := bare_imports(path))]
    assert not violations, violations


def test_the_checker_sees_lazy_dotted_and_bare_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom fuxi.model.moe import lpr_loss\nfrom fuxi import kernels\n\ndef f():\n"
                      "    import fuxi.experiments.moe_lpr\n    from . import sibling\n    import pretrain.trainer\n")
    assert imported_rooms(source) == {"model", "kernels", "experiments"}
    assert bare_imports(source) == {"pretrain.trainer"}
