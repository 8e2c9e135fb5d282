"""In-loop evaluation inside the trainer: the checkpoint due at a step is written before that step's evaluation
(which may fail), the harness's tasks are built once per run, and a task that generates text is refused before
anything loads."""
from __future__ import annotations

import pytest
import torch

from fuxi.launch.cli import main as fuxi
from fuxi.pretrain.config import load_train_config
from trainer_helpers import run_config, tiny_training_dataset, write_config

LANGS = ["zh", "ru"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def eval_config(data, out, **logging) -> dict:
    return run_config(data, out, run={"output_dir": str(out), "seed": 7, "tokenizer": str(data.tokenizer_dir)},
                      logging={"every_steps": 1, "val_every_steps": 1000, "val_batches_per_language": 0,
                               "tensorboard": False, "eval_every_steps": 4, "eval_languages": LANGS,
                               "eval_limit": 4, "eval_batch_size": 4, **logging})


def test_an_evaluation_that_fails_does_not_lose_the_checkpoint_of_its_step(data, tmp_path, monkeypatch):
    from fuxi.pretrain.evaluation.in_loop import InLoopEvaluator
    from fuxi.pretrain.trainer import train

    def failing(self, step):
        raise RuntimeError(f"evaluation at step {step} failed")

    monkeypatch.setattr(InLoopEvaluator, "run", failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation at step 4 failed"):
        train(load_train_config(None, data=eval_config(data, out)))
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert (checkpoints / "step_00000004" / "COMPLETE").is_file()


def test_in_loop_evaluator_builds_the_tasks_once_and_scores_the_same_each_time(data, tmp_path, monkeypatch):
    """Two evaluations of the same weights: the harness builds each task (reading its local data) once, and the
    reused tasks score exactly what freshly built ones do (the few-shot sampler is re-seeded)."""
    from lm_eval.tasks import TaskManager

    from fuxi.model import build_model
    from fuxi.pretrain.distributed import DistributedContext
    from fuxi.pretrain.evaluation.harness import build_report, evaluate
    from fuxi.pretrain.evaluation.in_loop import InLoopEvaluator

    cfg = load_train_config(None, data=eval_config(data, tmp_path / "run"))
    model = build_model(cfg.model)
    load_spec, built = TaskManager._load_spec, []
    monkeypatch.setattr(TaskManager, "_load_spec", lambda self, spec: (built.append(spec), load_spec(self, spec))[1])
    evaluator = InLoopEvaluator(cfg, type("Engine", (), {"module": model})(),
                                DistributedContext(0, 1, 0, torch.device("cpu")))
    first, second = evaluator.run(4), evaluator.run(8)
    names = [t.name for t in evaluator.tasks]
    assert sorted(built) == sorted(names) and len(names) == 4  # 2 benchmarks x 2 languages, each built once
    assert first["rows"] == second["rows"]
    fresh = build_report(evaluate(evaluator._harness_lm(), evaluator.tasks, cfg.logging.eval_limit,
                                  environment_info=False), evaluator.tasks)
    assert fresh["rows"] == first["rows"]


GENERATING_TASK = """task: fuxi_test_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: never_read.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
"""


@pytest.mark.parametrize("name", ["fuxi_test_generate", "fuxi_test_group"])
def test_a_task_that_generates_text_is_refused_before_anything_loads(data, tmp_path, capsys, monkeypatch, name):
    """Our checkpoints do not generate through the harness: a generate_until task, named directly or through a
    group, is refused from its YAML by the preflight (exit 2, one line naming the key), before data or engine."""
    from lm_eval.tasks import TaskManager

    import fuxi.pretrain.evaluation.harness as harness
    from fuxi.pretrain.evaluation.local_tasks import TASKS_DIR

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "generate.yaml").write_text(GENERATING_TASK)
    (tasks / "group.yaml").write_text("group: fuxi_test_group\ntask:\n  - fuxi_test_generate\n")
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tasks)], include_defaults=False)
    monkeypatch.setattr(harness, "task_manager", lambda with_harness_tasks: manager)  # instead of the 20 s index
    out = tmp_path / "run"
    config = write_config(eval_config(data, out, eval_tasks=[name]), tmp_path / "run.yaml")
    capsys.readouterr()
    assert fuxi(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fuxi pretrain: error: logging.eval_tasks: --tasks: fuxi_test_generate generates text, "
                          "which our checkpoints do not through the harness") and "\n" not in err
    assert f"(in {config})" in err and not out.exists()
