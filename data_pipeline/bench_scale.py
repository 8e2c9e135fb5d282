"""`fuxi bench data --scale`: the data engine at growing corpus sizes, against the single-process clean it
replaced and against datatrove's own MinHash and tokenizer, side by side in one run.

Corpora: the bundled corpus grown 4x, 16x and 64x by sentence reshuffling (copy k > 0 of a document is as many
sentences drawn from its language's pool, so only planted pairs are near duplicates), and a 4x variant where
20% of the training documents get a copy with 0.3-2% of their word units edited (planted pairs; the true
Jaccard of each pair is computed on the shingle sets).

Every job runs in a child process under a subreaper (prctl PR_SET_CHILD_SUBREAPER): datatrove's and our
executors fork workers, some of which outlive their parent, and all of them are reaped here, so the CPU
seconds (RUSAGE_CHILDREN) are the whole job's. Peak memory is the largest sum over the job's processes of
their proportional set size (PSS, so pages shared by forked workers count once), sampled every 50 ms.

The baseline ("today's clean"/"today's pack") is the code of `--baseline-ref` (default: the last commit
before the engine), extracted with `git archive` and run from its own folder. With `--workdir`, measurements
are saved as they finish and a re-run continues where it stopped. The last printed line is one JSON object.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from fuxi.common.atomic import write_json

BASELINE_REF = "23c7dc2"  # the single-process clean and the pool-based pack (issue 13's measurements)
REPO = Path(__file__).resolve().parents[1]
_SENTENCE_RE = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])|\n+")
_PR_SET_CHILD_SUBREAPER = 36


def add_arguments(parser) -> None:
    g = parser.add_argument_group("--scale: the data engine at 4x/16x/64x (bench_scale.py)")
    g.add_argument("--scale", action="store_true", help="run the scaling benchmark instead")
    g.add_argument("--scales", type=int, nargs="+", default=[4, 16, 64])
    g.add_argument("--peer-scale", type=int, default=4,
                   help="datatrove's MinHash + tokenizer on the planted corpus of this size (4: the 4x variant)")
    g.add_argument("--multi-machine-scale", type=int, default=16)
    g.add_argument("--tasks", type=int, default=4)
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of today's clean and pack")
    g.add_argument("--no-peer", action="store_true", help="skip datatrove's MinHash + tokenizer")


# --- corpora ---------------------------------------------------------------------------------------------------

def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_RE.split(text) if s and s.strip()]


def _joiner(lang: str, text: str) -> str:
    from fuxi.data_pipeline.textstats import spaceless_fraction
    if lang.startswith("code_"):
        return "\n"
    return "" if spaceless_fraction(text) > 0.5 else " "


def grow_corpus(source: Path, out: Path, factor: int, seed: int = 0, planted: float = 0.0) -> list[dict]:
    """`factor` x the corpus by sentence reshuffling; with `planted`, that fraction of the training documents
    gets an edited copy at the end of its file. Returns the planted pairs (lang, original, copy)."""
    from fuxi.data_pipeline.readers import iter_jsonl
    from fuxi.data_pipeline.textstats import word_units
    rng = random.Random(seed)
    pairs = []
    for split in ("valid", "train"):
        for path in sorted((source / split).glob("*.jsonl")):
            lang = path.stem
            docs = [d.text for d in iter_jsonl(path)]
            pool = [s for t in docs for s in _sentences(t)]
            written = []
            target = out / split / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                for copy in range(factor):
                    for text in docs:
                        if copy:
                            n = max(1, len(_sentences(text)))
                            text = _joiner(lang, text).join(rng.sample(pool, min(n, len(pool))))
                        f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
                        written.append(text)
                if planted and split == "train":
                    for text in rng.sample(written, round(planted * len(written))):
                        units = word_units(text)
                        if len(units) < 20:
                            continue
                        copy = _edit(text, units, rng.uniform(0.003, 0.02), rng)
                        f.write(json.dumps({"text": copy, "lang": lang}, ensure_ascii=False) + "\n")
                        pairs.append({"lang": lang, "original": text, "copy": copy})
    return pairs


def _edit(text: str, units: list[str], fraction: float, rng: random.Random) -> str:
    """Replace `fraction` of the word units (at least one) by other units of the same text, in place."""
    from fuxi.data_pipeline.textstats import word_unit_spans
    n = max(1, round(fraction * len(units)))
    spans = word_unit_spans(text)
    chosen = sorted(rng.sample(range(len(spans)), n), reverse=True)
    for i in chosen:
        a, b = spans[i]
        other = next((u for k in range(7, 7 + len(units)) if (u := units[(i + k) % len(units)]) != units[i]),
                     units[i] + "x")  # a different unit, so the copy really differs
        text = text[:a] + other + text[b:]
    return text


# --- measuring a job -------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += _children(pid)
    return seen


def measure(code: str, env: dict | None = None, log: Path | None = None) -> dict:
    """Run `python -c code` and return its CPU seconds (all descendants), peak summed PSS and wall time.

    The job runs in an empty folder: `python -c` puts the working directory first on sys.path, so run from a
    checkout it would import that checkout's packages ahead of the PYTHONPATH in `env` (and "today's" code
    would silently be ours)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = os.getpid()
    others = set(_children(me))  # children this process had before (not the job's)
    peak = [0]
    seen: set[int] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = [p for p in _tree(me) if p != me and p not in others]
            seen.update(pids)
            peak[0] = max(peak[0], sum(_pss_kb(p) for p in pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    neutral = tempfile.mkdtemp(prefix="fuxi-bench-job-")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, cwd=neutral)
    sampler.start()
    rc = proc.wait()
    deadline = time.time() + 600
    while time.time() < deadline:  # the job's orphans are re-parented to us: reap them (their CPU counts then)
        alive = [p for p in seen | set(_tree(me)) - others - {me} if os.path.exists(f"/proc/{p}")]
        for pid in alive:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # not (yet) our child: its parent is still running
        if not alive:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - started
    shutil.rmtree(neutral, ignore_errors=True)
    stop.set()
    sampler.join()
    if log:
        out.close()
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"benchmark job failed (exit {rc}):\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": round(cpu, 2), "peak_mb": round(peak[0] / 1024, 1), "wall_s": round(wall, 2)}


