"""What `--tasks` names: the FuxiTranyu report's six benchmarks (docs/methods.md §1.11) and the shipped local tasks,
each a family of lm-evaluation-harness tasks, one per language, with its shot count and headline metric.

The task names are the harness's own (lm-eval 0.4.13; tests/test_evaluation.py checks every one against its task
index). The report's benchmarks download their data from the Hugging Face Hub at the user's site the first time
they run; the local tasks ship with the repo and need nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from fuxi.pretrain.evaluation.errors import EvalError


@dataclass(frozen=True)
class Benchmark:
    name: str
    # ISO 639-1 language -> the harness task of that language.
    tasks: dict[str, str]
    num_fewshot: int
    # The metric averaged over languages in the summary and plotted in trajectories.
    metric: str
    local: bool = False
    description: str = ""


def _per_language(pattern: str, languages: str, renames: dict[str, str] | None = None) -> dict[str, str]:
    """'arc_{}' and 'de fr' -> {'de': 'arc_de', 'fr': 'arc_fr'}; `renames` maps an ISO code to the harness's
    own suffix where they differ (XWinograd says 'jp' for Japanese)."""
    renames = renames or {}
    return {lang: pattern.format(renames.get(lang, lang)) for lang in languages.split()}


OKAPI_ARC = "ar bn ca da de es eu fr gu hi hr hu hy id it kn ml mr ne nl pt ro ru sk sr sv ta te uk vi zh"
OKAPI_HELLASWAG = "ar bn ca da de es eu fr gu hi hr hu hy id it kn ml mr ne nl pt ro ru sk sr sv ta te uk vi"
OKAPI_MMLU = ("ar bn ca da de en es eu fr gu hi hr hu hy id is it kn ml mr nb ne nl pt ro ru sk sr sv ta te uk "
              "vi zh")
TRANSLATION_LANGUAGES = "ar bg cs de el es fa fr he hi id it ja ko nl pl pt ru sv th tr uk vi zh"
PPL_LANGUAGES = TRANSLATION_LANGUAGES + " en code_c code_javascript code_python code_sql"

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("m_arc", _per_language("arc_{}", OKAPI_ARC), 25, "acc_norm",
              description="ARC-Challenge machine-translated (Okapi, alexandrainst/m_arc)"),
    Benchmark("m_hellaswag", _per_language("hellaswag_{}", OKAPI_HELLASWAG), 10, "acc_norm",
              description="HellaSwag machine-translated (Okapi, alexandrainst/m_hellaswag)"),
    Benchmark("m_mmlu", _per_language("m_mmlu_{}", OKAPI_MMLU), 5, "acc",
              description="MMLU machine-translated (Okapi, alexandrainst/m_mmlu)"),
    Benchmark("xwinograd", _per_language("xwinograd_{}", "en fr ja pt ru zh", {"ja": "jp"}), 5, "acc",
              description="Winograd schemas in 6 languages (Muennighoff/xwinograd)"),
    Benchmark("xcopa", _per_language("xcopa_{}", "et ht id it qu sw ta th tr vi zh"), 0, "acc",
              description="COPA in 11 languages (cambridgeltl/xcopa)"),
    Benchmark("xstorycloze", _per_language("xstorycloze_{}", "ar en es eu hi id my ru sw te zh"), 0, "acc",
              description="StoryCloze in 11 languages (juletxara/xstory_cloze)"),
    Benchmark("fuxi_translation_choice", _per_language("fuxi_translation_choice_{}", TRANSLATION_LANGUAGES), 0,
              "acc", local=True, description="pick the translation of an English UI message among 4 (shipped)"),
    Benchmark("fuxi_valid_ppl", _per_language("fuxi_valid_ppl_{}", PPL_LANGUAGES), 0, "bits_per_byte",
              local=True, description="bits per byte on the corpus's held-out validation split (shipped)"),
]}

# Names for several benchmarks at once. `fuxi_local` is the default of `fuxi eval` and of in-loop evaluation.
GROUPS: dict[str, list[str]] = {
    "fuxi_local": ["fuxi_translation_choice", "fuxi_valid_ppl"],
    "fuxitranyu_report": ["m_arc", "m_hellaswag", "m_mmlu", "xwinograd", "xcopa", "xstorycloze"],
}
DEFAULT_TASKS = ["fuxi_local"]
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "bits_per_byte": False, "byte_perplexity": False,
                    "word_perplexity": False}


@dataclass(frozen=True)
class EvalTask:
    """One harness task to run, with the row it fills in the report."""

    name: str
    benchmark: str
    language: str
    # None: the task's own default (harness tasks outside our benchmarks).
    num_fewshot: int | None
    metric: str | None
    local: bool


def _task_of(name: str) -> tuple[Benchmark, str] | None:
    for benchmark in BENCHMARKS.values():
        for lang, task in benchmark.tasks.items():
            if task == name:
                return benchmark, lang
    return None


def resolve_tasks(names: list[str], languages: list[str] | None = None, num_fewshot: int | None = None,
                  harness_task_names=None) -> list[EvalTask]:
    """`names`: groups, benchmarks, their per-language task names, or any other harness task name (checked with
    `harness_task_names()`, called only when a name is not ours since indexing the harness takes ~20 s).
    `languages` keeps only those languages of a benchmark; `num_fewshot` overrides every shot count."""
    resolved: dict[str, EvalTask] = {}

    def add(task: EvalTask) -> None:
        resolved.setdefault(task.name, task)

    unknown = []
    for name in names:
        expanded = GROUPS.get(name, [name])
        for item in expanded:
            if item in BENCHMARKS:
                b = BENCHMARKS[item]
                for lang, task in b.tasks.items():
                    if languages is None or lang in languages:
                        add(EvalTask(task, b.name, lang, num_fewshot if num_fewshot is not None else b.num_fewshot,
                                     b.metric, b.local))
            elif (found := _task_of(item)) is not None:
                b, lang = found
                add(EvalTask(item, b.name, lang, num_fewshot if num_fewshot is not None else b.num_fewshot,
                             b.metric, b.local))
            else:
                unknown.append(item)
    if unknown:
        known = set(harness_task_names()) if harness_task_names is not None else set()
        missing = [n for n in unknown if n not in known]
        if missing:
            raise EvalError(f"--tasks: unknown task {missing[0]!r}: not one of fuxi's groups {sorted(GROUPS)} or "
                            f"benchmarks {sorted(BENCHMARKS)} (or their per-language tasks, e.g. arc_de), nor a "
                            "task of lm-evaluation-harness (`lm-eval ls tasks` lists them)")
        for name in unknown:
            add(EvalTask(name, name, "-", num_fewshot, None, False))
    if not resolved:
        raise EvalError(f"--languages {' '.join(languages or [])}: none of the named benchmarks has these "
                        "languages")
    return list(resolved.values())


def describe_tasks() -> str:
    """`fuxi eval --list-tasks`: the benchmarks and groups `--tasks` accepts."""
    from fuxi.common.tables import format_table

    rows = [[b.name, "shipped" if b.local else "downloads", b.num_fewshot, b.metric, len(b.tasks),
             " ".join(b.tasks), b.description] for b in BENCHMARKS.values()]
    text = format_table(["benchmark", "data", "shots", "metric", "langs", "languages", "what"], rows)
    groups = [[name, " ".join(members)] for name, members in GROUPS.items()]
    return text + "\n\n" + format_table(["group", "benchmarks"], groups)
