"""The `slurm` tier: a real one-node Slurm on this machine (tests/cluster/start_slurm.sh starts it), to which
the tests submit the project's own scripts. Run with `make test-cluster`; `make test` leaves it out."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

START = Path(__file__).with_name("start_slurm.sh")
SKIPPED = 77  # start_slurm.sh: not root, or no apt-get to install Slurm with


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or find) the cluster; skip the tier, saying why, where it cannot run."""
    result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    if result.returncode == SKIPPED:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    if result.returncode != 0:
        raise RuntimeError(f"{START} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stderr.strip()
