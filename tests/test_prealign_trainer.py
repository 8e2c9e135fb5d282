"""The prealign_init stage end to end through `fuxi pretrain` (DeepSpeed on CPU): it trains on the shipped
table, logs the alignment loss, reports per-layer alignment and exports the weights stage 2 starts from; stage 2
(pretrain with code-switching) starts from them; 2 torchrun ranks give the 1-process loss (checklist 3.8.5,
3.8.7). The shipped run configs load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuxi.common.errors import ConfigError
from fuxi.pretrain.config import load_train_config
from trainer_helpers import REPO, run_config, run_pretrain, tiny_training_dataset, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def toy_table(data, path: Path, concepts: int = 30) -> Path:
    """Pairs of distinct one-token words of the tiny tokenizer: a dictionary a few steps can align (the shipped
    table's words are long byte sequences for a 512-token vocabulary)."""
    from fuxi.data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(data.tokenizer_dir)
    words = sorted(t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha())
    assert len(words) >= 2 * concepts
    with open(path, "w", encoding="utf-8") as f:
        for i in range(concepts):
            f.write(json.dumps({"src_text": words[2 * i], "tgt_text": words[2 * i + 1], "src_lang": "en",
                                "tgt_lang": "ru"}) + "\n")
    return path


def prealign_config(data, out_dir: Path, micro_batch: int = 16, steps: int = 12, table: Path | None = None) -> dict:
    return run_config(data, out_dir, stage="prealign_init",
                      prealign={"temperature": 0.1, "alpha": 0.1, "max_word_tokens": 12, "report_concepts": 128,
                                "table": str(table) if table else None},
                      optimizer={"lr": 5e-3},
                      schedule={"total_steps": steps, "warmup_steps": 2, "global_batch": 16},
                      parallelism={"zero_stage": 1, "micro_batch": micro_batch, "precision": "fp32"},
                      checkpoint={"every_steps": 100, "keep_last": 1},
                      run={"output_dir": str(out_dir), "seed": 7, "export_final": True,
                           "tokenizer": str(data.tokenizer_dir)})


def records(out_dir: Path, kind: str) -> list[dict]:
    with open(out_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.slow
def test_prealign_init_then_codeswitched_pretraining(data, tmp_path):
    init_dir = tmp_path / "init"
    cfg = prealign_config(data, init_dir, steps=16, table=toy_table(data, tmp_path / "table.jsonl"))
    run_pretrain(write_config(cfg, tmp_path / "init.yaml"))
    train = records(init_dir, "train")
    align = [r["align/loss"] for r in train]
    assert len(align) == 16 and all(f"align/loss/layer {i}" in train[0] for i in (1, 2))
    assert sum(align[-4:]) / 4 < 0.7 * sum(align[:4]) / 4
    report = json.loads((init_dir / "alignment_report.json").read_text())
    before, after = report["before"], report["after"]
    assert after["spaces"] == ["embedding", "layer 1", "layer 2", "output embedding"]
    assert all(gap > 0.1 for gap in after["gap"]), after
    assert all(a > b + 0.1 for a, b in zip(after["gap"], before["gap"])), report
    assert (init_dir / "alignment_per_layer.png").stat().st_size > 0
    stage = records(init_dir, "stage")[-1]
    assert stage["stage"] == "prealign_init" and stage["align/gap/layer 2"] == after["gap"][2]
    assert (init_dir / "final").is_dir()

    # stage 2: LM pretraining from the aligned weights with code-switching (the pipeline of checklist 3.8.7)
    lm_dir = tmp_path / "lm"
    cfg = run_config(data, lm_dir, data={"codeswitch_ratio": 0.05},
                     checkpoint={"every_steps": 100, "keep_last": 1, "init_from": str(init_dir / "final")},
                     schedule={"total_steps": 4, "warmup_steps": 1, "global_batch": 4})
    result = run_pretrain(write_config(cfg, tmp_path / "lm.yaml"))
    assert "code-switching: ratio 0.050" in result.stdout + result.stderr
    losses = [r["loss"] for r in records(lm_dir, "train")]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)


@pytest.mark.slow
def test_two_ranks_log_the_single_process_alignment_loss(data, tmp_path):
    """The same global batch of 16 entries: 1 process x 16 or 2 gloo ranks x 8, negatives gathered across ranks."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_pretrain(write_config(prealign_config(data, one, micro_batch=16, steps=3), tmp_path / "one.yaml"))
    run_pretrain(write_config(prealign_config(data, two, micro_batch=8, steps=3), tmp_path / "two.yaml"), nproc=2)
    a, b = records(one, "train"), records(two, "train")
    for ra, rb in zip(a, b):
        assert ra["align/loss"] == pytest.approx(rb["align/loss"], rel=1e-4, abs=1e-5), (ra["step"], ra, rb)
    assert a[0]["align/loss"] == pytest.approx(b[0]["align/loss"], rel=1e-6)


def test_shipped_prealign_configs_load_and_zero3_is_refused(data, tmp_path):
    init = load_train_config(REPO / "configs/train/prealign-init.yaml")
    assert init.stage == "prealign_init" and init.stage_config.temperature == 0.1 and init.stage_config.alpha == 0.1
    assert init.schedule.global_batch == init.parallelism.micro_batch  # the contrastive batch is the global batch
    stage2 = load_train_config(REPO / "configs/train/prealign-pretrain.yaml")
    assert stage2.data.codeswitch_ratio == 0.05 and stage2.checkpoint.init_from == "runs/prealign-init/final"
    cfg = prealign_config(data, tmp_path)
    cfg["parallelism"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match="zero_stage"):
        load_train_config(None, data=cfg)
    cfg["parallelism"]["zero_stage"] = 1
    for key, value, field in [("alpha_weights", "both", "alpha_weights"), ("words_per_entry", 1, "words_per_entry"),
                              ("temperature", 0.0, "temperature")]:
        bad = json.loads(json.dumps(cfg))
        bad["prealign"][key] = value
        with pytest.raises(ConfigError, match=field):
            load_train_config(None, data=bad)
