"""`fuxi pretrain --config <yaml> [--set a.b=value ...]`: run (or resume) a training job.

Exit codes: 0 finished, or stopped by SIGTERM/SIGINT (preemption: after writing a checkpoint of the last step,
or during setup before any step, writing nothing); 2 a config, data or checkpoint error (one line naming the
key, file or shard), or a full disk during a checkpoint save (one line with the space a checkpoint needs; the
partial checkpoint removed, `latest` untouched); 3 the NaN guard stopped the run
(`run.max_consecutive_bad_steps` bad steps in a row, or the schedule ended inside a bad streak that damaged the
weights; `latest` names the last intact checkpoint).
"""
from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/train/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    # The `deepspeed` launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


EXIT_DIVERGED = 3


def run(args: argparse.Namespace) -> int:
    import os

    from fuxi.pretrain.config import load_train_config
    from fuxi.pretrain.trainer import NonFiniteLossError, train

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_train_config(args.config, args.set)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        if rank == 0:
            print(f"fuxi pretrain: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    if rank == 0:
        if not result.preempted:
            state = f"finished at step {result.step}"
        elif result.stopped_in_setup:
            state = f"preempted during setup, before step {result.step + 1}: nothing trained or written"
        elif result.saved_at_exit:
            state = f"preempted, checkpoint written at step {result.step}"
        else:  # the weights may be damaged (a bad step was applied): nothing is saved then
            state = (f"preempted at step {result.step} inside a streak of bad steps that damaged the weights, "
                     "no checkpoint written")
        print(f"fuxi pretrain: {state}; checkpoint {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuxi pretrain")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
