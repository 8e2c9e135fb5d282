"""The upcycled FuxiTranyu-MoE model (docs/methods.md §2.9 items 1-4, 11): function preservation, expert 0, stage
freezing under a real optimizer step, parameter accounting, `fuxi upcycle`, router statistics and their plot."""
import dataclasses

import pytest
import torch

from fuxi.checkpoints import load_model, save_model
from fuxi.launch.cli import main as fuxi
from fuxi.model import build_model
from fuxi.model.config import MoEConfig
from fuxi.model.moe_stats import plot_router_shares, router_statistics
from fuxi.model.upcycle import (stage1_trainable, stage1_trainable_count, stage2_trainable, upcycle_config,
                           upcycle_model)
from model_helpers import multilingual_ids, tiny_config, tiny_model

N, K = 4, 2


def upcycled(layers=None, top_k=K, **moe):
    dense = tiny_model(num_layers=3)
    return dense, upcycle_model(dense, MoEConfig(num_experts=N, top_k=top_k, layers=layers, **moe), seed=1)


def ffn_size(config) -> int:
    h, f = config.hidden_size, config.ffn_hidden_size
    return 2 * h * f + f + h


# ---- item 1: function preservation ------------------------------------------------------------------------

@pytest.mark.parametrize("layers, top_k", [(None, 2), ([0, 2], 3)])
def test_upcycled_logits_equal_dense(layers, top_k):
    dense, moe = upcycled(layers, top_k)
    ids = multilingual_ids()
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert [type(b.mlp).__name__ for b in moe.model.layers] == (["MoEFeedForward"] * 3 if layers is None
                                                                else ["MoEFeedForward", "MLP", "MoEFeedForward"])


def test_partially_upcycled_swiglu_model_keeps_its_gated_dense_layers():
    """A Llama-family model upcycled in some layers: the layers left dense stay SwiGLU (gate/up/down)."""
    dense = tiny_model(num_layers=3, family="llama", mlp="swiglu", attention_bias="none", mlp_bias=False,
                       num_kv_heads=2)
    moe = upcycle_model(dense, MoEConfig(num_experts=N, top_k=K, layers=[0, 2]), seed=1)
    assert type(moe.model.layers[1].mlp).__name__ == "GatedMLP"
    ids = multilingual_ids()
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5


def test_upcycled_greedy_generation_equals_dense():
    dense, moe = upcycled()
    prompt = multilingual_ids()[:, :6]
    assert torch.equal(moe.generate(prompt, max_new_tokens=6), dense.generate(prompt, max_new_tokens=6))


def test_top1_code_compat_model_is_not_dense():
    dense, moe = upcycled(top_k=1, top1_code_compat=True)
    ids = multilingual_ids()
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() > 1e-3


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    _, moe = upcycled()
    ids = multilingual_ids(16)[:3]
    labels = ids.roll(-1, 1)
    moe.train()
    results = []
    for checkpointing in (False, True):
        moe.config.activation_checkpointing = checkpointing
        moe.zero_grad()
        out = moe(ids, labels=labels)
        (out.loss + 0.01 * out.aux_losses["balance"]).backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in moe.parameters()]))
    moe.config.activation_checkpointing = False
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# ---- item 2: expert 0 is the original FFN -----------------------------------------------------------------

def test_expert0_shares_the_dense_storage_and_is_frozen_in_both_stages():
    dense, moe = upcycled()
    for i, block in enumerate(moe.model.layers):
        dense_mlp = dense.model.layers[i].mlp
        for name, p in block.mlp.experts[0].named_parameters():
            assert p.data_ptr() == dense_mlp.get_parameter(name).data_ptr()
        for j in range(1, N):
            for (name, p), (_, q) in zip(block.mlp.experts[j].named_parameters(), dense_mlp.named_parameters()):
                assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    for stage in (stage1_trainable, stage2_trainable):
        stage(moe)
        assert not any(p.requires_grad for b in moe.model.layers for p in b.mlp.experts[0].parameters())


# ---- items 3 and 4: freezing, checked after a real AdamW step -----------------------------------------------

def _one_adamw_step(moe, loss_fn):
    # Every parameter is handed to the optimizer: frozen ones must stay put through weight decay too.
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    moe.train()
    loss_fn(moe).backward()
    optimizer.step()
    return {n: not torch.equal(before[n], p) for n, p in moe.named_parameters()}


