"""`fuxi bench data`: tokens per second for tokenize+pack (all cores) and for streaming batches through a
DataLoader with 2 workers, against what one H100 consumes training the 8B model at 45% MFU (~8,700 tokens/s,
anchors.md (iii)). Goals on the 2-core CPU machine: tokenize >= 1,000,000 tokens/s, stream >= 2,000,000.

Data: the bundled corpus, cleaned once, repeated `--copies` times (so pool start-up does not dominate), with a
BPE tokenizer of `--vocab-size` trained on it. Each figure is the median of `--repeats` runs. The last
printed line is one JSON object of the figures.

`--scale` runs the other data benchmark instead: the engine's clean, dedup and pack at 4x/16x/64x against
today's single-process clean and datatrove's MinHash and tokenizer (bench_scale.py).
"""
from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

H100_TOKENS_PER_S = 8_700  # 8.5B model, 4096 context, 45% MFU of 989 TFLOP/s (anchors.md (iii))


def add_arguments(parser) -> None:
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--copies", type=int, default=8, help="repeat the corpus this many times for packing")
    parser.add_argument("--stream-batches", type=int, default=300)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-proc", type=int, default=None, help="packing processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="keep the intermediate files here (default: a temp dir)")
    from fuxi.data_pipeline import bench_scale
    bench_scale.add_arguments(parser)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers, DataLoader workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _replicate(clean_train: Path, out: Path, copies: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(clean_train.glob("*.jsonl")):
        data = path.read_bytes()
        (out / path.name).write_bytes(data * copies)
    return out


def run(args) -> dict:
    if getattr(args, "scale", False):
        from fuxi.data_pipeline import bench_scale
        return bench_scale.run(args)
    from fuxi.common.tables import format_table
    from fuxi.data_pipeline.clean import clean
    from fuxi.data_pipeline.config import DataConfig
    from fuxi.data_pipeline.corpus import bundled_corpus
    from fuxi.data_pipeline.loader import build_train_loader
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.pack import pack
    from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fuxi-bench-data-"))
    num_proc = args.num_proc or os.cpu_count() or 1
    try:
        clean(bundled_corpus(), work / "clean", progress=False)
        tok = train_tokenizer(work / "clean" / "train", work / "tokenizer", TokenizerConfig(vocab_size=args.vocab_size))
        corpus = _replicate(work / "clean" / "train", work / "replicated", args.copies)

        pack_rates, pack_cpu, pack_tokens = [], [], 0
        for r in range(args.repeats):
            cpu, start = _cpu_seconds(), time.perf_counter()
            manifest_path = pack(corpus, tok, work / "shards", seq_len=args.seq_len, num_proc=num_proc,
                                 shard_bytes=16 << 20, progress=False, seed=r)
            elapsed = time.perf_counter() - start
            manifest = load_manifest(manifest_path)
            pack_tokens = sum(s.tokens for s in manifest.language_stats.values())
            pack_rates.append(pack_tokens / elapsed)
            pack_cpu.append(pack_tokens / (_cpu_seconds() - cpu))

        cfg = DataConfig(train_manifest=str(manifest_path), seq_len=args.seq_len, num_workers=args.num_workers,
                         mixing="temperature", seed=0)
        stream_rates, stream_cpu = [], []
        tokens_per_batch = args.batch_size * args.seq_len
        warmup = 64  # workers started, shards indexed and checksummed, first windows built
        for r in range(args.repeats):
            loader = build_train_loader(cfg, batch_size=args.batch_size)
            cpu = _cpu_seconds()
            it = iter(loader)
            for _ in range(warmup):
                next(it)
            start = time.perf_counter()
            for _ in range(args.stream_batches):
                next(it)
            elapsed = time.perf_counter() - start
            stream_rates.append(args.stream_batches * tokens_per_batch / elapsed)
            del it
            gc.collect()  # shuts the workers down, so their CPU time is counted
            time.sleep(0.5)
            stream_cpu.append((warmup + args.stream_batches) * tokens_per_batch / (_cpu_seconds() - cpu))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    tokenize = statistics.median(pack_rates)
    stream = statistics.median(stream_rates)
    result = {
        "tokenize_tokens_per_s": round(tokenize),
        "stream_tokens_per_s": round(stream),
        "tokenize_tokens_per_cpu_s": round(statistics.median(pack_cpu)),
        "stream_tokens_per_cpu_s": round(statistics.median(stream_cpu)),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tokenize_vs_h100": round(tokenize / H100_TOKENS_PER_S, 1),
        "stream_vs_h100": round(stream / H100_TOKENS_PER_S, 1),
        "h100_tokens_per_s": H100_TOKENS_PER_S,
        "tokenize_goal_met": tokenize >= 1_000_000,
        "stream_goal_met": stream >= 2_000_000,
        "packed_tokens": pack_tokens,
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "pack_processes": num_proc,
        "repeats": args.repeats,
    }
    print(format_table(
        ["stage", "tokens/s (median)", "runs", "tokens per CPU-s", "x one H100 (8.7k tok/s)", "goal"],
        [["tokenize + pack", tokenize, ", ".join(f"{x / 1e6:.2f}M" for x in pack_rates),
          result["tokenize_tokens_per_cpu_s"], tokenize / H100_TOKENS_PER_S, ">= 1.0M"],
         ["stream (DataLoader)", stream, ", ".join(f"{x / 1e6:.2f}M" for x in stream_rates),
          result["stream_tokens_per_cpu_s"], stream / H100_TOKENS_PER_S, ">= 2.0M"]]))
    print(f"tokenize+pack: {pack_tokens:,} tokens, vocab {args.vocab_size}, seq_len {args.seq_len}, "
          f"{num_proc} processes; stream: batch {args.batch_size} x {args.seq_len}, {args.num_workers} workers; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs slow wall-clock figures; "
          f"tokens per CPU-second do not depend on them)")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
