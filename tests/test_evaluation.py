"""Downstream evaluation with lm-evaluation-harness: the shipped local tasks, `fuxi eval` on our checkpoints
(plain, DeepSpeed, MoE) against the harness run directly on the Hugging Face export and against an independent
scoring with transformers, the trajectory over a run's checkpoints, in-loop evaluation (one process ZeRO-1, two
ranks ZeRO-3), and bad input."""
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fuxi.pretrain.evaluation.benchmarks import BENCHMARKS, GROUPS, describe_tasks, resolve_tasks
from fuxi.pretrain.evaluation.errors import EvalError
from fuxi.pretrain.evaluation.local_tasks import TASKS_DIR, tasks_digest
from trainer_helpers import run_config, run_pretrain, tiny_training_dataset, train_losses, write_config

LANGS = ["zh", "ru"]  # languages of the tiny training set that both local task families have
LIMIT = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def eval_run_config(data, out_dir: Path, **sections) -> dict:
    """8 steps, checkpoints at 4 and 8 (both kept), in-loop evaluation at 4 and 8, HF export at the end."""
    logging_ = {"eval_every_steps": 4, "eval_languages": LANGS, "eval_limit": LIMIT, "eval_batch_size": 4,
                **sections.pop("logging", {})}
    run = {"output_dir": str(out_dir), "seed": 7, "tokenizer": str(data.tokenizer_dir), **sections.pop("run", {})}
    return run_config(data, out_dir, logging=logging_, run=run, checkpoint={"every_steps": 4, "keep_last": 4},
                      **sections)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny FuxiTranyu trained with in-loop evaluation: runs/x/{checkpoints/step_4,8, final, hf}."""
    out = tmp_path_factory.mktemp("eval_run") / "run"
    cfg = eval_run_config(data, out, run={"export_hf": True}, logging={"tensorboard": True})
    run_pretrain(write_config(cfg, out.parent / "run.yaml"))
    return out


def fuxi_eval(capsys, *argv) -> dict:
    """`fuxi eval ...` in this process; its last stdout line is one JSON object."""
    from fuxi.launch.cli import main

    rc = main(["eval", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out[-5:]
    return json.loads(out[-1])


def by_task(report: dict) -> dict:
    return {row["task"]: row["metrics"] for row in report["rows"]}


def assert_same_scores(a: dict, b: dict, rel: float = 0.0) -> None:
    """Accuracies equal exactly; perplexity-type metrics within `rel` (0: bitwise)."""
    assert a.keys() == b.keys()
    for task in a:
        for metric, value in a[task].items():
            if metric.startswith("acc") or rel == 0.0:
                assert value == b[task][metric], (task, metric, value, b[task][metric])
            else:
                assert math.isclose(value, b[task][metric], rel_tol=rel), (task, metric, value, b[task][metric])


def local_task_names(langs=LANGS) -> list[str]:
    return [t.name for t in resolve_tasks(["fuxi_local"], langs)]


def harness_scores(hf_dir: Path, limit: int, **model_args) -> dict:
    """The harness called directly, as its users do: `model="hf"` with the export's path."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", **model_args},
        tasks=local_task_names(), task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=limit, batch_size=8, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and v != "N/A"}
            for task, r in results["results"].items()}


# ---- the shipped tasks -----------------------------------------------------------------------------------------

