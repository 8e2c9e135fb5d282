"""Hugging Face export/import: transformers loads the export offline with logits equal to ours; the round trip
is bitwise; imports accept MLP naming variants and padded vocabularies; bad checkpoints give clear errors."""
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import CheckpointError, export_to_hf, import_from_hf, load_model, save_model
from checkpoints.hf_import import load_hf_reference, map_hf_name
from checkpoints.sharded_safetensors import iter_tensors, shard_files
from tests.model_helpers import multilingual_ids, tiny_model

SHARD = 60_000  # bytes: forces several shards for the tiny model


@pytest.fixture
def exported(tmp_path):
    model = tiny_model(pad_vocab_multiple=128)
    save_model(model, tmp_path / "ours", max_shard_bytes=SHARD)
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", max_shard_bytes=SHARD)
    return model, tmp_path


def test_export_layout_matches_published_repo(exported):
    model, tmp = exported
    hf = tmp / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "fuxitranyu"
    assert config["architectures"] == ["FuxiTranyuForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fuxitranyu.FuxiTranyuForCausalLM"
    assert config["hidden_act"] == "gelu_fast" and config["attention_bias"] and not config["tie_word_embeddings"]
    for name in ("modeling_fuxitranyu.py", "configuration_fuxitranyu.py", "generation_config.json",
                 "model.safetensors.index.json"):
        assert (hf / name).is_file()
    assert len(shard_files(hf)) > 2
    names = {name for name, _ in iter_tensors(hf)}
    assert {"model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.bias", "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.bias", "model.norm.weight",
            "lm_head.weight"} <= names
    assert names == set(model.state_dict())


def test_transformers_loads_export_with_equal_logits(exported):
    model, tmp = exported
    reference = load_hf_reference(tmp / "hf")
    ids = multilingual_ids()
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = model(ids).logits.double()
        theirs = reference(ids).logits.double()
    assert (ours - theirs).abs().max().item() <= 1e-5
    kl = torch.nn.functional.kl_div(theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert kl[mask.bool()].mean().item() <= 1e-9


def test_transformers_generate_matches_our_greedy_decoding(exported):
    model, tmp = exported
    reference = load_hf_reference(tmp / "hf")
    prompt = multilingual_ids()[:, :8]
    ours = model.generate(prompt, max_new_tokens=8)
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False)
    assert torch.equal(ours, theirs)


def test_round_trip_ours_hf_ours_is_bitwise(exported):
    model, tmp = exported
    import_from_hf(tmp / "hf", tmp / "back", max_shard_bytes=SHARD)
    back = load_model(tmp / "back")
    # Runtime choices (kernel implementation) are not part of the HF config; the architecture is.
    assert dataclasses.replace(back.config, kernels=model.config.kernels) == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_bf16_export_casts_weights(tmp_path):
    save_model(tiny_model(), tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for _, t in iter_tensors(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _rewrite(hf_dir, rename, transform=lambda name, t: t):
    """Rewrite an exported single-file HF dir with renamed (and possibly transformed) tensors."""
    tensors = load_file(str(hf_dir / "model.safetensors"))
    save_file({rename(k): transform(k, v).contiguous() for k, v in tensors.items()},
              str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("up, down, conv1d", [("dense_h_to_4h", "dense_4h_to_h", False), ("fc1", "fc2", False),
                                              ("c_fc", "c_proj", True)])
def test_import_accepts_mlp_naming_variants(tmp_path, up, down, conv1d):
    model = tiny_model()
    save_model(model, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32")

    def rename(name):
        return name.replace("mlp.up_proj", f"mlp.{up}").replace("mlp.down_proj", f"mlp.{down}")

    def transpose_conv1d(name, t):
        return t.t() if conv1d and "mlp" in name and name.endswith("weight") else t

    _rewrite(tmp_path / "hf", rename, transpose_conv1d)
    assert map_hf_name(f"model.layers.3.mlp.{up}.weight") == ("model.layers.3.mlp.up_proj.weight", conv1d)
    import_from_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_import_accepts_padded_250752_style_embedding(tmp_path):
    """config.json says 300 tokens, the tensors have 384 rows (a multiple of 128), as in the 8B report."""
    model = tiny_model(pad_vocab_multiple=128)
    save_model(model, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("fuxi_vocab_size")
    config["vocab_size"] = 300
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    import_from_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back")
    assert back.config.vocab_size == 300 and back.config.padded_vocab_size == 384


def test_import_errors_list_missing_unexpected_and_misshaped(tmp_path):
    save_model(tiny_model(), tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors.pop("model.layers.1.self_attn.k_proj.bias")
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(256, 64)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        import_from_hf(tmp_path / "hf", tmp_path / "back")
    message = str(err.value)
    assert "missing 1: ['model.layers.1.self_attn.k_proj.bias']" in message
    assert "unexpected 1: ['model.layers.0.mlp.gate_proj.weight']" in message
    assert "model.norm.weight: expected (64,), found (65,)" in message
    assert not (tmp_path / "back").exists()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_model(tmp_path)
    save_model(tiny_model(), tmp_path / "ours")
    (tmp_path / "ours" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ours")
    save_model(tiny_model(), tmp_path / "gqa")
    export_to_hf(tmp_path / "gqa", tmp_path / "hf", dtype="float32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_key_value_heads"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_key_value_heads 2"):
        import_from_hf(tmp_path / "hf", tmp_path / "back")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "ckpt")

    def exploding_items():
        yield "model.embed_tokens.weight", torch.zeros(3)
        raise RuntimeError("disk full")

    from checkpoints.model_checkpoint import save_model_checkpoint

    with pytest.raises(RuntimeError, match="disk full"):
        save_model_checkpoint(exploding_items(), model.config, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


CONVERSION_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, threading
    import torch
    from checkpoints import export_to_hf
    from checkpoints.sharded_safetensors import shard_files

    def anon_rss():  # private memory only: the mmapped input shards are page cache, not a copy of the model
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_rss())
            done.wait(0.0005)

    src, out = sys.argv[1], sys.argv[2]
    before = anon_rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    export_to_hf(src, out, dtype="float32", max_shard_bytes=8_000_000)
    done.set()
    sampler.join()
    print(json.dumps({"peak_growth_bytes": peak[0] - before, "shards": len(shard_files(out))}))
""")


@pytest.mark.slow
def test_conversion_is_shard_by_shard_and_never_holds_the_whole_model(tmp_path):
    """A ~120 MB model converted in 8 MB shards: peak private memory grows by well under one model copy."""
    model = tiny_model(vocab_size=4096, hidden_size=512, num_heads=8, ffn_hidden_size=2048, num_layers=8)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_model(model, tmp_path / "ours", max_shard_bytes=8_000_000)
    del model
    result = subprocess.run([sys.executable, "-c", CONVERSION_MEMORY_SCRIPT, str(tmp_path / "ours"),
                             str(tmp_path / "hf")], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"conversion of {model_bytes / 1e6:.0f} MB in {report['shards']} shards: peak private memory growth "
          f"{report['peak_growth_bytes'] / 1e6:.1f} MB")
    assert report["shards"] >= 10
    assert report["peak_growth_bytes"] < 0.5 * model_bytes
