"""`fuxi data ...`: one sub-command per stage, each a thin call into the library.

    fuxi data build-corpus                      rebuild data_pipeline/corpus from installed Debian packages
    fuxi data clean CORPUS OUT                  NFC, language ID, filters, dedup -> OUT/<split>/<lang>.jsonl
    fuxi data tokenizer CLEAN_TRAIN OUT         train byte-level BPE (or --backend sentencepiece)
    fuxi data fertility TOKENIZER CORPUS        tokens/word and bytes/token per language (+ --plot PNG)
    fuxi data pack CLEAN_SPLIT TOKENIZER OUT    tokenize + pack + shards + manifest
    fuxi data merge OUT_0 OUT_1 ... --out DIR   combine the shards of several tasks/machines into one dataset
    fuxi data inspect MANIFEST                  per-language stats; --verify checks every shard and decodes every sample
    fuxi data mixture MANIFEST                  target/planned (and, with --stream, realised) language shares
    fuxi data prepare OUT                       all stages on the bundled corpus (or --corpus)
    fuxi data align-table OUT                   PreAlign word-alignment table (FreeDict + parallel text)

clean, tokenizer, pack and prepare run as tasks of the data engine (engine.py): `--executor local|slurm|ray`,
`--tasks N`, `--workers M`; a re-run resumes a killed job, and one of a finished job says it is up to date and
does nothing (no report is printed again). Their inputs and outputs may be URLs (`s3://bucket/...`, remote.py).
`register(subparsers)` is wired into the `fuxi` CLI; `main(argv)` runs the same parser standalone.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fuxi.common.errors import DataError, InputError
from fuxi.common.logs import setup_cli_logging
from fuxi.data_pipeline.align_table import TABLE_FORMS
from fuxi.data_pipeline.config import MIXING_MODES
from fuxi.data_pipeline.engine import EXECUTORS, MAX_DEFAULT_TASKS, ExecutorConfig
from fuxi.data_pipeline.job import watch_jobs
from fuxi.data_pipeline.tokenizer import BACKENDS

log = logging.getLogger(__name__)


def _weights(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        lang, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--weights: expected lang=weight, got {item!r}")
        out[lang] = float(value)
    return out


def add_executor_arguments(p: argparse.ArgumentParser, multi_machine: bool = False) -> None:
    g = p.add_argument_group("engine (datatrove executors; the same job on one machine or many)")
    g.add_argument("--executor", choices=EXECUTORS, default="local")
    g.add_argument("--tasks", type=int,
                   help=f"tasks of the parallel stages (default: local: --workers; slurm and ray: one per input "
                        f"chunk of --chunk-mb (clean) or per language file (pack), at most {MAX_DEFAULT_TASKS})")
    g.add_argument("--workers", "--num-proc", dest="workers", type=int,
                   help="tasks running at once (local: processes; default: all CPUs)")
    if multi_machine:
        g.add_argument("--local-tasks", type=int, default=-1,
                       help="run only this many of the tasks here (several machines without a scheduler)")
        g.add_argument("--rank-offset", type=int, default=0, help="the first task this machine runs")
    g.add_argument("--work-dir", help="intermediate files and task logs (default: .<OUT>.work beside OUT)")
    g.add_argument("--partition", help="slurm partition")
    g.add_argument("--time", default="24:00:00", help="slurm time limit per task")
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument("--mem-per-cpu-gb", type=int, default=4)
    g.add_argument("--env-command", help="shell line that activates the environment on a node (default: this "
                                         "venv's activate script)")
    g.add_argument("--dry-run", action="store_true",
                   help="slurm: write and print the job scripts instead of submitting them")


def executor_config(args) -> ExecutorConfig:
    return ExecutorConfig(executor=args.executor, tasks=args.tasks, workers=args.workers,
                          local_tasks=getattr(args, "local_tasks", -1), rank_offset=getattr(args, "rank_offset", 0),
                          partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
                          mem_per_cpu_gb=args.mem_per_cpu_gb, env_command=args.env_command,
                          progress=not getattr(args, "quiet", False), dry_run=args.dry_run)


def cmd_build_corpus(args) -> int:
    from fuxi.data_pipeline import build_corpus
    argv = ["--out", args.out, "--seed", str(args.seed), "--scale", str(args.scale)]
    if args.languages:
        argv += ["--languages", *args.languages]
    build_corpus.main(argv)
    return 0


def cmd_clean(args) -> int:
    from fuxi.data_pipeline.clean import clean
    from fuxi.data_pipeline.dedup import DedupConfig
    from fuxi.data_pipeline.filters import FilterConfig
    from fuxi.data_pipeline.langid import LangIdConfig
    filters = FilterConfig(min_words=args.min_words, max_urls=args.max_urls)
    dedup = DedupConfig(exact=not args.no_exact_dedup, near=not args.no_near_dedup, threshold=args.threshold)
    langid = LangIdConfig(enabled=not args.no_langid, min_confidence=args.langid_min_confidence)
    with watch_jobs() as outcomes:
        report = clean(args.input, args.out, filters=filters, dedup=dedup, langid=langid,
                       languages=args.languages, max_docs_per_language=args.max_docs_per_language,
                       holdout_fraction=args.holdout, executor=executor_config(args), work_dir=args.work_dir,
                       chunk_mb=args.chunk_mb, keep_work=args.keep_work,
                       text_field=args.text_field, lang_field=args.lang_field)
    if report is None or _nothing_done(outcomes):
        return 0
    print(report.table())
    print(report.task_table())
    print(f"wrote {args.out}/<split>/<lang>.jsonl and {args.out}/clean_report.json")
    return 0


def cmd_tokenizer(args) -> int:
    from fuxi.data_pipeline.tokenizer import META_FILE, TokenizerConfig
    from fuxi.data_pipeline.tokenizer_stage import train_tokenizer_task
    config = TokenizerConfig(vocab_size=args.vocab_size, backend=args.backend,
                             max_docs_per_language=args.max_docs_per_language, seed=args.seed)
    with watch_jobs() as outcomes:
        out = train_tokenizer_task(args.corpus, args.out, config, executor_config(args))
    if out is None or _nothing_done(outcomes):
        return 0
    meta = json.loads((out / META_FILE).read_text())
    print(f"tokenizer ({meta['backend']}, vocab {meta['vocab_size']}, hash {meta['hash'][:16]}) -> {out}")
    return 0


def cmd_fertility(args) -> int:
    from fuxi.data_pipeline.fertility import fertility, fertility_table, plot_fertility
    stats = fertility(args.tokenizer, args.corpus, args.max_docs_per_language)
    print(fertility_table(stats))
    if args.plot:
        print(f"plot -> {plot_fertility(stats, args.plot, f'Fertility of {args.tokenizer}')}")
    if args.json:
        print(json.dumps(stats))
    return 0


def cmd_pack(args) -> int:
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.pack import pack
    languages = load_manifest(args.languages_from).languages if args.languages_from else args.languages
    with watch_jobs() as outcomes:
        path = pack(args.corpus, args.tokenizer, args.out, split=args.split, seq_len=args.seq_len,
                    languages=languages, shard_bytes=int(args.shard_mb * (1 << 20)), seed=args.seed,
                    docs_per_part=args.docs_per_part, executor=executor_config(args), work_dir=args.work_dir,
                    keep_work=args.keep_work)
    if path is None or _nothing_done(outcomes):
        return 0
    print(_manifest_table(load_manifest(path)))
    print(f"manifest -> {path}")
    return 0


def _nothing_done(outcomes: list[tuple[str, str]]) -> bool:
    """Whether every job was up to date: the log said so, and its report is not printed again."""
    return bool(outcomes) and all(outcome == "up to date" for _, outcome in outcomes)


def cmd_merge(args) -> int:
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.merge import merge_manifests
    path = merge_manifests(args.sources, args.out, verify=not args.no_verify)
    print(_manifest_table(load_manifest(path)))
    print(f"merged {len(args.sources)} sources -> {path}")
    return 0


def _manifest_table(manifest) -> str:
    from fuxi.common.tables import format_table
    samples = manifest.samples_per_language()
    shards = {lang: sum(1 for s in manifest.shards if s.language == lang) for lang in manifest.languages}
    rows = [[lang, shards[lang], samples[lang], s.documents, s.tokens, s.dropped_tokens, s.utf8_bytes,
             s.bytes_per_token] for lang, s in manifest.language_stats.items()]
    return format_table(["lang", "shards", "samples", "docs", "tokens", "dropped", "utf8 bytes", "bytes/token"],
                        rows)


def cmd_inspect(args) -> int:
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.shards import iter_blocks, verify_shards
    manifest = load_manifest(args.manifest)
    print(_manifest_table(manifest))
    print(f"split {manifest.split}, seq_len {manifest.seq_len}, vocab {manifest.vocab_size}, "
          f"{len(manifest.shards)} shards, {sum(s.bytes for s in manifest.shards):,} bytes, "
          f"tokenizer hash {manifest.tokenizer_hash[:16]}")
    if args.verify:
        count = verify_shards(manifest, progress=not args.quiet)
        print(f"verified: every shard's size and sha256 match the manifest; all {count:,} samples decode with the "
              f"expected dtypes and lengths, ids in range, tokens per language as listed")
    if args.show:
        from fuxi.data_pipeline.tokenizer import load_tokenizer
        tok = load_tokenizer(args.tokenizer or manifest.root / manifest.tokenizer_path)
        for i, (key, block) in enumerate(iter_blocks(manifest)):
            if i >= args.show:
                break
            text = tok.decode(block.tokens.tolist(), skip_special_tokens=False)
            print(f"--- {key} ({manifest.languages[int(block.lang_ids[0])]}) ---\n{text[:400]}")
    return 0


def cmd_mixture(args) -> int:
    from fuxi.data_pipeline.config import DataConfig
    from fuxi.data_pipeline.loader import build_plan, build_train_loader
    from fuxi.data_pipeline.manifest import load_manifest
    manifest = load_manifest(args.manifest)
    cfg = DataConfig(train_manifest=str(manifest.path), seq_len=manifest.seq_len, mixing=args.mixing,
                     alpha=args.alpha, weights=_weights(args.weights), max_epochs_per_language=args.max_epochs,
                     epoch_tokens=args.epoch_tokens, languages=args.languages, num_workers=args.num_workers,
                     seed=args.seed)
    cfg.validate()
    if not args.stream:
        plan = build_plan(manifest, cfg)
        print(plan.table())
        print(f"{plan.epoch_samples:,} samples ({plan.epoch_samples * manifest.block_len:,} tokens) "
              f"per mixture epoch")
        return 0
    loader = build_train_loader(cfg, batch_size=args.batch_size)
    for i, _ in enumerate(loader):
        if i + 1 >= args.stream:
            break
    print(loader.mixture_report())
    print(f"realised over {args.stream} batches of {args.batch_size}; corrupt samples replaced: {loader.skipped}")
    return 0


def cmd_prepare(args) -> int:
    from fuxi.data_pipeline.prepare import prepare_dataset
    with watch_jobs() as outcomes:
        prepared = prepare_dataset(args.out, args.corpus, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                   backend=args.backend, max_docs_per_language=args.max_docs_per_language,
                                   shard_bytes=int(args.shard_mb * (1 << 20)), seed=args.seed,
                                   executor=executor_config(args))
    if prepared is not None and _nothing_done(outcomes):
        return 0
    if prepared is None:
        print("submitted; run the same command again when the jobs have finished to go on")
        return 0
    print(f"tokenizer      {prepared.tokenizer_dir}\ntrain manifest {prepared.train_manifest}\n"
          f"val manifest   {prepared.val_manifest}")
    return 0


def cmd_status(args) -> int:
    from fuxi.data_pipeline.status import status_report
    print(status_report(args.out))
    return 0


def cmd_align_table(args) -> int:
    from fuxi.data_pipeline.align_table import (AlignTableConfig, build_alignment_table, write_alignment_table,
                                           write_build_report)
    cfg = AlignTableConfig(languages=args.languages, freedict_dir=None if args.no_freedict else args.freedict_dir,
                           parallel_dir="" if args.no_parallel else args.parallel, corpus_dir=args.corpus,
                           max_concepts=args.max_concepts, min_translations=args.min_translations)
    table, report = build_alignment_table(cfg)
    out = write_alignment_table(table, args.out, form=args.form)
    sources = write_build_report(report, Path(args.out).with_suffix(".sources.json"))
    print(report.table())
    print(f"{len(table)} concepts, {sum(len(c.words) for c in table.concepts)} words -> {out} ({args.form}); "
          f"provenance -> {sources}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `data` command (with its sub-commands) to a `fuxi` sub-parser set."""
    data = subparsers.add_parser("data", help="multilingual data pipeline: clean, tokenizer, pack, stream",
                                 description=__doc__.split("\n\n")[0])
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = sub.add_parser("build-corpus", help="rebuild the bundled corpus from installed Debian packages")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "corpus"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--languages", nargs="*")
    p.set_defaults(func=cmd_build_corpus)

    p = sub.add_parser("clean", help="NFC, language ID, heuristic filters, exact + MinHash near-dedup")
    p.add_argument("input", help="a .jsonl(.gz/.zst) or .parquet file, a folder of them and of language folders, "
                                 "a datasets save_to_disk folder, or a corpus holding splits (train/ and valid/, "
                                 "FineWeb-2's <lang>/{train,test}/); a path or a URL (s3://bucket/corpus); "
                                 "see docs/data.md")
    p.add_argument("out")
    p.add_argument("--languages", nargs="*", help="keep only these languages")
    p.add_argument("--max-docs-per-language", type=int,
                   help="quick subsets: read at most N labelled documents per language from each input chunk "
                        "(--chunk-mb of a file; a smaller file is one chunk), not a cap per language")
    p.add_argument("--holdout", type=float, default=0.0, help="hold out this fraction when there is no valid/")
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--max-urls", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.8, help="MinHash Jaccard threshold")
    p.add_argument("--no-exact-dedup", action="store_true")
    p.add_argument("--no-near-dedup", action="store_true")
    p.add_argument("--no-langid", action="store_true", help="drop unlabelled documents instead of identifying")
    p.add_argument("--langid-min-confidence", type=float, default=0.5)
    p.add_argument("--chunk-mb", type=float, default=8.0, help="input chunk size (the unit of work of a task)")
    p.add_argument("--text-field", default="text", help="the record field or column holding the text")
    p.add_argument("--lang-field", help="the record field or column holding the language (default: lang, "
                                        "else language)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    p.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("tokenizer", aliases=["train-tokenizer"], help="train the BPE tokenizer")
    p.add_argument("corpus", help="cleaned train split (folder of <lang>.jsonl)")
    p.add_argument("out")
    p.add_argument("--vocab-size", type=int, default=4096, help="250680 for the full FuxiTranyu model")
    p.add_argument("--backend", choices=BACKENDS, default="bpe")
    p.add_argument("--max-docs-per-language", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("fertility", help="tokens per word and bytes per token per language")
    p.add_argument("tokenizer")
    p.add_argument("corpus", help="folder of <lang>.jsonl (e.g. the cleaned valid split)")
    p.add_argument("--max-docs-per-language", type=int)
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=cmd_fertility)

    p = sub.add_parser("pack", aliases=["shard"], help="tokenize, pack into blocks, write shards + manifest")
    p.add_argument("corpus", help="cleaned split (folder of <lang>.jsonl)")
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--shard-mb", type=float, default=128.0)
    p.add_argument("--languages", nargs="*", help="the ordered language list (default: found, sorted)")
    p.add_argument("--languages-from", help="take the language list from this manifest (pack valid like train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-per-part", type=int, default=50_000,
                   help="documents per part (a part is packed into shards of its own)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (task logs) after success")
    p.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    add_executor_arguments(p, multi_machine=True)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("merge", help="combine manifests of several tasks/machines into one dataset")
    p.add_argument("sources", nargs="+", help="pack output folders (manifest.json or task manifests) or manifests")
    p.add_argument("--out", required=True, help="folder for the merged manifest.json (shards stay where they are)")
    p.add_argument("--no-verify", action="store_true", help="check shard sizes only, not their sha256")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", aliases=["stats"], help="manifest statistics; --verify checks every shard")
    p.add_argument("manifest")
    p.add_argument("--verify", action="store_true", help="check every shard's size and sha256 and decode every "
                                                         "sample (dtypes, lengths, id ranges, language counts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--show", type=int, default=0, help="decode and print the first N samples")
    p.add_argument("--tokenizer", help="tokenizer dir for --show (default: the manifest's)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("mixture", help="language mixing plan; --stream N reports realised shares")
    p.add_argument("manifest")
    p.add_argument("--mixing", choices=MIXING_MODES, default="temperature")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--weights", nargs="*", help="lang=weight ... (with --mixing weights)")
    p.add_argument("--max-epochs", type=float, help="UniMax cap: passes per language per mixture epoch")
    p.add_argument("--epoch-tokens", type=int)
    p.add_argument("--languages", nargs="*")
    p.add_argument("--stream", type=int, default=0, help="stream this many batches and report realised shares")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_mixture)

    p = sub.add_parser("prepare", help="all stages: clean -> tokenizer -> pack for train and valid")
    p.add_argument("out")
    p.add_argument("--corpus", help="default: the bundled corpus")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--backend", choices=BACKENDS, default="bpe")
    p.add_argument("--max-docs-per-language", type=int, help="quick subsets: read at most N labelled documents "
                   "per language from each 8 MB input chunk of clean (a smaller file is one chunk)")
    p.add_argument("--shard-mb", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("status", help="how far a clean/tokenizer/pack/prepare job has got, from its work folders "
                                      "(tasks done per stage, unfinished tasks with their last log line, queued "
                                      "Slurm jobs): the progress of a job running on Slurm or Ray")
    p.add_argument("out", help="the output folder (or URL) given to the job")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("align-table", help="PreAlign word-alignment table from FreeDict lists + parallel text")
    p.add_argument("out", help="JSONL file to write (a <out>.sources.json provenance file goes beside it)")
    p.add_argument("--languages", nargs="*", help="target languages (ISO 639-1; default: all available)")
    p.add_argument("--freedict-dir", default="/usr/share/dictd", help="where dict-freedict-eng-* installed")
    p.add_argument("--no-freedict", action="store_true")
    p.add_argument("--parallel", help="folder of en-<lang>.jsonl pairs (default: the bundled corpus's)")
    p.add_argument("--no-parallel", action="store_true")
    p.add_argument("--corpus", help="folder of <lang>.jsonl for word frequencies (default: bundled train/)")
    p.add_argument("--max-concepts", type=int, default=1500)
    p.add_argument("--min-translations", type=int, default=1)
    p.add_argument("--form", choices=TABLE_FORMS, default="multi")
    p.set_defaults(func=cmd_align_table)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuxi")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    setup_cli_logging(quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
