"""constraints.txt pins every package setup.py asks for, extras included (the ray extra too, issue #22), at one
exact version: a registry release cannot change what `make install` or `pip install -c constraints.txt -e
".[ray]"` installs."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Built against the user's CUDA (README: GPU users install it themselves).
UNPINNED = {"flash-attn"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _setup_requirements() -> set[str]:
    """Every requirement string in setup.py (install_requires, its Linux additions and every extra)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    requirement = re.compile(r"[A-Za-z0-9_.\-]+(\[[a-z0-9,]+\])?(>=|==|<=|~=|<|>)\d.*")
    return {_name(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and requirement.fullmatch(node.value)}


def test_every_requirement_is_pinned_exactly():
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.]+", version), line
            assert _name(name) not in pins, f"{name} pinned twice"
            pins[_name(name)] = version
    required = _setup_requirements()
    assert {"torch", "datatrove", "ray", "moto", "s3fs", "flask-cors"} <= required
    assert sorted(required - UNPINNED - set(pins)) == []
    assert pins["ray"] == "2.60.0"