class Results:
    """Measurements saved as they finish (`<workdir>/results.json`): a re-run with the same --workdir skips
    the jobs it has, so a long benchmark interrupted half way continues."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def measure(self, key: str, code: str, env: dict | None, log: Path, outputs: Path | None = None) -> dict:
        if key in self.data and (outputs is None or outputs.exists()):
            return self.data[key]
        if outputs is not None and outputs.exists():
            shutil.rmtree(outputs)
        self.data[key] = measure(code, env, log)
        write_json(self.path, self.data)
        return self.data[key]


# --- the jobs --------------------------------------------------------------------------------------------------

def _ours_clean(corpus: Path, out: Path, tasks: int, workers: int) -> str:
    return (f"from fuxi.data_pipeline.clean import clean; from fuxi.data_pipeline.engine import ExecutorConfig; "
            f"clean({str(corpus)!r}, {str(out)!r}, executor=ExecutorConfig(tasks={tasks}, workers={workers}, "
            f"progress=False))")


def _old_clean(corpus: Path, out: Path, workers: int) -> str:
    return (f"from data_pipeline.clean import clean; "
            f"clean({str(corpus)!r}, {str(out)!r}, num_proc={workers}, progress=False)")


def _ours_pack(split: Path, tok: Path, out: Path, tasks: int, workers: int, extra: str = "") -> str:
    return (f"from fuxi.data_pipeline.pack import pack; from fuxi.data_pipeline.engine import ExecutorConfig; "
            f"pack({str(split)!r}, {str(tok)!r}, {str(out)!r}, seq_len=2048, shard_bytes=64 << 20, "
            f"executor=ExecutorConfig(tasks={tasks}, workers={workers}, progress=False{extra}))")


def _old_pack(split: Path, tok: Path, out: Path, workers: int) -> str:
    return (f"from data_pipeline.pack import pack; pack({str(split)!r}, {str(tok)!r}, {str(out)!r}, seq_len=2048, "
            f"shard_bytes=64 << 20, num_proc={workers}, progress=False)")


def _peer_minhash(corpus: Path, work: Path, out: Path, workers: int) -> str:
    """datatrove's four MinHash stages with its default configuration (5-grams, 14 buckets x 8 hashes), and
    a whitespace word splitter (its English default needs spaCy, which this project does not install)."""
    return f"""
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer

class Whitespace(WordTokenizer):
    def word_tokenize(self, text): return text.split()
    def sent_tokenize(self, text): return text.split("\\n")
    def span_tokenize(self, text): raise NotImplementedError

