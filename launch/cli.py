"""`fuxi`: one command, a subcommand per job. Each is a thin layer over a library function."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import get_args

# `fuxi bench <name>` -> the module holding add_arguments(parser) and run(args) -> dict.
BENCHMARKS = {
    "kernels": "fuxi.kernels.bench",
    "data": "fuxi.data_pipeline.bench",
    "train": "fuxi.pretrain.bench",
    "ghostrnn": "fuxi.model.ghost_gru_bench",
    "moe": "fuxi.model.moe_bench",
}


def parse_size(text: str) -> int:
    """'5GB', '200MB', '100KB' or a plain byte count."""
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def cmd_info(args) -> int:
    from fuxi.common.errors import InputError
    from fuxi.model import load_model_config
    from fuxi.pretrain.estimates import format_report, model_report

    if (args.config is None) == (args.config_file is None):
        raise InputError("fuxi info: give the model YAML once, as CONFIG or --config")
    config = load_model_config(args.config or args.config_file, args.set)
    report = model_report(config, world_size=args.world_size, seq_len=args.seq_len, micro_batch=args.micro_batch)
    print(format_report(report))
    print(json.dumps(report.to_dict()))
    return 0


def cmd_convert_to_hf(args) -> int:
    import tempfile

    from fuxi.checkpoints import export_to_hf
    from fuxi.checkpoints.deepspeed_checkpoint import consolidate_deepspeed_checkpoint, is_deepspeed_checkpoint
    from fuxi.common.diskspace import is_disk_full
    from fuxi.common.errors import DiskFullError

    shard_bytes = parse_size(args.shard_size)
    existed = Path(args.out).exists()
    try:
        if is_deepspeed_checkpoint(args.checkpoint):  # a training checkpoint: gather the ZeRO partitions first
            with tempfile.TemporaryDirectory(dir=Path(args.out).absolute().parent) as tmp:
                plain = consolidate_deepspeed_checkpoint(args.checkpoint, Path(tmp) / "plain", shard_bytes)
                out = export_to_hf(plain, args.out, dtype=args.dtype, max_shard_bytes=shard_bytes,
                                   tokenizer_dir=args.tokenizer, layout=args.format)
        else:
            out = export_to_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_bytes=shard_bytes,
                               tokenizer_dir=args.tokenizer, layout=args.format)
    except Exception as err:
        if is_disk_full(err):  # the export and the temp folder were removed as the error left their blocks
            raise DiskFullError(export_disk_full_message(args, existed)) from None
        raise
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def export_disk_full_message(args, existed: bool) -> str:
    """`convert to-hf` on a full disk, in one line: the space the export needs (its weights in the export dtype,
    the tokenizer) and, for a training checkpoint, the consolidated copy written beside it meanwhile."""
    import torch

    from fuxi.checkpoints.deepspeed_checkpoint import MODEL_CONFIG_FILE, is_deepspeed_checkpoint, resolve_tag_dir
    from fuxi.checkpoints.model_checkpoint import own_tokenizer, read_model_config
    from fuxi.common.diskspace import DISK_FULL, free_bytes, size_text, tree_bytes
    from fuxi.model import build_model

    deepspeed = is_deepspeed_checkpoint(args.checkpoint)
    source = resolve_tag_dir(args.checkpoint) if deepspeed else Path(args.checkpoint)
    config = read_model_config(source / MODEL_CONFIG_FILE if deepspeed else source)
    params = build_model(config, device="meta").num_parameters()
    tokenizer = args.tokenizer or own_tokenizer(source)
    export = params * getattr(torch, args.dtype).itemsize + tree_bytes(tokenizer)
    needs = f"the export needs about {size_text(export)} ({params:,} parameters in {args.dtype}" + \
            (" and the tokenizer)" if tokenizer else ")")
    if deepspeed:  # consolidated in float32, with the checkpoint's own tokenizer
        plain = params * 4 + tree_bytes(own_tokenizer(source))
        needs += (f", and the training checkpoint is first consolidated beside it, about {size_text(plain)} more "
                  f"until the export is written")
    out = Path(args.out)
    return (f"convert to-hf {out}: {DISK_FULL}, {size_text(free_bytes(out))} free; {needs}; {out} "
            f"{'is as it was' if existed else 'was not created'} and nothing partial was left")


def cmd_convert_from_hf(args) -> int:
    from fuxi.checkpoints import import_from_hf

    out = import_from_hf(args.hf, args.out, max_shard_bytes=parse_size(args.shard_size))
    print(f"wrote fuxi checkpoint to {out}")
    return 0


def cmd_upcycle(args) -> int:
    from fuxi.checkpoints.upcycle_checkpoint import upcycle_checkpoint
    from fuxi.model.config import MoEConfig

    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, layers=args.layers,
                    top1_code_compat=args.top1_code_compat, original_languages=args.original_languages)
    out = upcycle_checkpoint(args.checkpoint, args.out, moe, seed=args.seed,
                             max_shard_bytes=parse_size(args.shard_size))
    print(f"wrote {moe.num_experts}-expert top-{moe.top_k} MoE checkpoint to {out}")
    return 0


def cmd_eval(args) -> int:
    import logging

    from fuxi.pretrain.evaluation.benchmarks import describe_tasks
    from fuxi.pretrain.evaluation.errors import EvalError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.list_tasks:
        print(describe_tasks())
        return 0
    if not args.checkpoint and not args.run:
        raise SystemExit("fuxi eval: error: one of --checkpoint, --run or --list-tasks is required")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("lm-evaluation-harness is not installed: pip install -e .[eval]") from None
    from fuxi.pretrain.evaluation.checkpoint_eval import EvalSettings

    settings = EvalSettings(tasks=args.tasks, languages=args.languages, num_fewshot=args.num_fewshot,
                            limit=args.limit, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                            batch_size=args.batch_size, trust_remote_code=args.trust_remote_code)
    if args.run:
        from fuxi.pretrain.evaluation.trajectory import evaluate_run, format_trajectory

        trajectory = evaluate_run(args.run, settings, eval_root=args.out)
        print(format_trajectory(trajectory))
        print(f"results and plots in {trajectory['eval_dir']}")
        print(json.dumps(trajectory))
        return 0
    from fuxi.common.atomic import atomic_write, write_json
    from fuxi.pretrain.evaluation.checkpoint_eval import evaluate_checkpoint
    from fuxi.pretrain.evaluation.harness import format_report

    report, harness_results = evaluate_checkpoint(args.checkpoint, settings)
    print(format_report(report))
    if args.out:
        write_json(Path(args.out) / "report.json", report)
        with atomic_write(Path(args.out) / "harness_results.json") as f:
            json.dump(harness_results, f, indent=1, default=str)
        print(f"wrote {Path(args.out) / 'report.json'} and the harness's own results beside it")
    print(json.dumps(report))
    return 0


def cmd_bench(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.bench_name])
    module.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuxi", description="Multilingual LLM pretraining (FuxiTranyu family)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, FLOPs per token and ZeRO memory of a model config")
    info.add_argument("config_file", nargs="?", metavar="CONFIG", help="model YAML (or --config)")
    info.add_argument("--config", help="model YAML, e.g. configs/model/fuxitranyu-8b.yaml, llama3-8b.yaml")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    info.add_argument("--world-size", type=int, default=8)
    info.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    info.add_argument("--micro-batch", type=int, default=1)
    info.set_defaults(func=cmd_info)

    from fuxi.checkpoints.hf_export import EXPORT_DTYPES, LAYOUTS

    convert = sub.add_parser("convert", help="checkpoint conversion to and from Hugging Face format")
    conv_sub = convert.add_subparsers(dest="direction", required=True)
    to_hf = conv_sub.add_parser("to-hf", help="our checkpoint (plain or DeepSpeed ZeRO) -> HF directory")
    to_hf.add_argument("--checkpoint", required=True)
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--dtype", default="bfloat16", choices=EXPORT_DTYPES)
    to_hf.add_argument("--shard-size", default="5GB")
    to_hf.add_argument("--tokenizer", default=None, help="tokenizer directory to ship with the export")
    to_hf.add_argument("--format", default=None, choices=LAYOUTS,
                       help="native (default): transformers' ArceeForCausalLM, no remote code; tjunlp: the released "
                            "TJUNLP layout (FuxiTranyuForCausalLM, trust_remote_code). MoE-LPR models: native "
                            "Mixtral (Llama/Mistral base) or Qwen2-MoE (Qwen2 base), remote code on FuxiTranyu")
    to_hf.set_defaults(func=cmd_convert_to_hf)
    from_hf = conv_sub.add_parser("from-hf", help="HF directory (native arcee, TJUNLP FuxiTranyu(-MoE), Llama, "
                                                  "Qwen2, Mistral, Mixtral or Qwen2-MoE) -> our checkpoint")
    from_hf.add_argument("--hf", required=True)
    from_hf.add_argument("--out", required=True)
    from_hf.add_argument("--shard-size", default="5GB")
    from_hf.set_defaults(func=cmd_convert_from_hf)

    from fuxi.data_pipeline import cli as data_cli
    from fuxi.pretrain import cli as pretrain_cli
    from fuxi.pretrain.evaluation.benchmarks import DEFAULT_TASKS
    from fuxi.pretrain.evaluation.model_source import Dtype

    data_cli.register(sub)

    pretrain = sub.add_parser("pretrain", help="train (or resume) a model: --config <run.yaml> [--set k=v]")
    pretrain_cli.add_arguments(pretrain)
    pretrain.set_defaults(func=pretrain_cli.run)

    upcycle = sub.add_parser("upcycle", help="dense checkpoint -> MoE-LPR checkpoint (expert 0 = the dense FFN)")
    upcycle.add_argument("--checkpoint", required=True, help="our dense checkpoint (HF: `convert from-hf` first)")
    upcycle.add_argument("--experts", type=int, required=True, help="experts per MoE layer, N")
    upcycle.add_argument("--top-k", type=int, default=2, help="experts per token, K")
    upcycle.add_argument("--out", required=True)
    upcycle.add_argument("--layers", type=int, nargs="+", default=None, help="layers to upcycle (default: all)")
    upcycle.add_argument("--top1-code-compat", action="store_true", help="K=1 without renormalising (released)")
    upcycle.add_argument("--original-languages", nargs="+", default=[], help="language codes LPR keeps on expert 0")
    upcycle.add_argument("--seed", type=int, default=0, help="router initialisation seed")
    upcycle.add_argument("--shard-size", default="5GB")
    upcycle.set_defaults(func=cmd_upcycle)

    evaluate = sub.add_parser("eval", help="lm-evaluation-harness on a checkpoint (--checkpoint) or on every "
                                           "checkpoint of a run (--run); default tasks: the shipped local ones")
    target = evaluate.add_mutually_exclusive_group()
    target.add_argument("--checkpoint", help="ours (plain or DeepSpeed, dense or MoE) or a Hugging Face directory")
    target.add_argument("--run", help="a training run directory: evaluate each checkpoint (cached), plot per language")
    target.add_argument("--list-tasks", action="store_true", help="the task groups and benchmarks, then exit")
    evaluate.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                          help="groups (fuxi_local, fuxitranyu_report), benchmarks (m_arc, m_hellaswag, m_mmlu, "
                               "xwinograd, xcopa, xstorycloze, fuxi_translation_choice, fuxi_valid_ppl), their "
                               "per-language tasks (arc_de) or any harness task")
    evaluate.add_argument("--languages", nargs="+", default=None, help="only these languages of each benchmark")
    evaluate.add_argument("--num-fewshot", type=int, default=None,
                          help="shots for every task (default: each benchmark's own, the report's 25/10/5/5/0/0)")
    evaluate.add_argument("--limit", type=int, default=None, help="at most N documents per task (for a quick look)")
    evaluate.add_argument("--out", default=None, help="--checkpoint: write report.json and the harness's results "
                                                      "here; --run: the cache/plot root (default <run>/eval)")
    evaluate.add_argument("--tokenizer", default=None, help="default: the checkpoint's own tokenizer")
    evaluate.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--dtype", default="auto", choices=get_args(Dtype),
                          help="auto: bfloat16 on a GPU, float32 on a CPU")
    evaluate.add_argument("--batch-size", default="8", type=lambda v: v if v.startswith("auto") else int(v),
                          help="sequences per forward, or auto (the harness finds the largest that fits)")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="allow a Hugging Face directory's own Python code (never needed for ours)")
    evaluate.add_argument("--verbose", action="store_true", help="the harness's INFO logs")
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks: print a table, last line one JSON object")
    bench_sub = bench.add_subparsers(dest="bench_name", required=True)
    for name, module_name in BENCHMARKS.items():
        bench_parser = bench_sub.add_parser(name, help=f"{name} benchmark ({module_name})")
        importlib.import_module(module_name).add_arguments(bench_parser)
        bench_parser.set_defaults(func=cmd_bench)
    return parser


# Commands that set up logging themselves: pretrain (INFO on rank 0 only), eval (--verbose).
OWN_LOGGING = ("pretrain", "eval")


def main(argv: list[str] | None = None) -> int:
    from fuxi.common.errors import InputError
    from fuxi.common.logs import setup_cli_logging

    args = build_parser().parse_args(argv)
    if args.command not in OWN_LOGGING:  # what a command did shows (stages up to date, resumed, their times)
        setup_cli_logging(quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except InputError as err:  # a config, data, checkpoint or evaluation input at fault: one line
        print(f"fuxi {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