def test_stage1_trains_only_routers_and_new_experts():
    _, moe = upcycled(layers=[0, 2])
    names = stage1_trainable(moe)
    assert set(names) == {n for n, _ in moe.named_parameters()
                          if ".router." in n or any(f".experts.{j}." in n for j in range(1, N))}
    trainable = sum(p.numel() for p in moe.parameters() if p.requires_grad)
    c = moe.config
    assert trainable == N * c.hidden_size * 2 + (N - 1) * ffn_size(c) * 2 == stage1_trainable_count(c)
    ids = multilingual_ids()

    def loss(model):
        out = model(ids, labels=ids.roll(-1, 1))
        return out.loss + 0.01 * out.aux_losses["balance"]

    changed = _one_adamw_step(moe, loss)
    assert all(changed[n] == (n in set(names)) for n in changed), [n for n in changed if changed[n] != (n in names)]


def test_stage2_trains_only_routers_with_lpr():
    _, moe = upcycled()
    names = stage2_trainable(moe)
    assert names == [f"model.layers.{i}.mlp.router.weight" for i in range(3)]
    ids = multilingual_ids()
    original = torch.zeros_like(ids, dtype=torch.bool)
    original[:3] = True

    def loss(model):
        out = model(ids, labels=ids.roll(-1, 1), original_mask=original)
        return out.loss + 0.1 * out.aux_losses["lpr"]

    changed = _one_adamw_step(moe, loss)
    assert {n for n, c in changed.items() if c} == set(names)


# ---- item 11: parameter accounting ------------------------------------------------------------------------

def test_active_parameters_are_dense_plus_k_minus_1_ffns():
    dense, moe = upcycled(layers=[1, 2], top_k=3)
    c = moe.config
    routers = N * c.hidden_size * 2
    assert moe.num_parameters() == dense.num_parameters() + (N - 1) * ffn_size(c) * 2 + routers
    assert moe.num_active_parameters() == dense.num_parameters() + (3 - 1) * ffn_size(c) * 2 + routers
    s = 64
    expected = 6.0 * moe.num_active_parameters(exclude_embeddings=True) + 12.0 * c.num_layers * c.hidden_size * s
    assert moe.flops_per_token(s) == expected


def test_8b_upcycled_counts_on_the_meta_device():
    dense_config = tiny_config(vocab_size=250_680, hidden_size=4096, num_layers=30, num_heads=32,
                               ffn_hidden_size=16_384, max_seq_len=4096)
    config = upcycle_config(dense_config, MoEConfig(num_experts=6, top_k=2))
    moe = build_model(config, device="meta")
    ffn = 134_238_208  # docs/methods.md §1.4
    assert ffn_size(config) == ffn
    assert moe.num_parameters() == 8_094_724_096 + 5 * ffn * 30 + 6 * 4096 * 30
    assert moe.num_active_parameters() == 8_094_724_096 + 1 * ffn * 30 + 6 * 4096 * 30


def test_paper_table1_sizes_for_qwen15_18b():
    """MoE-LPR Table 1: Qwen1.5-1.8B upcycled to 6 experts, top-2, is 5.8B total / 2.6B activated. Qwen1.5-1.8B:
    vocab 151,936 (untied), h=2048, 24 layers, 16 heads, biased q/k/v, gated FFN F=5504 without biases."""
    vocab, h, layers, f = 151_936, 2048, 24, 5504
    ffn = 3 * h * f
    per_layer = 4 * h * h + 3 * h + ffn + 2 * h
    dense = 2 * vocab * h + layers * per_layer + h
    assert dense == 1_836_828_672  # the published "1.8B"
    total = dense + 5 * ffn * layers + 6 * h * layers
    active = dense + (2 - 1) * ffn * layers + 6 * h * layers
    assert 5.8e9 <= total < 5.9e9 and 2.6e9 <= active < 2.7e9  # the paper's figures, truncated to 0.1B


# ---- outputs, masks, statistics -----------------------------------------------------------------------------

def test_forward_returns_unweighted_aux_losses_and_checks_mask_shapes():
    _, moe = upcycled()
    ids = multilingual_ids()
    out = moe(ids, labels=ids.roll(-1, 1), loss_mask=ids != 0, original_mask=ids < 128)
    assert set(out.aux_losses) == {"balance", "lpr"} and out.logits is None
    assert out.aux_losses["balance"].item() > 0 and out.aux_losses["lpr"].item() > 0
    assert len(out.routing) == 3 and out.router_probs().shape == (3, ids.numel(), N)
    with pytest.raises(ValueError, match="original_mask: shape \\(6, 47\\)"):
        moe(ids, original_mask=torch.ones(6, 47, dtype=torch.bool))


