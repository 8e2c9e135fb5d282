"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set
here, before any test module imports kernels/. On a CUDA machine the real kernels run instead."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Subprocesses started from the repository root must not import its folders under their bare names (`kernels/`
# would shadow Hugging Face's `kernels`): the project is imported as `fuxi` from the install.
os.environ.setdefault("PYTHONSAFEPATH", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use tiny shapes: one intra-op thread is as fast, and `pytest -n 2` on 2 cores (or a busy machine) does
# not oversubscribe the cores (small ops run ~8x slower when it does).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


class SmallDisk:
    """A tmpfs of a given size mounted at `path`, to fill up: a full disk as a cluster's file system gives one."""

    def __init__(self, path, size: int):
        import subprocess

        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"a full disk is simulated with a tmpfs, and mounting one failed: {result.stderr.strip()}")

    def resize(self, size: int) -> None:
        """Make room (or less): the files stay."""
        import subprocess

        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        import subprocess

        subprocess.run(["umount", "--lazy", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a SmallDisk: a tmpfs of `size` bytes under tmp_path, unmounted however the test ends.
    Needs root (mount); elsewhere the test is skipped, saying why."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs, which only root can mount")
    disks = []

    def make(size: int, name: str = "disk") -> SmallDisk:
        disks.append(SmallDisk(tmp_path / name, size))
        return disks[-1]

    try:
        yield make
    finally:
        for disk in disks:
            disk.unmount()


@pytest.fixture(autouse=True)
def _restore_logging():
    """A test that runs the `fuxi` CLI gets its logging set up (common/logs.py: a stderr handler on the root
    logger at INFO); the next test starts without it, as a library caller would."""
    import logging

    from fuxi.common.logs import HANDLER_NAME
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    root.setLevel(level)
