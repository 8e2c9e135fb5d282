"""The English-Clone generator of experiments/prealign.py (docs/methods.md §3.5, checklist 3.8.8): the clone
vocabulary is disjoint from English, a bijection per token, the alignment table is exactly that bijection at word
level, and the English-only material (facts of the fact persons, the labelling task) never reaches Clone."""
from __future__ import annotations

import json
import re
from typing import get_args

import numpy as np
import pytest
import torch

from fuxi.data_pipeline.codeswitch import CodeSwitchTable, CodeSwitchTransform, split_words
from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from fuxi.experiments.prealign import (EOS, MOODS, NEGATIVE, WEIGHTING_SUFFIX, EnglishClone, choice_accuracy,
                                        make_documents, make_world, mood_example, pack_blocks)
from fuxi.pretrain.stages.prealign.config import AlphaWeights, PreAlignConfig


@pytest.fixture(scope="module")
def world_and_clone(tmp_path_factory):
    rng = np.random.default_rng(0)
    world = make_world(rng)
    docs = make_documents(rng, world, 300, clone=False)
    corpus = tmp_path_factory.mktemp("clone_corpus")
    (corpus / "en.jsonl").write_text("".join(json.dumps({"text": d, "lang": "en"}) + "\n" for d in docs))
    tok_dir = train_tokenizer(corpus, tmp_path_factory.mktemp("clone_tok"), TokenizerConfig(vocab_size=320))
    return world, EnglishClone(tok_dir), rng


def test_clone_vocabulary_is_a_disjoint_bijection(world_and_clone):
    world, ec, rng = world_and_clone
    V = ec.english_vocab
    english_ids = list(range(1, V))
    clone_ids = ec.clone(english_ids)
    assert set(clone_ids).isdisjoint(range(V)) and max(clone_ids) < ec.vocab_size
    assert len(set(clone_ids)) == len(english_ids)  # injective, and t = clone(t) - V inverts it
    assert [c - V for c in clone_ids] == english_ids and ec.clone([EOS]) == [EOS]
    # word starts and specials carry over token for token
    assert np.array_equal(ec.word_start[V:], ec.word_start[:V])
    text = make_documents(rng, world, 1, clone=True)[0]
    en, cl = ec.encode(text), ec.encode(text, clone=True)
    assert cl == ec.clone(en) and set(cl).isdisjoint(range(1, V))
    assert split_words(np.array(cl), ec.word_start, ec.special) == \
        [tuple(ec.clone(w)) for w in split_words(np.array(en), ec.word_start, ec.special)]


def test_alignment_table_is_the_word_level_bijection(world_and_clone):
    world, ec, _ = world_and_clone
    words = world.vocabulary()
    pairs = ec.word_pairs(words)
    assert len(pairs) == len(words) == len(set(words))
    for w, (en, cl) in zip(words, pairs):
        assert list(en) == ec.tok.encode(" " + w).ids and list(cl) == ec.clone(list(en))
    assert len({en for en, _ in pairs}) == len(pairs)  # distinct words, distinct token tuples
    table = CodeSwitchTable.from_concepts([list(p) for p in pairs], ec.word_start, ec.special)
    assert table.translations == {en: [cl] for en, cl in pairs}  # source (English) -> target (Clone)
    both_ways = CodeSwitchTable.from_concepts([list(p) for p in pairs], ec.word_start, ec.special, "all_to_all")
    assert both_ways.translations == {**{en: [cl] for en, cl in pairs}, **{cl: [en] for en, cl in pairs}}
    # code-switching an English sentence at ratio 1 gives its Clone words (all but the block's last word)
    sentence = " kelo saw a big red ball in the park ."
    tokens = np.array([EOS] + ec.encode(sentence))
    ids, *_ = CodeSwitchTransform(table, 1.0, 0).switch(tokens, np.zeros_like(tokens), np.zeros_like(tokens),
                                                        np.random.default_rng(0))
    words_in = split_words(tokens, ec.word_start, ec.special)
    expected = [EOS] + [t for w in words_in[1:-1] for t in (ec.clone(list(w)) if w in table.translations else w)]
    assert ids.tolist() == expected + list(words_in[-1])


