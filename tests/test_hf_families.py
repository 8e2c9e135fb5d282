"""The Llama family through `convert from-hf` / `to-hf`: tiny random LlamaForCausalLM (GQA, llama3 RoPE scaling),
Qwen2ForCausalLM (q/k/v bias, tied embeddings) and MistralForCausalLM, built and saved (sharded) by transformers
itself; our model must give transformers' fp32 logits and greedy tokens, and so must the native class written
back. Fields the config cannot represent are refused, naming the field."""
import json

import pytest
import torch

from fuxi.checkpoints import CheckpointError, export_to_hf, import_from_hf, load_model
from fuxi.checkpoints.hf_import import load_hf_reference
from fuxi.model import ModelConfig, build_model
from fuxi.model.config import RopeScalingConfig
from hf_helpers import FAMILIES, VOCAB, greedy, randomize_biases, tiny_llama, token_ids

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from fuxi.data_pipeline.corpus import bundled_corpus
    from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(bundled_corpus() / "train", out, TokenizerConfig(vocab_size=VOCAB, max_docs_per_language=2,
                                                               model_max_length=4096))


@pytest.fixture(params=sorted(FAMILIES))
def saved(request, tmp_path, tokenizer_dir):
    """A random model of the family, its biases made nonzero (transformers inits them to 0), saved sharded."""
    torch.manual_seed(0)
    hf = randomize_biases(FAMILIES[request.param]()).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "hf" / name).write_bytes((tokenizer_dir / name).read_bytes())
    return request.param, hf, tmp_path


def _ids():
    return token_ids(80)


def _greedy(hf, ids):
    return greedy(hf, ids, n=12)


def test_from_hf_gives_transformers_logits_and_tokens(saved):
    family, hf, tmp = saved
    assert len(list((tmp / "hf").glob("model-*.safetensors"))) > 1  # sharded by transformers
    import_from_hf(tmp / "hf", tmp / "ours")
    ours = load_model(tmp / "ours").eval()
    c = ours.config
    assert c.family == family and c.mlp == "swiglu"
    assert c.kv_heads == hf.config.num_key_value_heads
    assert c.attention_bias == {"llama": "none", "qwen2": "qkv", "mistral": "none"}[family]
    assert c.tie_word_embeddings == (family == "qwen2")
    assert (c.rope_scaling is not None) == (family == "llama")
    assert (tmp / "ours" / "tokenizer" / "tokenizer.json").is_file()
    ids = _ids()
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
    assert (want - got).abs().max() <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), _greedy(hf, prompt))


def test_to_hf_writes_the_native_class_back(saved, monkeypatch):
    family, hf, tmp = saved
    import_from_hf(tmp / "hf", tmp / "ours")
    export_to_hf(tmp / "ours", tmp / "back", max_shard_bytes=100_000)
    config = json.loads((tmp / "back" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert not list((tmp / "back").glob("*.py"))
    back = load_hf_reference(tmp / "back")  # no remote code: auto_map is absent
    assert type(back) is type(hf)
    ids = _ids()
    with torch.no_grad():
        want, got = hf(ids).logits, back(ids).logits
    assert (want - got).abs().max() <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(_greedy(back, prompt), _greedy(hf, prompt))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp / "back", local_files_only=True)
    assert len(tokenizer) == VOCAB
    import_from_hf(tmp / "back", tmp / "again")  # and the round trip back to ours is exact
    again, first = load_model(tmp / "again"), load_model(tmp / "ours")
    assert again.config == first.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))


def test_rope_scalings_equal_transformers():
    """linear, dynamic (past max_position_embeddings) and llama3 RoPE against transformers' Llama."""
    for rope in ({"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}):
        torch.manual_seed(0)
        hf = tiny_llama(max_position_embeddings=32, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                        rope_scaling=dict(rope)).eval()
        ours = build_model(ModelConfig(family="llama", mlp="swiglu", attention_bias="none", mlp_bias=False,
                                       vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_layers=2,
                                       num_heads=4, max_seq_len=32, rms_norm_eps=1e-6,
                                       rope_scaling=RopeScalingConfig(**rope))).eval()
        ours.load_state_dict(hf.state_dict())
        ids = _ids()  # 80 positions: past 32, where dynamic NTK changes the base
        with torch.no_grad():
            assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5, rope["rope_type"]


def _edit(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family, fields, named", [
    ("mistral", {"sliding_window": 16}, "sliding_window 16"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     "rope_scaling.rope_type 'yarn'"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("mistral", {"attention_bias": True}, "attention_bias true"),
    ("qwen2", {"mlp_bias": True}, "mlp_bias true"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unrepresentable_fields_are_refused_naming_them(tmp_path, family, fields, named):
    torch.manual_seed(0)
    FAMILIES[family]().save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", **fields)
    with pytest.raises(CheckpointError) as err:
        import_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert named in str(err.value) and "\n" not in str(err.value)


def test_sliding_window_within_the_positions_is_accepted(tmp_path):
    """A window no shorter than max_position_embeddings never slides: Mistral-v0.1-style configs import."""
    torch.manual_seed(0)
    FAMILIES["mistral"]().save_pretrained(tmp_path / "hf")
    _edit(tmp_path / "hf", sliding_window=128)
    import_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert load_model(tmp_path / "ours").config.family == "mistral"
