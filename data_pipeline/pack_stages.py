"""The pipeline steps of `fuxi data pack`: plan (1 task), pack (--tasks), merge (1 task).

Work folder: `plan.json` (the jobs: language, part, first document id; the tokenizer's hash and vocabulary
size) and `offsets/<lang index>.npy` (each language's documents in the shuffled order: byte offset, line
number); `results/<job>.json` per finished job (a re-run of a killed task skips the jobs it had finished);
`staging/`, the next output folder: shards and one task manifest per task, then `manifest.json` and
`pack_report.json`, switched in place of the output folder by the merge step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fuxi.common.atomic import write_json
from fuxi.common.staging import switch_folder
from fuxi.data_pipeline.dedup_stages import save_npy
from fuxi.data_pipeline.encoders import FastEncoder
from fuxi.data_pipeline.engine import Stage, TaskStep, deal
from fuxi.data_pipeline.manifest import LanguageStats, Manifest, ShardInfo
from fuxi.data_pipeline.merge import MANIFEST_NAME, merge_manifests, task_manifest_name
from fuxi.data_pipeline.pack import PackJob, PackResult, PackSettings, language_files, plan_jobs, run_job
from fuxi.data_pipeline.tokenizer import EOS_ID, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)


def _load_plan(work: Path) -> dict:
    return json.loads((work / "plan.json").read_text(encoding="utf-8"))


def _deal(jobs: list[dict], world_size: int) -> list[list[int]]:
    """Job indices per task, balanced by documents."""
    return deal([j["count"] for j in jobs], world_size)


class PlanPack(TaskStep):
    name = "plan"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        work = Path(s.work_dir)
        files = language_files(s.corpus)
        languages = s.languages or sorted(files)
        unknown = sorted(set(files) - set(languages))
        if unknown:
            log.warning("pack %s: ignoring %s (not in the language list)", s.corpus, unknown)
        jobs = plan_jobs(files, languages, s.seed, s.docs_per_part)
        by_lang: dict[int, list[np.ndarray]] = {}
        for job in jobs:  # per document: byte offset and line number (for errors), in the shuffled order
            by_lang.setdefault(job.lang_index, []).append(np.stack([job.offsets, job.lines], axis=1))
        for lang_index, parts in by_lang.items():
            save_npy(work / "offsets" / f"{lang_index}.npy", np.concatenate(parts))
        records = [{"lang": j.lang, "lang_index": j.lang_index, "path": j.path, "first_doc": j.first_doc,
                    "part": j.part, "count": len(j.offsets)} for j in jobs]
        digest = hashlib.sha256(json.dumps([records, asdict(s)["seed"], s.docs_per_part, s.seq_len,
                                            s.split, languages], sort_keys=True).encode()).hexdigest()[:16]
        # the tokenizer is parsed here once, not again by every task (each task parses it only to encode)
        write_json(work / "plan.json", {"languages": languages, "jobs": records, "plan": digest,
                                        "vocab_size": load_tokenizer(s.tokenizer_dir).get_vocab_size(),
                                        "tokenizer_hash": tokenizer_hash(s.tokenizer_dir)})
        self.count("jobs", len(jobs))


class PackTasks(TaskStep):
    """Run the jobs dealt to this task; write its shards and its task manifest into the staging folder."""

    name = "pack"

    def describe(self, rank: int, world_size: int) -> str:
        try:
            plan = _load_plan(Path(self.settings.work_dir))
        except (OSError, ValueError):
            return ""
        mine = [plan["jobs"][j] for j in _deal(plan["jobs"], world_size)[rank]]
        return ", ".join(f"{j['path']} part {j['part']}" for j in mine[:3]) + (" ..." if len(mine) > 3 else "")

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        work = Path(s.work_dir)
        started = time.time()
        plan = _load_plan(work)
        languages = plan["languages"]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        encoder = None
        results: list[PackResult] = []
        for j in _deal(plan["jobs"], world_size)[rank]:
            done = work / "results" / f"{j:06d}.json"
            if done.is_file():
                results.append(_result_from_json(json.loads(done.read_text(encoding="utf-8"))))
                continue
            if encoder is None:
                encoder = FastEncoder(s.tokenizer_dir, prefer_fast=s.fast_encoder)
            rec = plan["jobs"][j]
            docs = np.load(work / "offsets" / f"{rec['lang_index']}.npy", mmap_mode="r")
            docs = np.asarray(docs[rec["first_doc"]:rec["first_doc"] + rec["count"]])
            job = PackJob(rec["lang"], rec["lang_index"], rec["path"], docs[:, 0], rec["first_doc"], rec["part"],
                          docs[:, 1])
            result = run_job(job, s, languages, encoder)
            write_json(done, {"lang": result.lang, "part": result.part, "stats": asdict(result.stats),
                              "shards": [asdict(sh) for sh in result.shards]})
            results.append(result)
        results.sort(key=lambda r: (languages.index(r.lang), r.part))
        stats = {lang: LanguageStats() for lang in languages}
        for r in results:
            stats[r.lang].add(r.stats)
        manifest = Manifest(
            split=s.split, seq_len=s.seq_len, tokenizer_hash=plan["tokenizer_hash"],
            vocab_size=plan["vocab_size"], eos_id=EOS_ID, languages=languages,
            language_stats=stats, shards=[sh for r in results for sh in r.shards], seed=s.seed,
            tokenizer_path=os.path.relpath(s.tokenizer_dir, s.out_dir),
            task={"rank": rank, "tasks": world_size, "plan": plan["plan"]})
        manifest.save(s.staging / task_manifest_name(rank, world_size))
        tokens = sum(st.tokens for st in stats.values())
        self.count("documents", sum(st.documents for st in stats.values()))
        self.count("tokens", tokens)
        self.save_task_stats(work, rank, {
            "seconds": round(time.time() - started, 3), "jobs": len(results),
            "docs_in": sum(st.documents for st in stats.values()), "tokens": tokens,
            "samples": sum(st.samples for st in stats.values()), "shards": len(manifest.shards)})


def _result_from_json(data: dict) -> PackResult:
    return PackResult(data["lang"], data["part"], [ShardInfo(**sh) for sh in data["shards"]],
                      LanguageStats(**data["stats"]))


class MergeTasks(TaskStep):
    """Check and combine the task manifests into manifest.json, then switch the new folder into place."""

    name = "merge"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        work = Path(s.work_dir)
        staging = s.staging
        if not staging.is_dir():
            return  # switched in by an earlier attempt that died before its completion marker
        for leftover in [*staging.glob(".*.tmp"), staging / MANIFEST_NAME]:  # from a killed attempt
            leftover.unlink(missing_ok=True)
        path = merge_manifests([staging], staging, verify=False,
                               tokenizer_path=os.path.relpath(s.tokenizer_dir, s.out_dir))
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for lang, st in manifest["language_stats"].items():
            if st["samples"] == 0:
                log.warning("pack %s: language %s has %d tokens, fewer than one block of %d: no samples",
                            s.split, lang, st["tokens"], s.seq_len + 1)
        tasks = {p.stem: json.loads(p.read_text()) for p in sorted((work / "taskstats" / "pack").glob("*.json"))}
        write_json(staging / "pack_report.json", {"split": s.split, "job": s.job, "tasks": tasks})
        switch_folder(staging, s.out_dir)


def pack_stages(settings: PackSettings, tasks: int) -> list[Stage]:
    return [Stage("plan", PlanPack(settings), 1, parallel=False),
            Stage("pack", PackTasks(settings), tasks),
            Stage("merge", MergeTasks(settings), 1, parallel=False)]