cfg = MinhashConfig()
w, work = {workers}, {str(work)!r}
read = lambda: JsonlReader({str(corpus)!r}, glob_pattern="*/*.jsonl")
s1 = LocalPipelineExecutor([read(), MinhashDedupSignature(work + "/sigs", cfg, language=Whitespace())],
                           tasks=w, workers=w, logging_dir=work + "/logs/s1")
s2 = LocalPipelineExecutor([MinhashDedupBuckets(work + "/sigs", work + "/buckets", config=cfg)],
                           tasks=cfg.num_buckets, workers=w, logging_dir=work + "/logs/s2", depends=s1)
s3 = LocalPipelineExecutor([MinhashDedupCluster(work + "/buckets", work + "/remove", config=cfg)],
                           tasks=1, logging_dir=work + "/logs/s3", depends=s2)
s4 = LocalPipelineExecutor([read(), MinhashDedupFilter(work + "/remove"), JsonlWriter({str(out)!r})],
                           tasks=w, workers=w, logging_dir=work + "/logs/s4", depends=s3)
s4.run()
"""


def _peer_tokenize(split: Path, tok: Path, work: Path, workers: int) -> str:
    return f"""
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer

LocalPipelineExecutor([JsonlReader({str(split)!r}, glob_pattern="*.jsonl"),
                       DocumentTokenizer({str(work)!r} + "/tokens",
                                         tokenizer_name_or_path={str(tok / 'tokenizer.json')!r},
                                         eos_token="<|endoftext|>")],
                      tasks={workers}, workers={workers}, logging_dir={str(work)!r} + "/logs").run()
