"""Hugging Face export/import: transformers loads the export offline (the native layout with no remote code) with
logits equal to ours and to an independent float64 forward; the round trip is bitwise; imports accept MLP naming
and layout variants and padded vocabularies; anything that is not FuxiTranyu is refused, naming the field."""
import builtins
import dataclasses
import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuxi.checkpoints import CheckpointError, export_to_hf, import_from_hf, load_model, save_model
from fuxi.checkpoints.hf_import import load_hf_reference, map_hf_name
from fuxi.checkpoints.sharded_safetensors import iter_tensors, shard_files
from model_helpers import multilingual_ids, tiny_model

pytestmark = pytest.mark.hf

SHARD = 60_000  # bytes: forces several shards for the tiny model


@pytest.fixture(params=["native", "tjunlp"])
def exported(request, tmp_path):
    model = tiny_model(pad_vocab_multiple=128)
    save_model(model, tmp_path / "ours", max_shard_bytes=SHARD)
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", max_shard_bytes=SHARD,
                 layout=request.param)
    return model, tmp_path


def test_native_export_is_plain_transformers(tmp_path, monkeypatch):
    model = tiny_model(pad_vocab_multiple=128)
    save_model(model, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf")  # the default layout
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "arcee" and config["architectures"] == ["ArceeForCausalLM"]
    assert "auto_map" not in config and not list(hf.glob("*.py"))
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["attention_bias"] and config["mlp_bias"]
    assert not config["tie_word_embeddings"] and config["head_dim"] == 16

    def no_prompt(*args, **kwargs):
        raise AssertionError("transformers asked to run remote code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)  # no trust_remote_code
    assert type(loaded).__name__ == "ArceeForCausalLM"


def test_tjunlp_export_layout_matches_published_repo(tmp_path):
    model = tiny_model(pad_vocab_multiple=128)
    save_model(model, tmp_path / "ours", max_shard_bytes=SHARD)
    export_to_hf(tmp_path / "ours", tmp_path / "hf", max_shard_bytes=SHARD, layout="tjunlp")
    hf = tmp_path / "hf"
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


def test_exported_files_are_readable_like_any_other_file(exported):
    _, tmp = exported
    plain = tmp / "plain-file"
    plain.write_text("x")
    expected = stat.S_IMODE(os.stat(plain).st_mode)
    for path in (tmp / "hf").iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path.name


def float64_forward(state: dict, config, ids: torch.Tensor) -> torch.Tensor:
    """FuxiTranyu written out from docs/methods.md §1.3 in float64, from the state dict alone (independent of both
    our model and transformers): pre-RMSNorm, biased MHA with rotate-half RoPE, tanh-GELU MLP, untied head."""
    w = {k: v.double() for k, v in state.items()}
    h, heads, eps = config.hidden_size, config.num_heads, config.rms_norm_eps
    d = h // heads
    seq = ids.shape[1]

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(config.num_layers):
        p = f"model.layers.{i}."

        def lin(name, inp):
            return inp @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        a = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (lin(f"self_attn.{n}_proj", a).view(*a.shape[:2], heads, d).transpose(1, 2) for n in "qkv")
        scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(d)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + lin("self_attn.o_proj", attn.transpose(1, 2).reshape(*a.shape))
        m = lin("mlp.up_proj", norm(x, w[p + "post_attention_layernorm.weight"]))
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m.pow(3))))
        x = x + lin("mlp.down_proj", m)
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_transformers_loads_export_with_logits_equal_ours_and_a_float64_reference(exported):
    model, tmp = exported
    reference = load_hf_reference(tmp / "hf")
    ids = multilingual_ids()
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = model(ids).logits.double()
        theirs = reference(ids).logits.double()
    exact = float64_forward(model.state_dict(), model.config, ids)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (theirs - exact).abs().max().item() <= 1e-5
    assert (ours - exact).abs().max().item() <= 1e-5
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


def test_transformers_loss_from_unshifted_labels_equals_ours(exported):
    """transformers' convention: the model shifts `labels` itself; ours takes them shifted, -100 past the end."""
    model, tmp = exported
    reference = load_hf_reference(tmp / "hf")
    ids = multilingual_ids()
    labels = ids.masked_fill(ids == 0, -100)  # padding is ignored on both sides
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids, labels=labels).loss, model(ids, labels=shifted).loss)


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
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype="auto")
    assert loaded.dtype == torch.bfloat16


def _rewrite(hf_dir, rename, transform=lambda name, t: t):
    """Rewrite an exported single-file HF dir with renamed (and possibly transformed) tensors."""
    tensors = load_file(str(hf_dir / "model.safetensors"))
    save_file({rename(k): transform(k, v).contiguous() for k, v in tensors.items()},
              str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("transposed", [False, True], ids=["linear-layout", "conv1d-layout"])
@pytest.mark.parametrize("up, down", [("up_proj", "down_proj"), ("dense_h_to_4h", "dense_4h_to_h"),
                                      ("fc1", "fc2"), ("c_fc", "c_proj")])
def test_import_accepts_either_mlp_layout_under_any_naming(tmp_path, up, down, transposed):
    """The FFN is wider than the hidden size, so each matrix's shape says whether it is stored [out, in]
    (nn.Linear) or [in, out] (GPT-2 Conv1D), whatever its name."""
    model = tiny_model()
    save_model(model, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", layout="tjunlp")

    def rename(name):
        return name.replace("mlp.up_proj", f"mlp.{up}").replace("mlp.down_proj", f"mlp.{down}")

    def store(name, t):
        return t.t() if transposed and ".mlp." in name and name.endswith("weight") else t

    _rewrite(tmp_path / "hf", rename, store)
    assert map_hf_name(f"model.layers.3.mlp.{up}.weight")[0] == "model.layers.3.mlp.up_proj.weight"
    import_from_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def _edit_config(hf_dir, **fields):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(fields)
    (hf_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fields, named", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"hidden_act": "silu"}, "hidden_act 'silu'"),
    ({"hidden_act": "relu2"}, "hidden_act 'relu2'"),
    ({"mlp_bias": False}, "mlp_bias false"),
    ({"attention_bias": False}, "attention_bias false"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings true"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type 'yarn'"),
    ({"head_dim": 8}, "head_dim 8"),
])
def test_import_refuses_other_architectures_naming_the_field(tmp_path, fields, named):
    save_model(tiny_model(), tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf")
    _edit_config(tmp_path / "hf", **fields)
    with pytest.raises(CheckpointError, match="config.json: " + named.replace("(", r"\(")):
        import_from_hf(tmp_path / "hf", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_import_reads_a_llama_convention_directory(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf")
    _edit_config(tmp_path / "hf", model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="gelu_new")
    import_from_hf(tmp_path / "hf", tmp_path / "back")
    assert torch.equal(load_model(tmp_path / "back").lm_head.weight, model.lm_head.weight)


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

    from fuxi.checkpoints.model_checkpoint import save_model_checkpoint

    with pytest.raises(RuntimeError, match="disk full"):
        save_model_checkpoint(exploding_items(), model.config, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


CONVERSION_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, threading
    import torch
    from fuxi.checkpoints import export_to_hf
    from fuxi.checkpoints.sharded_safetensors import shard_files

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