def test_router_statistics_per_language_and_plot(tmp_path):
    _, moe = upcycled()
    ids = multilingual_ids()
    lang_ids = torch.arange(6)[:, None].expand_as(ids).clone() % 4  # rows 0..5 -> languages 0,1,2,3,0,1
    lang_ids[:, -5:] = -1  # unlabelled tail
    with torch.no_grad():
        out = moe(ids)
    stats = router_statistics(out, lang_ids, num_languages=5)
    probs, chosen = out.router_probs(), out.router_expert_ids()
    flat = lang_ids.reshape(-1)
    for lang in range(4):
        sel = flat == lang
        torch.testing.assert_close(stats.mean_g0[:, lang], probs[:, sel, 0].mean(1))
        for e in range(N):
            share = (chosen[:, sel] == e).float().sum((1, 2)) / (sel.sum() * K)
            torch.testing.assert_close(stats.expert_share[:, lang, e], share)
    assert stats.token_counts.tolist() == [2 * 43, 2 * 43, 43, 43, 0]
    assert torch.isnan(stats.mean_g0[:, 4]).all()
    torch.testing.assert_close(stats.expert_share.sum(-1)[:, :4], torch.ones(3, 4))
    logs = stats.as_log(["en", "zh", "el", "tr", "hu"])
    assert "router/g0/en" in logs and "router/share/tr/e3" in logs and "router/g0/hu" not in logs
    png = plot_router_shares(stats, tmp_path / "plots" / "router.png", ["en", "zh", "el", "tr", "hu"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# ---- `fuxi upcycle` -----------------------------------------------------------------------------------------

def test_fuxi_upcycle_streams_a_checkpoint_equal_to_the_in_memory_upcycle(tmp_path, capsys):
    dense = tiny_model(num_layers=3)
    save_model(dense, tmp_path / "dense", max_shard_bytes=100_000)
    rc = fuxi(["upcycle", "--checkpoint", str(tmp_path / "dense"), "--experts", str(N), "--top-k", "2",
               "--layers", "0", "2", "--seed", "3", "--original-languages", "en", "zh",
               "--out", str(tmp_path / "moe"), "--shard-size", "200KB"])
    assert rc == 0 and "4-expert top-2" in capsys.readouterr().out
    loaded = load_model(tmp_path / "moe")
    assert loaded.config.moe == MoEConfig(num_experts=N, top_k=2, layers=[0, 2], original_languages=["en", "zh"])
    reference = upcycle_model(dense, dataclasses.replace(loaded.config.moe), seed=3)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = multilingual_ids()
    with torch.no_grad():
        assert (loaded(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5


def test_fuxi_upcycle_carries_the_dense_checkpoints_tokenizer(tmp_path, capsys):
    """The MoE model reads the dense model's ids, so `tokenizer/` beside the dense weights comes along unchanged
    (eval and export then find it without --tokenizer); a checkpoint without one gives an MoE one without one."""
    save_model(tiny_model(), tmp_path / "dense")
    files = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}", "sub/extra.txt": b"\xffx"}
    for name, data in files.items():
        (tmp_path / "dense" / "tokenizer" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dense" / "tokenizer" / name).write_bytes(data)
    assert fuxi(["upcycle", "--checkpoint", str(tmp_path / "dense"), "--experts", "2", "--out",
                 str(tmp_path / "moe")]) == 0
    copied = {str(p.relative_to(tmp_path / "moe" / "tokenizer")): p.read_bytes()
              for p in (tmp_path / "moe" / "tokenizer").rglob("*") if p.is_file()}
    assert copied == files
    save_model(tiny_model(), tmp_path / "bare")
    assert fuxi(["upcycle", "--checkpoint", str(tmp_path / "bare"), "--experts", "2", "--out",
                 str(tmp_path / "moe_bare")]) == 0
    assert not (tmp_path / "moe_bare" / "tokenizer").exists() and load_model(tmp_path / "moe_bare").config.moe


def test_fuxi_upcycle_errors_are_clear(tmp_path, capsys):
    moe_dir = tmp_path / "moe"
    _, moe = upcycled()
    save_model(moe, moe_dir)
    assert fuxi(["upcycle", "--checkpoint", str(moe_dir), "--experts", "4", "--out", str(tmp_path / "x")]) == 2
    assert "upcycling needs a dense 'fuxitranyu' model" in capsys.readouterr().err
    save_model(tiny_model(), tmp_path / "dense")
    assert fuxi(["upcycle", "--checkpoint", str(tmp_path / "dense"), "--experts", "4", "--top-k", "5",
                 "--out", str(tmp_path / "y")]) == 2
    assert "top_k: must be in [1, num_experts=4]" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
