"""One import namespace: the project installs `fuxi` and nothing else at the top level, so packages of other
distributions named like our folders (Hugging Face's `kernels`, which transformers >= 5.25 requires; any
`model` or `launch`) neither shadow ours nor are shadowed by our checkout."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))  # the rooms: model, kernels, ...
FORWARD = """
import torch
from fuxi.model.config import ModelConfig
from fuxi.model.registry import build_model
config = ModelConfig(vocab_size=96, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_heads=4, max_seq_len=16)
model = build_model(config).eval()
ids = torch.randint(0, 96, (2, 8))
out = model(ids, labels=ids)
assert torch.isfinite(out.loss), out.loss
print("forward ok", float(out.loss))
"""


def _foreign_packages(root: Path) -> Path:
    """Packages named like each of our folders that raise when imported: whoever imports a bare name gets one."""
    for name in FOLDERS:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('the foreign package {name!r} was imported')\n")
    return root


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env.update(extra)
    return env


def test_setup_py_installs_every_package_folder_under_fuxi():
    """A new top folder with an __init__.py that setup.py does not map would be importable only by its bare name
    from a checkout, and missing from an install."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    (listed,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "FOLDERS" for t in node.targets)]
    assert sorted(listed) == FOLDERS


def test_foreign_packages_named_like_our_folders_do_not_shadow_ours(tmp_path):
    """Foreign `kernels/`, `model/`, `launch/`, ... first on sys.path (PYTHONPATH comes before site-packages):
    `fuxi info` and a forward pass import only `fuxi.*`."""
    foreign = _foreign_packages(tmp_path / "foreign")
    fuxi = shutil.which("fuxi", path=str(Path(sys.executable).parent)) or shutil.which("fuxi")
    assert fuxi, "the `fuxi` console script is not installed beside this interpreter"
    info = subprocess.run([fuxi, "info", "--config", str(REPO / "configs/model/fuxitranyu-8b.yaml")],
                          cwd=tmp_path, env=_env(PYTHONPATH=str(foreign)), capture_output=True, text=True,
                          timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "8,094,724,096" in info.stdout
    forward = subprocess.run([sys.executable, "-c", FORWARD], cwd=tmp_path, env=_env(PYTHONPATH=str(foreign)),
                             capture_output=True, text=True, timeout=300)
    assert forward.returncode == 0, forward.stderr[-3000:]
    assert "forward ok" in forward.stdout


def test_ranks_started_from_the_checkout_do_not_see_its_folders_as_packages():
    """torchrun starts each rank with `python -m`, which puts the working directory first on sys.path: from the
    repository root, its `kernels/` would shadow Hugging Face's `kernels` inside transformers. Our torchrun leaves
    the working directory off (PYTHONSAFEPATH) even when the caller did not."""
    result = subprocess.run([sys.executable, "-m", "fuxi.launch.torchrun", "--standalone", "--nproc_per_node", "1",
                             "-m", "site"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = result.stdout.split("sys.path = [", 1)[1].split("]", 1)[0]
    entries = [line.strip().strip("',") for line in listed.splitlines() if line.strip()]
    assert entries and str(REPO) not in entries and "" not in entries, entries


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    """A regular install holds `fuxi/<room>/...` and the data files of each room, and nothing else at the top."""
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".whl*", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("fuxi_pretrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fuxi"}, tops
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fuxi"]
    assert "fuxi/__init__.py" not in names  # a namespace: the rooms are its only contents
    for room in FOLDERS:
        assert f"fuxi/{room}/__init__.py" in names, room
    for data in ("fuxi/checkpoints/hf_files/modeling_fuxitranyu.py", "fuxi/data_pipeline/corpus/README.md",
                 "fuxi/pretrain/evaluation/tasks/README.md"):
        assert data in names, data