"""


# what starting an interpreter and importing pack's modules costs: ours (the installed package) and the baseline
# (a checkout from before the `fuxi` namespace, imported by its bare folder name from PYTHONPATH)
_STARTUP = "import fuxi.data_pipeline.pack, webdataset, numpy"
_STARTUP_BASELINE = "import data_pipeline.pack, webdataset, numpy"


def _token_count(manifest: Path) -> int:
    data = json.loads(manifest.read_text())
    return sum(s["tokens"] for s in data["language_stats"].values())


def _kept_texts(folder: Path) -> set[str]:
    out = set()
    for path in folder.rglob("*.jsonl*"):
        import gzip
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            out.update(json.loads(line)["text"] for line in f if line.strip())
    return out


def _recall(pairs: list[dict], kept: set[str], near_dups: int | None, originals_kept: bool = True) -> dict:
    """Recall per script over pairs with true Jaccard >= 0.8 whose original survived the other filters.
    Precision = planted copies removed as near duplicates / all near-duplicate removals, where a removed copy
    counts only if it passes the filters and is not an exact duplicate (else it was removed for that)."""
    from fuxi.data_pipeline.dedup import exact_key, jaccard, shingles
    from fuxi.data_pipeline.filters import DocumentFilter
    from fuxi.data_pipeline.textstats import dominant_script, nfc
    doc_filter = DocumentFilter()
    originals = {exact_key(nfc(p["original"])) for p in pairs}
    per_script: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    bins: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    true_removed = 0
    for p in pairs:
        j = jaccard(shingles(p["original"], 5), shingles(p["copy"], 5))
        if j < 0.8 or (originals_kept and p["original"] not in kept):
            continue
        script = dominant_script(p["original"])
        script = {"KANA": "CJK", "HANGUL": "CJK"}.get(script, script)
        found = p["copy"] not in kept
        per_script[script][0] += found
        per_script[script][1] += 1
        b = "0.80-0.85" if j < 0.85 else "0.85-0.90" if j < 0.9 else "0.90-1.00"
        bins[b][0] += found
        bins[b][1] += 1
        copy = nfc(p["copy"])
        true_removed += found and doc_filter.reject_reason(copy, p["lang"]) is None and \
            exact_key(copy) not in originals
    total = [sum(v[0] for v in per_script.values()), sum(v[1] for v in per_script.values())]
    return {"recall": round(total[0] / max(1, total[1]), 4), "pairs": total[1],
            "per_script": {s: round(v[0] / v[1], 4) for s, v in sorted(per_script.items())},
            "pairs_per_script": {s: v[1] for s, v in sorted(per_script.items())},
            "per_jaccard": {b: round(v[0] / v[1], 4) for b, v in sorted(bins.items())},
            "precision": None if near_dups is None else round(true_removed / max(1, near_dups), 4)}


# --- the run ---------------------------------------------------------------------------------------------------

def _baseline(ref: str, into: Path) -> Path | None:
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "data_pipeline"], check=True,
                                 capture_output=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        print(f"baseline {ref}: not available ({err}); skipping today's clean/pack")
        return None
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(args) -> dict:
    from fuxi.common.tables import format_table
    from fuxi.data_pipeline.corpus import bundled_corpus
    from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer

    work = Path(args.workdir).absolute() if args.workdir else Path(tempfile.mkdtemp(prefix="fuxi-bench-scale-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "tasks": args.tasks,
                    "workers": args.workers, "load_average_start": round(os.getloadavg()[0], 2)}
    old_env = None
    base = _baseline(args.baseline_ref, work / "baseline")
    if base is not None:
        old_env = {"PYTHONPATH": str(base)}
    ours_env: dict = {}  # the installed package
    done = Results(work / "results.json")
    try:
        corpora = {}
        for k in sorted(set(args.scales) | {args.multi_machine_scale}):
            corpora[k] = work / f"corpus{k}x"
            if not (corpora[k] / "train").is_dir():
                grow_corpus(bundled_corpus(), corpora[k], k)
        planted_dir = work / f"corpus{args.peer_scale}x-planted"
        shutil.rmtree(planted_dir, ignore_errors=True)
        pairs = grow_corpus(bundled_corpus(), planted_dir, args.peer_scale, seed=1, planted=0.2)
        mb = {k: sum(p.stat().st_size for p in c.rglob("*.jsonl")) / 1e6 for k, c in corpora.items()}

        rows, scale = [], {}
        for k in args.scales:
            ours = done.measure(f"clean{k}x", _ours_clean(corpora[k], work / f"clean{k}x", args.tasks, args.workers),
                                ours_env, logs / f"clean{k}x.log", work / f"clean{k}x")
            entry = {"mb": round(mb[k], 1), "ours": ours, "ours_cpu_s_per_mb": round(ours["cpu_s"] / mb[k], 4)}
            if old_env:
                old = done.measure(f"oldclean{k}x", _old_clean(corpora[k], work / f"oldclean{k}x", args.workers),
                                   old_env, logs / f"oldclean{k}x.log", work / f"oldclean{k}x")
                entry.update(today=old, today_cpu_s_per_mb=round(old["cpu_s"] / mb[k], 4),
                             cpu_per_mb_ratio=round(ours["cpu_s"] / old["cpu_s"], 3))
                same = _kept_texts(work / f"clean{k}x") == _kept_texts(work / f"oldclean{k}x")
                entry["same_kept_documents_as_today"] = same
            scale[k] = entry
            rows.append([f"clean {k}x", entry["mb"], ours["cpu_s"], entry["ours_cpu_s_per_mb"], ours["peak_mb"],
                         entry.get("today", {}).get("cpu_s", "-"), entry.get("today_cpu_s_per_mb", "-"),
                         entry.get("today", {}).get("peak_mb", "-"), entry.get("cpu_per_mb_ratio", "-")])
        result["clean"] = scale
        lo, hi = min(args.scales), max(args.scales)
        result["peak_memory_ratio"] = round(scale[hi]["ours"]["peak_mb"] / scale[lo]["ours"]["peak_mb"], 3)
        if old_env:
            result["worst_cpu_per_mb_ratio"] = max(e["cpu_per_mb_ratio"] for e in scale.values())

        # near-dup recall/precision on the planted 4x variant
        planted_out = work / "clean-planted"
        planted = done.measure("planted", _ours_clean(planted_dir, planted_out, args.tasks, args.workers), ours_env,
                               logs / "planted.log", planted_out)
        report = json.loads((planted_out / "clean_report.json").read_text())
        near = sum(c.get("near_dup", 0) for langs in report["stats"].values() for c in langs.values())
        result["near_dup"] = {"corpus": f"{args.peer_scale}x with 20% planted",
                              "ours": _recall(pairs, _kept_texts(planted_out), near),
                              "ours_job": planted, "planted_pairs": len(pairs)}

        # pack: tokens per CPU-second, ours and today's, on the cleaned train split
        tok = work / "tokenizer"
        if not (tok / "tokenizer.json").is_file():
            train_tokenizer(work / f"clean{lo}x" / "train", tok, TokenizerConfig(vocab_size=32768))
        split = work / f"clean{hi}x" / "train"
        packs = {"ours": done.measure("pack", _ours_pack(split, tok, work / "pack", args.tasks, args.workers),
                                      ours_env, logs / "pack.log", work / "pack")}
        tokens = _token_count(work / "pack" / "manifest.json")
        # what starting an interpreter and importing pack's modules (torch, through webdataset) costs, once
        startup = {"ours": done.measure("startup", _STARTUP, ours_env, logs / "startup.log")["cpu_s"]}
        packs["ours"]["tokens_per_cpu_s"] = round(tokens / packs["ours"]["cpu_s"])
        packs["ours"]["tokens_per_cpu_s_after_startup"] = round(tokens / (packs["ours"]["cpu_s"] - startup["ours"]))
        if old_env:
            packs["today"] = done.measure("oldpack", _old_pack(split, tok, work / "oldpack", args.workers), old_env,
                                          logs / "oldpack.log", work / "oldpack")
            packs["today"]["tokens_per_cpu_s"] = round(tokens / packs["today"]["cpu_s"])
            startup["today"] = done.measure("startup-today", _STARTUP_BASELINE, old_env,
                                            logs / "startup-today.log")["cpu_s"]
            packs["today"]["tokens_per_cpu_s_after_startup"] = round(
                tokens / (packs["today"]["cpu_s"] - startup["today"]))
        result["pack"] = {"tokens": tokens, "corpus": f"{hi}x", "startup_cpu_s": startup, **packs}
        rows.append([f"pack {hi}x ({tokens:,} tokens)", round(mb[hi], 1), packs["ours"]["cpu_s"],
                     f"{packs['ours']['tokens_per_cpu_s'] / 1e6:.2f}M tok/CPU-s", packs["ours"]["peak_mb"],
                     packs.get("today", {}).get("cpu_s", "-"),
                     f"{packs['today']['tokens_per_cpu_s'] / 1e6:.2f}M tok/CPU-s" if "today" in packs else "-",
                     packs.get("today", {}).get("peak_mb", "-"), "-"])

        if not args.no_peer:
            # datatrove's stock MinHash on the planted corpus (recall, CPU, memory next to our whole clean of it),
            # then its tokenizer on our cleaned output next to our pack of the same
            k = args.peer_scale
            peer = {"corpus": f"{k}x with 20% planted",
                    "minhash": done.measure("peer-minhash", _peer_minhash(planted_dir, work / "peer", work / "peer-out",
                                                                          args.workers),
                                            ours_env, logs / "peer-minhash.log", work / "peer-out")}
            shutil.rmtree(work / "peer", ignore_errors=True)
            peer["minhash_cpu_vs_our_clean"] = round(peer["minhash"]["cpu_s"] / planted["cpu_s"], 3)
            peer["minhash_memory_vs_our_clean"] = round(peer["minhash"]["peak_mb"] / planted["peak_mb"], 3)
            peer["near_dup"] = _recall(pairs, _kept_texts(work / "peer-out"), None)
            ptok = done.measure("peer-tokenize", _peer_tokenize(planted_out / "train", tok, work / "peer-tok",
                                                                args.workers),
                                ours_env, logs / "peer-tok.log", work / "peer-tok")
            ours_tok = done.measure("pack-planted", _ours_pack(planted_out / "train", tok, work / "pack-planted",
                                                              args.tasks, args.workers),
                                    ours_env, logs / "pack-planted.log", work / "pack-planted")
            peer["tokenize"] = ptok
            peer["our_pack"] = ours_tok
            peer["tokens"] = _token_count(work / "pack-planted" / "manifest.json")
            peer["tokenize_cpu_vs_our_pack"] = round(ptok["cpu_s"] / ours_tok["cpu_s"], 3)
            peer["tokenize_memory_vs_our_pack"] = round(ptok["peak_mb"] / ours_tok["peak_mb"], 3)
            result["datatrove"] = peer
            pmb = sum(p.stat().st_size for p in planted_dir.rglob("*.jsonl")) / 1e6
            rows.append([f"ours, {k}x planted", round(pmb, 1), planted["cpu_s"], round(planted["cpu_s"] / pmb, 4),
                         planted["peak_mb"], "-", "-", "-", "-"])
            rows.append([f"datatrove MinHash, {k}x planted", round(pmb, 1), peer["minhash"]["cpu_s"],
                         round(peer["minhash"]["cpu_s"] / pmb, 4), peer["minhash"]["peak_mb"], "-", "-", "-",
                         f"{peer['minhash_cpu_vs_our_clean']}x our clean"])
            rows.append([f"datatrove tokenizer ({peer['tokens']:,} tokens)", "-", ptok["cpu_s"], "-", ptok["peak_mb"],
                         "-", "-", "-", f"{peer['tokenize_cpu_vs_our_pack']}x our pack ({ours_tok['cpu_s']} CPU-s)"])

        # several machines, simulated: clean --tasks 4 vs 1, then pack --tasks 4 on four "machines" + merge
        k = args.multi_machine_scale
        one, four = work / f"mm-clean1-{k}x", work / f"clean{k}x"
        if not four.exists():
            done.measure("mm-clean4", _ours_clean(corpora[k], four, 4, args.workers), ours_env,
                         logs / "mm-clean4.log", four)
        done.measure("mm-clean1", _ours_clean(corpora[k], one, 1, 1), ours_env, logs / "mm-clean1.log", one)
        same_docs = _kept_texts(one) == _kept_texts(four) and all(
            (one / p.relative_to(four)).read_bytes() == p.read_bytes() for p in four.rglob("*.jsonl"))
        done.measure("mm-pack1", _ours_pack(one / "train", tok, work / "mm-pack1", 1, 1), ours_env,
                     logs / "mm-pack1.log", work / "mm-pack1")
        for r in range(4):
            done.measure(f"mm-machine{r}", _ours_pack(four / "train", tok, work / f"mm-machine{r}", 4, 1,
                                                      extra=f", local_tasks=1, rank_offset={r}"),
                         ours_env, logs / f"mm-machine{r}.log", work / f"mm-machine{r}")
        from fuxi.data_pipeline.manifest import load_manifest
        from fuxi.data_pipeline.merge import merge_manifests
        merged = load_manifest(merge_manifests([work / f"mm-machine{r}" for r in range(4)], work / "mm-merged"))
        single = load_manifest(work / "mm-pack1" / "manifest.json")
        result["multi_machine"] = {
            "corpus": f"{k}x", "same_kept_documents": same_docs,
            "same_tokens": [s.sha256 for s in merged.shards] == [s.sha256 for s in single.shards]
            and merged.tokens_per_language() == single.tokens_per_language(),
            "tokens": sum(merged.tokens_per_language().values())}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    result["load_average_end"] = round(os.getloadavg()[0], 2)
    nd = result["near_dup"]["ours"]
    goals = {
        "memory_64x_within_1.25x_of_4x": result["peak_memory_ratio"] <= 1.25,
        "cpu_per_mb_within_1.2x_of_today": result.get("worst_cpu_per_mb_ratio", 99) <= 1.2,
        "pack_at_least_1.5M_tokens_per_cpu_s": result["pack"]["ours"]["tokens_per_cpu_s_after_startup"] >= 1_500_000,
        "pack_at_least_today_side_by_side": result["pack"]["ours"]["tokens_per_cpu_s"] >=
        result["pack"].get("today", {}).get("tokens_per_cpu_s", 0),
        "near_dup_recall_95_in_every_script": min(nd["per_script"].values()) >= 0.95,
        "near_dup_precision_99": (nd["precision"] or 0) >= 0.99,
        "multi_machine_equal": result["multi_machine"]["same_kept_documents"] and
        result["multi_machine"]["same_tokens"],
    }
    result["goals"] = goals
    print(format_table(["job", "MB", "CPU-s", "CPU-s/MB", "peak MB (all processes)", "today CPU-s",
                        "today CPU-s/MB", "today peak MB", "ratio"], rows))
    print(format_table(["near-dup (4x, 20% planted)", "recall", "pairs", "per script", "per Jaccard",
                        "precision"],
                       [["ours", nd["recall"], nd["pairs"], json.dumps(nd["per_script"]), json.dumps(nd["per_jaccard"]),
                         nd["precision"]]] +
                       ([["datatrove", result["datatrove"]["near_dup"]["recall"],
                          result["datatrove"]["near_dup"]["pairs"],
                          json.dumps(result["datatrove"]["near_dup"]["per_script"]),
                          json.dumps(result["datatrove"]["near_dup"]["per_jaccard"]), "-"]]
                        if "datatrove" in result else [])))
    print(format_table(["goal", "met"], [[k, v] for k, v in goals.items()]))
    print(f"{os.cpu_count()} CPUs; load average {result['load_average_start']} at the start, "
          f"{result['load_average_end']} at the end (CPU-seconds do not depend on other jobs, wall time does)")
    print(json.dumps(result))
    return result
