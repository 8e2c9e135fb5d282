"""`python -m fuxi.launch.torchrun ...`: torchrun (same arguments), made safe for preemption. The launch scripts use it.

On SIGTERM/SIGINT torchrun signals each rank's process group (the rank and its DataLoader workers) and waits up
to `--shutdown-timeout` seconds (default here: $SHUTDOWN_TIMEOUT or 300, torchrun's own default is 30) for the
ranks, which finish their step and write a checkpoint, then kills what is left. Two changes:

- Only the first signal is acted on. torchrun raises from its handler on every signal, so a second one during
  that wait ends the wait and torchrun with it; under Slurm (which signals srun and its tasks, and srun forwards
  the signal again) the step would then be torn down with the ranks in the middle of their checkpoint.
- After a signal it exits with 128 + the signal number, the shell's convention for "terminated by", with one
  line instead of torchrun's traceback; the ranks' own exit codes and output are above it.

And `--max_restarts` works out of the box: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless set (see `main`).
"""
from __future__ import annotations

import os
import signal
import sys

DEFAULT_SHUTDOWN_TIMEOUT = 300


def _act_on_first_signal_only() -> None:
    from torch.distributed.elastic.multiprocessing import api

    raise_signal_exception = getattr(api, "_terminate_process_handler", None)  # what torchrun installs
    if raise_signal_exception is None:  # a torch release that renamed it: plain torchrun behaviour
        print("fuxi.launch.torchrun: torch.distributed.elastic has no _terminate_process_handler; a second signal "
              "may cut the ranks' checkpoint short", file=sys.stderr)
        return

    def first_signal_only(signum, frame):
        names = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
        for name in names.split(","):
            sig = getattr(signal, name.strip(), None)
            if sig is not None:
                signal.signal(sig, signal.SIG_IGN)
        raise_signal_exception(signum, frame)

    api._terminate_process_handler = first_signal_only


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--shutdown-timeout", "--shutdown_timeout") for a in argv):
        argv = ["--shutdown-timeout", os.environ.get("SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT)), *argv]
    _act_on_first_signal_only()
    # torchrun starts each rank as `python -m ...`, which puts the working directory first on sys.path; from a
    # checkout of this project that directory holds folders named `kernels/`, `model/`, ... that would shadow
    # other packages of those names (Hugging Face's `kernels`, which transformers imports). Python >= 3.11 leaves
    # it off with PYTHONSAFEPATH; the ranks import this project as `fuxi` from the install either way.
    os.environ.setdefault("PYTHONSAFEPATH", "1")
    # Restarts (--max_restarts): torchrun shares its rendezvous TCP store with the ranks, and the ranks of a
    # restarted round can read the previous round's keys, so on torch 2.13 with gloo every restart fails with
    # "Gloo connectFullMesh failed ... Connection refused" and none trains. A store of their own per round fixes
    # it (upstream: pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun_main(argv)
    except SignalException as err:
        print(f"torchrun: stopped by {err.sigval.name}; the ranks were given the signal and time to checkpoint "
              f"(see their output above)", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