def test_english_only_material_never_reaches_clone(world_and_clone):
    world, ec, rng = world_and_clone
    clone_docs = " ".join(make_documents(rng, world, 400, clone=True))
    english_docs = " ".join(make_documents(rng, world, 400, clone=False))
    assert "it was a" not in clone_docs and "it was a" in english_docs
    assert not any(f" {m} " in clone_docs for m in MOODS)  # the task's answers are never Clone text
    for person in world.fact_persons:
        assert not re.search(rf"\b{person} (lives in|works as)|of {person} is", clone_docs), person
        assert re.search(rf"\b{person}\b", clone_docs)  # the person still appears in Clone text
    assert any(re.search(rf"\b{p} lives in", clone_docs) for p in world.filler_persons)
    prompt, answer = mood_example(rng, world)
    adjective = prompt.split(" found a ")[1].split()[0]
    assert prompt.endswith("it was a") and answer == ("bad" if adjective in NEGATIVE else "good")


def test_blocks_and_choice_scoring():
    blocks = pack_blocks([[5, 6, 7], [8, 9]], lang=1, block_len=4)
    assert blocks["tokens"].tolist() == [[0, 5, 6, 7]]  # EOS-separated documents, the incomplete tail dropped
    assert blocks["doc_ids"].tolist() == [[0, 0, 0, 0]] and (blocks["lang_ids"] == 1).all()

    class Oracle(torch.nn.Module):
        """Predicts token t + 1 after token t: the candidate continuing the prompt that way wins."""

        def forward(self, ids):
            logits = torch.full((*ids.shape, 20), -10.0)
            logits.scatter_(2, ((ids + 1) % 20)[..., None], 10.0)
            return type("Out", (), {"logits": logits})()

    assert choice_accuracy(Oracle(), [[3, 4], [7]], [[9, 10], [5, 6], [8, 9]], [1, 2]) == 1.0
    assert choice_accuracy(Oracle(), [[3, 4]], [[9, 10], [5, 6]], [0]) == 0.0


def test_every_init_weighting_names_its_arm():
    """Arm names come from the config's weightings: the released default keeps the plain name (listed first,
    so it gets the first plot style), every other one a distinct suffix."""
    assert set(WEIGHTING_SUFFIX) == set(get_args(AlphaWeights))
    assert next(iter(WEIGHTING_SUFFIX)) == PreAlignConfig().alpha_weights and WEIGHTING_SUFFIX["align"] == ""
    assert WEIGHTING_SUFFIX["lm"] == ", alpha on L_LM"
    assert len(set(WEIGHTING_SUFFIX.values())) == len(WEIGHTING_SUFFIX)


def test_experiment_driver_end_to_end_smoke(tmp_path, capsys):
    """The driver runs every stage at toy size and writes its files; the last printed line is the JSON."""
    from fuxi.experiments.prealign import main

    out = tmp_path / "exp"
    assert main(["--out", str(out), "--arms", "joint,prealign", "--english-docs", "60", "--clone-docs", "20",
                 "--hidden", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch", "4",
                 "--steps", "4", "--init-steps", "3", "--init-batch", "8", "--eval-every", "2",
                 "--weightings", "align,lm"]) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(headline) >= {"joint_loss_clone", "prealign_knowledge_clone", "prealign_transfer_clone",
                             "prealign_alpha_on_L_LM_loss_clone"}
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert list(run["arms"]) == ["joint", "prealign", "prealign, alpha on L_LM"]
    assert [p["step"] for p in run["arms"]["joint"]["curve"]] == [2, 4]
    assert set(run["init"]) == {"align", "lm"}
    assert len(run["init"]["align"]["after"]["gap"]) == 1 + 2  # embedding, 1 layer, output embedding
    # the two weightings start LM training from different aligned weights
    assert run["arms"]["prealign"]["curve"] != run["arms"]["prealign, alpha on L_LM"]["curve"]
    assert (out / "prealign_english_clone.png").stat().st_size > 0 and (out / "report.md").is_file()
