"""Typed YAML configs: unknown keys, wrong types and impossible values name the key and the file."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import (apply_overrides, check_choices, from_dict, load_config, parse_override,
                                      require_choice, to_dict)
from fuxi.model import ModelConfig, load_model_config


@dataclass
class Inner:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    name: str | None = None

    def validate(self):
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] | None = None


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_loads_nested_yaml_with_overrides(tmp_path):
    path = write(tmp_path, "steps: 5\ninner:\n  lr: 1e-4\nweights: {en: 1.0, zh: 2}\n")
    cfg = load_config(Outer, path, ["inner.betas=[0.8, 0.9]", "flag=true", "inner.name=x"])
    assert cfg == Outer(steps=5, flag=True, inner=Inner(lr=1e-4, betas=[0.8, 0.9], name="x"),
                        weights={"en": 1.0, "zh": 2.0})
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("text, overrides, fragment", [
    ("stepz: 5\n", [], "stepz"),
    ("inner:\n  lrr: 1\n", [], "inner.lrr"),
    ("steps: five\n", [], "steps: expected an integer"),
    ("flag: 1\n", [], "flag: expected true/false"),
    ("inner:\n  lr: -1\n", [], "inner.lr: must be > 0"),
    ("", ["inner.betas=3"], "inner.betas: expected a list"),
    ("", ["steps"], "expected key=value"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, overrides, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert fragment in str(err.value)
    if "key=value" not in fragment:
        assert str(path) in str(err.value)


def test_the_error_carries_the_key_and_the_file_as_fields(tmp_path):
    path = write(tmp_path, "inner:\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, ["steps=3"])
    assert (err.value.key, err.value.reason) == ("inner.lr", "must be > 0, got -1.0")
    assert err.value.source == f"{path} with --set steps=3"
    assert str(err.value) == f"inner.lr: must be > 0, got -1.0 (in {path} with --set steps=3)"
    nested = ConfigError("seq_len", "too long").under("data.").within("run.yaml")
    assert (nested.key, nested.source) == ("data.seq_len", "run.yaml")
    assert str(nested) == "data.seq_len: too long (in run.yaml)"
    assert ConfigError("a", "b", "first.yaml").within("second.yaml").source == "first.yaml"


@dataclass
class Choosy:
    mode: Literal["fast", "exact"] = "fast"
    maybe: Literal["a", "b"] | None = None


@dataclass
class Numbered:
    stage: Literal[0, 1, 2, 3] = 0


def test_literal_fields_are_checked_when_loaded_and_when_built_in_code():
    assert from_dict(Choosy, {"mode": "exact", "maybe": "b"}) == Choosy("exact", "b")
    with pytest.raises(ConfigError, match=r"^mode: 'slow' is not one of \['fast', 'exact'\]"):
        from_dict(Choosy, {"mode": "slow"})
    check_choices(Choosy("exact"))
    with pytest.raises(ConfigError) as err:
        check_choices(Choosy(mode="slow"))
    assert (err.value.key, err.value.reason) == ("mode", "'slow' is not one of ['fast', 'exact']")
    with pytest.raises(ConfigError, match="maybe: 'c' is not one of"):
        check_choices(Choosy(maybe="c"))
    with pytest.raises(ConfigError, match="stage: True is not one of"):  # YAML true is not the choice 1
        from_dict(Numbered, {"stage": True})
    assert from_dict(Numbered, {"stage": 1}).stage == 1


def test_a_choice_argument_names_its_key_and_the_choices():
    require_choice("impl", "torch", Literal["torch", "triton"])
    require_choice("form", "pairs", ("multi", "pairs"))
    with pytest.raises(ConfigError) as err:
        require_choice("impl", "cuda", Literal["torch", "triton"])
    assert str(err.value) == "impl: 'cuda' is not one of ['torch', 'triton']"
    with pytest.raises(ConfigError, match="level: True is not one of"):
        require_choice("level", True, (0, 1))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "steps: [1,\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"))


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_shipped_model_configs_load():
    full = load_model_config("configs/model/fuxitranyu-8b.yaml")
    assert (full.num_layers, full.hidden_size, full.num_heads, full.ffn_hidden_size) == (30, 4096, 32, 16384)
    assert full.vocab_size == 250_680 and full.rope_theta == 1e4 and full.rms_norm_eps == 1e-5
    assert load_model_config("configs/model/fuxitranyu-tiny.yaml").hidden_size == 128


@pytest.mark.parametrize("overrides, fragment", [
    (["num_heads=31"], "num_heads: 31 does not divide hidden_size 4096"),
    (["hidden_size=0"], "hidden_size: must be >= 1, got 0"),
    (["kernels=cuda"], "kernels: 'cuda' is not one of"),
    (["type=mamba"], "type: unknown model type 'mamba'"),
    (["eos_token_id=250680"], "eos_token_id: 250680 is outside the vocabulary"),
    (["attention_dropout=1.5"], "attention_dropout"),
    (["num_layers=2.5"], "num_layers: expected an integer"),
])
def test_impossible_model_values(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_model_config("configs/model/fuxitranyu-8b.yaml", overrides)
    assert fragment in str(err.value)
    assert "configs/model/fuxitranyu-8b.yaml" in str(err.value)


def test_vocab_smaller_than_tokenizer_is_an_error():
    config = ModelConfig(vocab_size=1000)
    config.check_tokenizer(1000)
    with pytest.raises(ConfigError, match="vocab_size: 1000 is smaller than the tokenizer's 1024 tokens"):
        config.check_tokenizer(1024)


def test_run_config_takes_the_model_of_a_checkpoint(tmp_path):
    """`--set model=<checkpoint>/config.yaml` (the model under `model:`) applies before the other overrides, so
    `--set model.moe.x=...` edits the checkpoint's model; a model YAML named in the file still works."""
    import yaml

    from fuxi.pretrain.config import load_train_config

    moe = {"type": "fuxitranyu_moe", "family": "llama", "mlp": "swiglu", "attention_bias": "none",
           "mlp_bias": False, "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
           "ffn_hidden_size": 48, "max_seq_len": 16, "moe": {"num_experts": 3, "top_k": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": moe}))
    run = {"stage": "pretrain", "model": {"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2},
           "data": {"train_manifest": "unused", "seq_len": 16}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    cfg = load_train_config(tmp_path / "run.yaml", ["model.moe.balance_loss_coef=0.05",
                                                    f"model={tmp_path / 'config.yaml'}"])
    assert (cfg.model.family, cfg.model.num_kv_heads, cfg.model.moe.num_experts) == ("llama", 2, 3)
    assert cfg.model.moe.balance_loss_coef == 0.05
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**run, "model": "config.yaml"}))
    assert load_train_config(tmp_path / "run.yaml").model.family == "llama"
    with pytest.raises(ConfigError, match="model: nowhere.yaml not found"):
        load_train_config(tmp_path / "run.yaml", ["model=nowhere.yaml"])
