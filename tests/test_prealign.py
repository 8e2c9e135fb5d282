"""PreAlign's alignment initialisation (pretrain/stages/prealign/; docs/methods.md §3.3, checklist 3.8.5-6): the
L + 2 representation spaces, the InfoNCE loss against a naive reference, 1 rank == 2 gloo ranks (loss and
gradients), the dictionary data (determinism, resume, rank split), training a toy dictionary into alignment, the
config."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from fuxi.common.errors import ConfigError
from fuxi.pretrain.stages.prealign.dictionary import DictionaryBatches, DictionaryEntries, DictionaryLoader
from fuxi.pretrain.stages.prealign.loss import contrastive_alignment_loss, prealign_loss, word_vectors
from fuxi.pretrain.stages.prealign.report import alignment_report, space_names
from model_helpers import tiny_model

TAU = 0.1


def toy_entries(num_concepts=24, words_per_concept=2, vocab=300, seed=0) -> DictionaryEntries:
    """Concepts whose words (1-3 tokens) live in disjoint vocabulary ranges, one per language."""
    g = torch.Generator().manual_seed(seed)
    span = (vocab - 1) // words_per_concept
    concepts = []
    for _ in range(num_concepts):
        words = []
        for lang in range(words_per_concept):
            n = int(torch.randint(1, 4, (1,), generator=g))
            ids = torch.randint(1 + lang * span, 1 + (lang + 1) * span, (n,), generator=g).tolist()
            words.append((tuple(ids), lang))
        concepts.append(words)
    return DictionaryEntries.from_token_concepts(concepts, [f"l{i}" for i in range(words_per_concept)])


def reference_loss(vectors, concepts, words, tau=TAU) -> torch.Tensor:
    """Naive loops: for each space and anchor, -mean over positives of log softmax over allowed candidates."""
    total = []
    for s in range(vectors.shape[0]):
        z = F.normalize(vectors[s].double(), dim=-1)
        losses = []
        for i in range(z.shape[0]):
            if concepts[i] < 0:
                continue
            positives = [j for j in range(z.shape[0]) if j != i and concepts[j] == concepts[i]]
            if not positives:
                continue
            allowed = [j for j in range(z.shape[0]) if j != i and concepts[j] >= 0
                       and (j in positives or words[j] != words[i])]
            logits = torch.stack([z[i] @ z[j] / tau for j in allowed])
            log_prob = logits - torch.logsumexp(logits, 0)
            losses.append(-sum(log_prob[allowed.index(p)] for p in positives) / len(positives))
        total.append(sum(losses) / len(losses))
    return sum(total) / len(total)


def test_hidden_states_are_embedding_plus_every_block_output():
    model = tiny_model(num_layers=3)
    ids = torch.randint(1, 300, (2, 7))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    final = model.model(ids).hidden
    torch.testing.assert_close(model.model.norm(out.hidden_states[-1]), final)
    x = out.hidden_states[0]
    cos, sin = model.model.rotary(torch.arange(7)[None], x.dtype)
    for i, layer in enumerate(model.model.layers):  # each entry is that block applied to the previous one
        x, _, _ = layer(x, cos, sin)
        torch.testing.assert_close(out.hidden_states[i + 1], x)
    assert model(ids).hidden_states is None


def test_word_vectors_are_masked_sums_in_l_plus_2_spaces():
    model = tiny_model(num_layers=2)
    ids = torch.tensor([[0, 5, 6, 7, 0], [0, 9, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]])
    out = model(ids, output_hidden_states=True)
    vectors = word_vectors(out.hidden_states, ids, mask, model.lm_head.weight)
    assert vectors.shape == (2 + 2, 2, 64)
    torch.testing.assert_close(vectors[1, 0], out.hidden_states[1][0, 1:4].sum(0))
    torch.testing.assert_close(vectors[0, 1], out.hidden_states[0][1, 1])
    torch.testing.assert_close(vectors[-1, 0], model.lm_head.weight[[5, 6, 7]].sum(0))
    assert space_names(2) == ["embedding", "layer 1", "layer 2", "output embedding"]


@pytest.mark.parametrize("case", ["pairs", "multiway_with_empty_slots_and_shared_words"])
def test_contrastive_loss_matches_naive_reference(case):
    torch.manual_seed(1)
    if case == "pairs":
        concepts = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        words = torch.arange(8)
    else:  # 3 words per entry; one empty slot; word 4 appears under two concepts
        concepts = torch.tensor([0, 0, 0, 1, 1, -1, 2, 2, 2])
        words = torch.tensor([0, 1, 4, 3, 4, -1, 5, 6, 7])
    vectors = torch.randn(3, len(concepts), 16, requires_grad=True)
    got = contrastive_alignment_loss(vectors, concepts, words, TAU)
    expected = reference_loss(vectors, concepts.tolist(), words.tolist())
    assert math.isclose(got.loss.item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(got.value, expected.item(), rel_tol=1e-5)
    assert int(got.anchors) == int((concepts >= 0).sum())
    grad, = torch.autograd.grad(got.loss, vectors)
    expected_grad, = torch.autograd.grad(expected, vectors)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-4, atol=1e-6)


def test_loss_is_low_for_aligned_and_high_for_shuffled_vectors():
    """A property: when each word equals its translation the loss falls far below log(N - 1)."""
    base = torch.randn(1, 8, 32)
    aligned = torch.repeat_interleave(base, 2, dim=1)
    concepts = torch.arange(8).repeat_interleave(2)
    words = torch.arange(16)
    low = contrastive_alignment_loss(aligned, concepts, words, TAU).value
    high = contrastive_alignment_loss(torch.randn(1, 16, 32), concepts, words, TAU).value
    assert low < 0.5 < math.log(15) - 1 < high


def test_every_space_receives_gradient():
    model = tiny_model(num_layers=2).train()
    entries = toy_entries()
    batch = DictionaryBatches(entries, 2, seed=0).batch(list(range(8)))
    out = prealign_loss(model, batch, model.lm_head.weight, 2, TAU, alpha=0.0, alpha_weights="lm")  # align only
    out.loss.backward()
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the LM term uses the word tokens as labels: BOS predicts the first token
    assert torch.equal(batch["labels"][0, :3][batch["word_mask"][0, 1:4].bool()],
                       batch["input_ids"][0, 1:4][batch["word_mask"][0, 1:4].bool()])


@pytest.mark.parametrize("weights", ["lm", "align"])
def test_alpha_weights_the_chosen_term(weights):
    model = tiny_model(num_layers=1).train()
    batch = DictionaryBatches(toy_entries(), 2, seed=0).batch(list(range(6)))
    out = prealign_loss(model, batch, model.lm_head.weight, 2, TAU, alpha=0.25, alpha_weights=weights)
    align = out.align.loss.detach()
    expected = align + 0.25 * out.lm_loss if weights == "lm" else out.lm_loss + 0.25 * align
    torch.testing.assert_close(out.loss.detach(), expected)


def test_default_is_the_released_weighting_lm_plus_a_tenth_of_align():
    """Both released trainers compute L_LM + 0.1 * L_align; the config default and the function default do too.
    The reference recomputes the LM term from the logits and the alignment term from the hidden states."""
    from fuxi.pretrain.stages.prealign.config import PreAlignConfig

    cfg = PreAlignConfig()
    assert (cfg.alpha_weights, cfg.alpha, cfg.temperature) == ("align", 0.1, 0.1)
    model = tiny_model(num_layers=1).train()
    batch = DictionaryBatches(toy_entries(), 2, seed=0).batch(list(range(6)))
    out = prealign_loss(model, batch, model.lm_head.weight, 2, cfg.temperature, cfg.alpha)
    ids, labels, mask = (batch[k].reshape(12, -1) for k in ("input_ids", "labels", "word_mask"))
    ref = model(ids, output_hidden_states=True)
    lm = F.cross_entropy(ref.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    vectors = torch.stack([(h * mask[..., None]).sum(1) for h in ref.hidden_states] +
                          [(model.lm_head.weight[ids] * mask[..., None]).sum(1)])
    align = contrastive_alignment_loss(vectors, batch["concept_ids"].reshape(-1), batch["word_ids"].reshape(-1),
                                       cfg.temperature).loss
    torch.testing.assert_close(out.loss, lm + 0.1 * align, rtol=1e-5, atol=1e-6)


def test_dictionary_batches_are_deterministic_resumable_and_split_by_rank():
    entries = toy_entries(num_concepts=10, words_per_concept=3)
    source = DictionaryBatches(entries, 2, seed=3)
    b = source.batch([0, 1, 2])
    assert b["input_ids"].shape == (3, 2 * source.width) and b["concept_ids"].shape == (3, 2)
    for key in b:
        assert torch.equal(b[key], DictionaryBatches(entries, 2, seed=3).batch([0, 1, 2])[key])
    # one pass visits every concept once
    seen = [int(source.batch([g])["concept_ids"][0, 0]) for g in range(10)]
    assert sorted(seen) == sorted(entries.concept_ids)
    # two ranks read disjoint, interleaved positions: together they equal one rank with twice the batch
    whole = next(iter(DictionaryLoader(source, 4, 0, 1)))
    r0, r1 = next(iter(DictionaryLoader(source, 2, 0, 2))), next(iter(DictionaryLoader(source, 2, 1, 2)))
    assert torch.equal(torch.stack([r0["concept_ids"], r1["concept_ids"]], 1).reshape(4, 2), whole["concept_ids"])
    # resume: a new loader with the saved state continues exactly
    loader = DictionaryLoader(source, 2, 0, 1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = next(it)
    resumed = DictionaryLoader(source, 2, 0, 1)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(ConfigError, match="sample order"):
        DictionaryLoader(source, 3, 0, 1).load_state_dict(state)
    # word tokens per language: every masked word token is counted once
    counted = sum(int(b["word_mask"].sum()) for b in [next(iter(DictionaryLoader(source, 5, 0, 1)))])
    fresh = DictionaryLoader(source, 5, 0, 1)
    next(iter(fresh))
    assert int(fresh.tokens_seen.sum()) == counted and "l0" in fresh.mixture_report()


def test_toy_dictionary_gets_aligned_at_every_layer_and_loss_decreases():
    """Checklist 3.8.6: after alignment init, mean cos(aligned) - mean cos(random) > 0 in every space, and the
    contrastive loss decreases on average."""
    torch.manual_seed(0)
    model = tiny_model(num_layers=2, std=0.02).train()
    entries = toy_entries(num_concepts=32)
    before = alignment_report(model, model.lm_head.weight, entries, 2, seed=0)
    source = DictionaryBatches(entries, 2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = source.batch(list(range(step * 16, step * 16 + 16)))
        out = prealign_loss(model, batch, model.lm_head.weight, 2, TAU, alpha=0.1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.align.value)
    after = alignment_report(model, model.lm_head.weight, entries, 2, seed=0)
    assert len(after["gap"]) == 2 + 2
    assert all(g > 0.2 for g in after["gap"]), after
    assert all(a > b for a, b in zip(after["gap"], before["gap"]))
    quarters = [sum(losses[i:i + 10]) / 10 for i in range(0, 40, 10)]
    # decreasing on average: every quarter below the one before, until both are converged (< 0.1)
    assert all(later < earlier or max(earlier, later) < 0.1 for earlier, later in zip(quarters, quarters[1:])), \
        quarters
    assert quarters[-1] < 0.2 * quarters[0]


# ---- 1 rank == 2 ranks -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, path):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_model(num_layers=2).train()
    source = DictionaryBatches(toy_entries(words_per_concept=3), 3, seed=5)
    batch = next(iter(DictionaryLoader(source, 4, rank, world)))
    all_reduce, reductions = dist.all_reduce, []
    dist.all_reduce = lambda *args, **kwargs: (reductions.append(1), all_reduce(*args, **kwargs))[1]
    try:
        out = prealign_loss(model, batch, model.lm_head.weight, 3, TAU, alpha=0.1)  # the default, LM term included
    finally:
        dist.all_reduce = all_reduce
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    dist.all_reduce(grads)
    grads /= world  # DeepSpeed averages gradients over ranks
    mean_loss = out.loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"grads": grads, "loss": mean_loss / world, "reported": out.align.per_space,
                    "forward_all_reduces": len(reductions)}, path)
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_rank_loss_and_gradients(tmp_path):
    """Checklist 3.8.5: negatives gathered across ranks with gradient; 1 rank with batch 8 == 2 ranks with 4.
    The forward reduces the anchor and label-token counts (both losses' scales) in one all-reduce."""
    import torch.multiprocessing as mp
    path = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    two = torch.load(path)
    assert two["forward_all_reduces"] == 1

    model = tiny_model(num_layers=2).train()
    source = DictionaryBatches(toy_entries(words_per_concept=3), 3, seed=5)
    batch = next(iter(DictionaryLoader(source, 8, 0, 1)))
    out = prealign_loss(model, batch, model.lm_head.weight, 3, TAU, alpha=0.1)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(two["reported"], out.align.per_space, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    assert grads.abs().sum() > 0
    torch.testing.assert_close(two["grads"], grads, rtol=1e-4, atol=1e-6)
