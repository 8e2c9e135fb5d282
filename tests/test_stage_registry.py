"""The stage registry (pretrain/stages/): a stage defined here, outside the package, with its own config section,
checks, data, trainable parameters and loss, registered from this test, trains through the unchanged trainer,
config loader and preflight: its loss is what the trainer logs (against torch's label-smoothed cross-entropy on
the same batches and initial weights), its frozen parameters stay put, its data resumes exactly, and its
section's errors name the key and the file. The built-in stages resolve lazily by name."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import require_at_least
from fuxi.kernels import IGNORE_INDEX
from fuxi.pretrain.config import load_train_config
from fuxi.pretrain.stages import BUILT_IN, known_stages, register_stage, stage_named
from fuxi.pretrain.stages.base import Stage, StepLoss
from trainer_helpers import REPO, subprocess_env, train_losses

SEQ_LEN, VOCAB = 16, 64


@dataclass
class CountingConfig:
    stride: int = 3  # each token is the previous one + stride (mod the vocabulary)
    label_smoothing: float = 0.1

    def validate(self) -> None:
        require_at_least(self, 1, "stride")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


class CountingLoader:
    """Endless batches of counting sequences, one language. Sample g (a global position; rank r reads r, r + R,
    ...) starts at token 5g mod V; the first half of each row is context (label ignored). State: batches read."""

    languages = ["counting"]
    bytes_per_token: dict = {}

    def __init__(self, stride: int, batch_size: int, rank: int, world_size: int):
        self.stride, self.batch_size, self.rank, self.world_size = stride, batch_size, rank, world_size
        self.batches = 0
        self.tokens_seen = torch.zeros(1, dtype=torch.int64)

    def batch_at(self, index: int) -> dict:
        first = index * self.batch_size
        positions = torch.tensor([self.rank + self.world_size * k for k in range(first, first + self.batch_size)])
        tokens = (5 * positions[:, None] + self.stride * torch.arange(SEQ_LEN + 1)) % VOCAB
        labels = tokens[:, 1:].clone()
        labels[:, :SEQ_LEN // 2] = IGNORE_INDEX
        return {"input_ids": tokens[:, :-1], "labels": labels, "lang_ids": torch.zeros_like(labels)}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "tokens_seen": self.tokens_seen.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.tokens_seen = state["batches"], torch.tensor(state["tokens_seen"])

    def __iter__(self):
        while True:
            batch = self.batch_at(self.batches)
            self.batches += 1
            self.tokens_seen += batch["input_ids"].numel()
            yield batch


@register_stage
class CountingStage(Stage):
    """Label-smoothed next-token loss on counting sequences; the input embedding stays frozen."""

    name = "test_counting"
    config_key, config_class = "counting", CountingConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.stage_config.stride >= cfg.model.vocab_size:
            raise ConfigError("counting.stride", f"must be below model.vocab_size {cfg.model.vocab_size}")

    @classmethod
    def config_paths(cls, cfg) -> list:
        return []  # reads no file: data.train_manifest is not checked

    @classmethod
    def train_loader(cls, cfg, rank: int, world_size: int) -> CountingLoader:
        return CountingLoader(cfg.stage_config.stride, cfg.parallelism.micro_batch, rank, world_size)

    def __init__(self, cfg, languages: list[str]):
        super().__init__(cfg, languages)
        self.window: list[torch.Tensor] = []
        self.final_loss = None

    def configure(self, model: torch.nn.Module) -> None:
        model.model.embed_tokens.weight.requires_grad_(False)

    def compute_loss(self, engine, batch: dict) -> StepLoss:
        out = engine(batch["input_ids"], return_logits=True)
        log_probs = out.logits.float().log_softmax(-1)
        labels = batch["labels"]
        counted = labels != IGNORE_INDEX
        nll = -log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        eps = self.cfg.stage_config.label_smoothing
        token_losses = ((1 - eps) * nll - eps * log_probs.mean(-1)) * counted
        loss = token_losses.sum() / counted.sum()
        self.window.append(loss.detach())
        return StepLoss(loss, (nll * counted).sum().detach() / counted.sum(), token_losses)

    def log_metrics(self) -> dict:
        mean = float(torch.stack(self.window).mean())
        self.window = []
        self.final_loss = mean
        return {"counting/smoothed_loss": mean}

    def end_of_run(self, engine, val_batches: dict, out_dir, ctx) -> dict:
        return {"counting/final_smoothed_loss": self.final_loss}


def counting_config(out, **sections) -> dict:
    cfg = {
        "stage": "test_counting",
        "counting": {"stride": 3, "label_smoothing": 0.1},
        "model": {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64,
                  "max_seq_len": SEQ_LEN, "kernels": "torch"},
        "data": {"train_manifest": "/nowhere/the stage brings its own data", "seq_len": SEQ_LEN, "num_workers": 0},
        "optimizer": {"lr": 1e-2},
        "schedule": {"total_steps": 4, "warmup_steps": 1, "global_batch": 4},
        "parallelism": {"zero_stage": 1, "micro_batch": 2, "precision": "fp32"},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "logging": {"every_steps": 1, "val_batches_per_language": 0, "tensorboard": False},
        "run": {"output_dir": str(out), "seed": 7, "export_final": True},
    }
    cfg.update(sections)
    return cfg


def records(out, kind: str) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_a_stage_registered_outside_the_package_trains_through_the_unchanged_trainer(tmp_path):
    from fuxi.checkpoints.sharded_safetensors import iter_tensors
    from fuxi.model import build_model
    from fuxi.pretrain.trainer import train

    out = tmp_path / "run"
    cfg = load_train_config(None, data=counting_config(out))
    assert isinstance(cfg.stage_config, CountingConfig) and cfg.stage_config.stride == 3
    result = train(cfg)
    assert result.step == 4 and not result.preempted

    # Step 1 is the stage's loss on its first two micro-batches at the initial weights (run.seed), computed here
    # with torch's own label-smoothed cross-entropy.
    torch.manual_seed(7)
    initial = build_model(cfg.model)
    loader = CountingLoader(3, 2, rank=0, world_size=1)
    smoothed, plain = [], []
    with torch.no_grad():
        for batch in (loader.batch_at(0), loader.batch_at(1)):
            logits = initial(batch["input_ids"]).logits.flatten(0, 1)
            smoothed.append(F.cross_entropy(logits, batch["labels"].flatten(), label_smoothing=0.1))
            plain.append(F.cross_entropy(logits, batch["labels"].flatten()))
    train_records = records(out, "train")
    first = train_records[0]
    assert first["counting/smoothed_loss"] == pytest.approx(float(sum(smoothed) / 2), rel=1e-5)
    assert first["loss"] == pytest.approx(float(sum(plain) / 2), rel=1e-5)
    assert train_records[-1]["tokens_per_language"] == {"counting": 4 * 4 * SEQ_LEN}
    assert records(out, "stage")[-1] == {"kind": "stage", "step": 4, "stage": "test_counting",
                                         "counting/final_smoothed_loss": train_records[-1]["counting/smoothed_loss"]}

    # What the stage froze did not move; the rest trained.
    final = dict(iter_tensors(out / "final"))
    start = initial.state_dict()
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        assert not torch.equal(final[name], start[name]), name

    # The stage's data resumes where the checkpoint left it: steps 3-4 again from step 2 give the same losses.
    reference = train_losses(out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    (out / "metrics.jsonl").unlink()
    train(cfg)
    resumed = train_losses(out)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == reference[s] for s in (3, 4))


@pytest.mark.parametrize("section, message", [
    ({"counting": {"stride": 0}}, "counting.stride: must be >= 1, got 0 (in <dict>)"),
    ({"counting": {"stride": VOCAB}}, f"counting.stride: must be below model.vocab_size {VOCAB} (in <dict>)"),
    ({"counting": {"strides": 2}}, "counting.strides: unknown key"),
    ({"stage": "test_countin"}, "stage: 'test_countin' is not one of"),
])
def test_the_stage_section_and_name_are_checked_when_the_config_loads(tmp_path, section, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(None, data=counting_config(tmp_path, **section))
    assert str(err.value).startswith(message)
    if "stage" in section:
        assert "test_counting" in str(err.value)  # the registered stage is among the known ones


def test_registered_names_are_unique():
    class Shadow(CountingStage):
        name = "pretrain"

    with pytest.raises(ValueError, match="'pretrain' exists already"):
        register_stage(Shadow)
    assert register_stage(CountingStage) is CountingStage  # registering the same class again is harmless
    assert set(BUILT_IN) < set(known_stages())


def test_built_in_stages_resolve_by_name_and_load_only_when_named():
    for name in BUILT_IN:
        stage = stage_named(name)
        assert issubclass(stage, Stage) and stage.name == name
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from fuxi.pretrain.config import load_train_config; "
         "load_train_config('configs/train/quickstart.yaml'); "
         "print(sorted(m for m in sys.modules if m.startswith('fuxi.pretrain.stages.')))"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "['fuxi.pretrain.stages.base', 'fuxi.pretrain.stages.pretrain']"