def test_local_tasks_rebuild_byte_identically_and_are_well_formed(tmp_path):
    """`python -m fuxi.pretrain.evaluation.build_tasks` reproduces the shipped files exactly; every question's answer
    is the pair's translation, among distinct same-language choices, and never occurs in the training split."""
    from fuxi.data_pipeline.corpus import bundled_corpus
    from fuxi.pretrain.evaluation.build_tasks import build

    build(bundled_corpus(), tmp_path)
    shutil.copy(TASKS_DIR / "translation_choice" / "_translation_choice_yaml", tmp_path / "translation_choice")
    shutil.copy(TASKS_DIR / "valid_ppl" / "_valid_ppl_yaml", tmp_path / "valid_ppl")
    assert tasks_digest(tmp_path) == tasks_digest(TASKS_DIR)

    corpus = bundled_corpus()
    languages = sorted(p.stem.split("-")[1] for p in (corpus / "parallel").glob("en-*.jsonl"))
    assert len(languages) >= 6 and BENCHMARKS["fuxi_translation_choice"].tasks.keys() == set(languages)
    for lang in languages:
        pairs = {}
        for line in (corpus / "parallel" / f"en-{lang}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            pairs.setdefault(record["src"].strip(), set()).add(record["tgt"].strip())
        train = (corpus / "train" / f"{lang}.jsonl").read_text(encoding="utf-8")
        items = [json.loads(line) for line in
                 (TASKS_DIR / "translation_choice" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert 100 <= len(items) <= 200
        golds = [item["gold"] for item in items]
        assert set(golds) == {0, 1, 2, 3}  # the answer is not always in the same place
        for item in items:
            answer = item["choices"][item["gold"]]
            assert len({c.casefold() for c in item["choices"]}) == 4
            assert answer in pairs[item["src"]]
            assert json.dumps(answer, ensure_ascii=False)[1:-1] not in train
    ppl_langs = {p.stem for p in (corpus / "valid").glob("*.jsonl")}
    assert BENCHMARKS["fuxi_valid_ppl"].tasks.keys() == ppl_langs


@pytest.mark.hf
def test_benchmark_task_names_exist_in_the_pinned_harness():
    """Every per-language task of the report's six benchmarks is a task of the installed lm-eval, and every local
    task is found through include_path."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    folders = [harness_tasks / d for d in ("okapi", "xwinograd", "xcopa", "xstorycloze")]
    known = set(TaskManager(include_path=[str(f) for f in folders], include_defaults=False).all_tasks)
    local = set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
    for name in GROUPS["fuxitranyu_report"]:
        missing = set(BENCHMARKS[name].tasks.values()) - known
        assert not missing, (name, missing)
    for name in GROUPS["fuxi_local"]:
        assert set(BENCHMARKS[name].tasks.values()) <= local
    assert {"fuxi_local", "fuxi_translation_choice", "fuxi_valid_ppl"} <= local  # the YAMLs' tags


def test_resolve_tasks_shots_languages_and_unknown_names():
    report = resolve_tasks(["fuxitranyu_report"])
    shots = {t.benchmark: t.num_fewshot for t in report}
    assert shots == {"m_arc": 25, "m_hellaswag": 10, "m_mmlu": 5, "xwinograd": 5, "xcopa": 0, "xstorycloze": 0}
    assert {(t.name, t.language) for t in resolve_tasks(["xwinograd"], ["ja"])} == {("xwinograd_jp", "ja")}
    assert [t.num_fewshot for t in resolve_tasks(["arc_de"], num_fewshot=3)] == [3]
    assert {t.language for t in resolve_tasks(["fuxi_local"], ["de"])} == {"de"}
    other = resolve_tasks(["lambada_openai"], harness_task_names=lambda: ["lambada_openai"])
    assert [(t.name, t.benchmark, t.num_fewshot) for t in other] == [("lambada_openai", "lambada_openai", None)]
    with pytest.raises(EvalError, match="unknown task 'no_such_task'"):
        resolve_tasks(["no_such_task"], harness_task_names=lambda: ["lambada_openai"])
    with pytest.raises(EvalError, match="--languages"):
        resolve_tasks(["xcopa"], ["de"])
    listing = describe_tasks()
    for name, shots in {"m_arc": 25, "m_hellaswag": 10, "m_mmlu": 5, "xwinograd": 5, "xcopa": 0}.items():
        assert any(line.split()[:3] == [name, "downloads", str(shots)] for line in listing.splitlines())


# ---- fuxi eval on our checkpoints --------------------------------------------------------------------------------

@pytest.mark.hf
def test_fuxi_eval_equals_the_harness_on_the_export(trained, capsys, tmp_path):
    """`fuxi eval` on our plain checkpoint, on the DeepSpeed checkpoint it was consolidated from, and on the HF
    export, against `lm_eval.simple_evaluate(model="hf", ...)` run directly on the export."""
    common = ["--languages", *LANGS, "--limit", str(LIMIT), "--dtype", "float32", "--device", "cpu"]
    ours = fuxi_eval(capsys, "--checkpoint", str(trained / "final"), *common, "--out", str(tmp_path / "out"))
    deepspeed = fuxi_eval(capsys, "--checkpoint", str(trained / "checkpoints" / "step_00000008"), *common)
    export = fuxi_eval(capsys, "--checkpoint", str(trained / "hf"), *common)
    assert (ours["source"], deepspeed["source"], export["source"]) == ("ours", "deepspeed", "hf")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == ours
    assert (tmp_path / "out" / "harness_results.json").is_file()

    reference = harness_scores(trained / "hf", LIMIT)
    assert set(reference) == set(local_task_names())
    assert_same_scores(by_task(export), reference)  # the same harness call
    assert_same_scores(by_task(ours), by_task(deepspeed))  # the same weights, bitwise
    assert_same_scores(by_task(ours), reference, rel=1e-5)  # our forward vs transformers' ArceeForCausalLM
    assert {r["language"] for r in ours["rows"]} == set(LANGS)
    assert ours["summary"]["fuxi_valid_ppl"]["metric"] == "bits_per_byte"


@pytest.mark.hf
def test_local_tasks_score_what_they_say(trained, capsys):
    """An independent scoring with transformers of the export: the translation question is "English: <src>
    \\n<Language>:" followed by " <choice>", scored by summed log-probability (acc) and per character (acc_norm); the
    perplexity task is every document in non-overlapping windows of the context length, the first after BOS,
    in bits per UTF-8 byte."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(trained / "hf", local_files_only=True)

    def logprobs(ids: list[int]) -> torch.Tensor:  # log p(ids[i+1] | ids[:i+1])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    report = by_task(fuxi_eval(capsys, "--checkpoint", str(trained / "hf"), "--tasks", "fuxi_translation_choice_zh",
                               "fuxi_valid_ppl_ru", "--limit", "4", "--dtype", "float32", "--device", "cpu"))
    items = [json.loads(line) for line in
             (TASKS_DIR / "translation_choice" / "zh.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    window = model.config.max_position_embeddings  # 32: longer inputs lose their oldest tokens, as documented
    hits, hits_norm = [], []
    for item in items:
        context = tok(f"English: {item['src']}\nChinese:")["input_ids"]
        scores = []
        for choice in item["choices"]:
            ids = tok(f"English: {item['src']}\nChinese: {choice}")["input_ids"]
            assert ids[:len(context)] == context
            answer_tokens = len(ids) - len(context)
            scores.append(float(logprobs(ids[-(window + 1):])[-answer_tokens:].sum()))
        norm = [s / len(c) for s, c in zip(scores, item["choices"])]
        hits.append(max(range(4), key=scores.__getitem__) == item["gold"])
        hits_norm.append(max(range(4), key=norm.__getitem__) == item["gold"])
    assert report["fuxi_translation_choice_zh"]["acc"] == sum(hits) / 4
    assert report["fuxi_translation_choice_zh"]["acc_norm"] == sum(hits_norm) / 4

    docs = [json.loads(line)["text"] for line in
            (TASKS_DIR / "valid_ppl" / "ru.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    total_logprob, total_bytes = 0.0, 0
    for text in docs:
        ids = tok(text)["input_ids"]
        for start in range(0, len(ids), window):
            previous = [tok.bos_token_id] if start == 0 else [ids[start - 1]]
            total_logprob += float(logprobs(previous + ids[start:start + window]).sum())
        total_bytes += len(text.encode("utf-8"))
    bits_per_byte = -total_logprob / total_bytes / math.log(2)
    assert math.isclose(report["fuxi_valid_ppl_ru"]["bits_per_byte"], bits_per_byte, rel_tol=1e-5)


# ---- trajectory ----------------------------------------------------------------------------------------------

@pytest.mark.hf
def test_trajectory_evaluates_each_checkpoint_once(trained, capsys):
    """`fuxi eval --run`: both checkpoints into one table and a PNG per language over tokens seen; a second call
    evaluates only what is not cached (here: the checkpoint whose results were removed) and gets the same
    numbers; other settings (limit, dtype, shots) get another cache."""
    from fuxi.pretrain.evaluation.checkpoint_eval import EvalSettings

    args = ["--run", str(trained), "--languages", *LANGS, "--limit", "4", "--dtype", "float32", "--device", "cpu"]
    first = fuxi_eval(capsys, *args)
    assert [(c["step"], c["cached"]) for c in first["checkpoints"]] == [(4, False), (8, False)]
    for entry in first["checkpoints"]:
        state = json.loads((trained / "checkpoints" / entry["tag"] / "trainer_state.json").read_text())
        assert entry["tokens_seen"] == sum(state["tokens_per_language"].values()) > 0
    eval_dir = Path(first["eval_dir"])
    assert sorted(Path(p).name for p in first["plots"]) == ["ru.png", "zh.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in first["plots"])
    bpb = [c["report"]["summary"]["fuxi_valid_ppl"]["mean"] for c in first["checkpoints"]]
    assert bpb[1] < bpb[0]  # training lowers the held-out bits per byte

    (eval_dir / "step_00000008.json").unlink()
    second = fuxi_eval(capsys, *args)
    assert [(c["step"], c["cached"]) for c in second["checkpoints"]] == [(4, True), (8, False)]
    assert [c["report"]["rows"] for c in second["checkpoints"]] == [c["report"]["rows"] for c in first["checkpoints"]]
    settings = EvalSettings(languages=LANGS, limit=4, dtype="float32")
    tasks = resolve_tasks(settings.tasks, LANGS)
    assert settings.fingerprint(tasks) == first["fingerprint"]
    same = EvalSettings(languages=LANGS, limit=4, device="cpu", batch_size=2)  # auto is float32 on a CPU
    assert same.fingerprint(tasks) == first["fingerprint"]
    for other in (EvalSettings(languages=LANGS, limit=3, dtype="float32"),
                  EvalSettings(languages=LANGS, limit=4, dtype="bfloat16"),
                  EvalSettings(languages=LANGS, limit=4, dtype="float32", num_fewshot=1)):
        assert other.fingerprint(resolve_tasks(other.tasks, LANGS, other.num_fewshot)) != first["fingerprint"]


# ---- in-loop evaluation --------------------------------------------------------------------------------------

def eval_records(run_dir: Path) -> dict[int, dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == "eval"}


@pytest.mark.hf
@pytest.mark.slow
def test_in_loop_eval_is_logged_equals_fuxi_eval_and_leaves_training_unchanged(trained, data, capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = eval_records(trained)
    assert sorted(records) == [4, 8]
    offline = fuxi_eval(capsys, "--checkpoint", str(trained / "checkpoints" / "step_00000008"), "--languages",
                        *LANGS, "--limit", str(LIMIT), "--dtype", "float32", "--device", "cpu")
    for row in offline["rows"]:
        logged = records[8][row["benchmark"]][row["language"]]
        assert logged == {k: v for k, v in row["metrics"].items() if not k.endswith("_stderr")}
    for name, summary in offline["summary"].items():
        assert records[8][name][summary["metric"]] == summary["mean"]

    events = EventAccumulator(str(trained / "tensorboard")).Reload()
    assert "eval/fuxi_valid_ppl/bits_per_byte" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/fuxi_translation_choice/zh/acc")] == [4, 8]

    plain = tmp_path / "plain"
    cfg = eval_run_config(data, plain, logging={"eval_every_steps": None})
    run_pretrain(write_config(cfg, tmp_path / "plain.yaml"))
    assert not eval_records(plain)
    assert train_losses(plain) == train_losses(trained)  # bitwise: evaluation touched no RNG and no weight


@pytest.mark.hf
@pytest.mark.slow
def test_in_loop_eval_under_zero3_on_two_ranks(data, tmp_path, capsys):
    """ZeRO-3 shards the weights: every rank runs the evaluation in lockstep, rank 0 logs it; the result equals
    `fuxi eval` on the checkpoint written at the same step."""
    out = tmp_path / "zero3"
    cfg = eval_run_config(data, out, parallelism={"zero_stage": 3}, schedule={"total_steps": 4, "warmup_steps": 1,
                                                                              "global_batch": 4})
    run_pretrain(write_config(cfg, tmp_path / "zero3.yaml"), nproc=2)
    logged = eval_records(out)[4]
    offline = fuxi_eval(capsys, "--checkpoint", str(out / "checkpoints"), "--languages", *LANGS, "--limit",
                        str(LIMIT), "--dtype", "float32", "--device", "cpu")
    assert offline["source"] == "deepspeed"
    for row in offline["rows"]:
        assert logged[row["benchmark"]][row["language"]] == {k: v for k, v in row["metrics"].items()
                                                             if not k.endswith("_stderr")}


def test_in_loop_eval_needs_a_tokenizer(data, tmp_path):
    from fuxi.common.errors import ConfigError
    from fuxi.pretrain.config import load_train_config

    cfg = eval_run_config(data, tmp_path / "x", run={"tokenizer": None})
    with pytest.raises(ConfigError, match="logging.eval_every_steps: in-loop evaluation needs run.tokenizer"):
        load_train_config(None, data=cfg)
    cfg = eval_run_config(data, tmp_path / "x", logging={"eval_every_steps": 0})
    with pytest.raises(ConfigError, match="eval_every_steps: must be >= 1"):
        load_train_config(None, data=cfg)


# ---- bad input -----------------------------------------------------------------------------------------------



def fuxi_eval_error(capsys, *argv) -> str:
    from fuxi.launch.cli import main

    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.hf
def test_bad_input_gets_one_line_errors(trained, data, capsys, tmp_path):
    """Indexes the harness's own tasks once for this process (about 20 s), to know that a name is none of them."""
    from fuxi.common.errors import ConfigError
    from fuxi.pretrain.config import load_train_config
    from fuxi.pretrain.evaluation.harness import harness_task_names
    from fuxi.pretrain.evaluation.in_loop import check_eval_config

    common = ["--limit", "2", "--languages", "zh", "--dtype", "float32", "--device", "cpu"]

    message = fuxi_eval_error(capsys, "--checkpoint", str(trained / "final"), "--tasks", "no_such_task", *common)
    assert message.startswith("fuxi eval: error: --tasks: unknown task 'no_such_task'")
    assert resolve_tasks(["lambada_openai"], harness_task_names=harness_task_names)  # a real one
    cfg = load_train_config(None, data=eval_run_config(data, tmp_path / "run", logging={"eval_tasks": ["no_such"]}))
    with pytest.raises(ConfigError, match=r"logging.eval_tasks: --tasks: unknown task 'no_such'.* \(in <dict>\)$"):
        check_eval_config(cfg)  # pretrain/preflight.py runs it before anything loads

    bare = tmp_path / "bare"
    shutil.copytree(trained / "final", bare)
    shutil.rmtree(bare / "tokenizer")
    message = fuxi_eval_error(capsys, "--checkpoint", str(bare), *common)
    assert message == (f"fuxi eval: error: {bare}: no tokenizer/ beside the weights (the trainer stores it when "
                       "run.tokenizer is set); pass --tokenizer DIR, the tokenizer the model was trained with")
    report = fuxi_eval(capsys, "--checkpoint", str(bare), "--tokenizer", str(trained / "final" / "tokenizer"),
                       *common)
    assert report["rows"]

    message = fuxi_eval_error(capsys, "--checkpoint", str(tmp_path), *common)
    assert "not a checkpoint (no config.yaml of ours" in message
    message = fuxi_eval_error(capsys, "--checkpoint", str(trained), *common)
    assert message.endswith(f"a run directory; pass --checkpoint {trained / 'checkpoints'} (its latest checkpoint) "
                            f"or --run {trained} (every checkpoint)")

    remote = tmp_path / "remote"
    shutil.copytree(trained / "hf", remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="somebody_elses", auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    (remote / "config.json").write_text(json.dumps(config))
    message = fuxi_eval_error(capsys, "--checkpoint", str(remote), *common)
    assert "needs remote code (auto_map); fuxi eval never runs code from a checkpoint" in message


@pytest.mark.hf
def test_moe_checkpoint_and_its_remote_code_export(trained, capsys, tmp_path):
    """An upcycled MoE-LPR model computes the dense function (expert 0 is the dense FFN), so its scores equal the
    dense ones; its export (remote code) is evaluated through our importer without running that code, and
    equals the harness loading the export with trust_remote_code=True."""
    from fuxi.launch.cli import main

    # The dense checkpoint's tokenizer travels through upcycle and export: no --tokenizer anywhere.
    assert main(["upcycle", "--checkpoint", str(trained / "final"), "--experts", "3", "--top-k", "2",
                 "--out", str(tmp_path / "moe")]) == 0
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "moe"), "--out", str(tmp_path / "moe_hf"),
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    common = ["--languages", *LANGS, "--limit", "4", "--dtype", "float32", "--device", "cpu"]
    dense = fuxi_eval(capsys, "--checkpoint", str(trained / "final"), *common)
    moe = fuxi_eval(capsys, "--checkpoint", str(tmp_path / "moe"), *common)
    imported = fuxi_eval(capsys, "--checkpoint", str(tmp_path / "moe_hf"), *common)
    assert (moe["model_type"], imported["source"]) == ("fuxitranyu_moe", "hf-imported")
    assert_same_scores(by_task(moe), by_task(dense), rel=1e-5)
    assert_same_scores(by_task(imported), by_task(moe))
    assert_same_scores(by_task(imported), harness_scores(tmp_path / "moe_hf", 4, trust_remote_code=True), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.hf
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval is not installed (the lent GPU machine's image lacks it; `.whl/` does not carry it)")
def test_fuxi_eval_on_cuda(trained, capsys):
    """On a GPU `--dtype auto` is bfloat16; float32 on the GPU gives the CPU's numbers, bfloat16 close to them, and
    our checkpoint and its export agree in bfloat16 too."""
    common = ["--languages", *LANGS, "--limit", str(LIMIT)]
    cpu = by_task(fuxi_eval(capsys, "--checkpoint", str(trained / "final"), *common, "--device", "cpu",
                            "--dtype", "float32"))
    gpu32 = by_task(fuxi_eval(capsys, "--checkpoint", str(trained / "final"), *common, "--device", "cuda",
                              "--dtype", "float32"))
    bf16_report = fuxi_eval(capsys, "--checkpoint", str(trained / "final"), *common, "--device", "cuda")
    export_bf16 = by_task(fuxi_eval(capsys, "--checkpoint", str(trained / "hf"), *common, "--device", "cuda"))
    assert bf16_report["dtype"] == "bfloat16"
    for task, metrics in cpu.items():
        if "bits_per_byte" in metrics:
            assert math.isclose(gpu32[task]["bits_per_byte"], metrics["bits_per_byte"], rel_tol=1e-4)
            assert math.isclose(by_task(bf16_report)[task]["bits_per_byte"], metrics["bits_per_byte"], rel_tol=2e-2)
            assert math.isclose(export_bf16[task]["bits_per_byte"], metrics["bits_per_byte"], rel_tol=2e-2)
