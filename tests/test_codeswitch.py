"""Input-only code-switching (data_pipeline/codeswitch.py; docs/methods.md §3.4, checklist 3.8.1-4): word
segmentation, a hand-worked switch, the input-only label property, the switch rate, determinism and resume in the
real stream, re-packing, and the config/trainer wiring."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline.align_table import SHIPPED_TABLE
from fuxi.data_pipeline.codeswitch import (CodeSwitchTable, CodeSwitchTransform, build_codeswitch_transform,
                                      segment_words, split_words, tokenizer_word_starts)
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.loader import build_train_loader
from fuxi.data_pipeline.stream import default_transform
from fuxi.data_pipeline.tokenizer import load_tokenizer
from data_helpers import tiny_dataset

# A token-level toy vocabulary: 0 is EOS (special); even ids start a word, odd ids continue one; ids >= 20
# appear only as translations.
VOCAB = 40
WORD_START = np.array([i % 2 == 0 and i > 0 for i in range(VOCAB)])
SPECIAL = np.array([i == 0 for i in range(VOCAB)])
TRANSLATED_ONLY = set(range(20, VOCAB))


def toy_table() -> CodeSwitchTable:
    return CodeSwitchTable({(2,): [(20, 21)], (4, 5): [(22,)], (6, 7): [(30,)]}, WORD_START, SPECIAL)


def raw(tokens, position=0, lang=3, doc=None) -> dict:
    tokens = torch.tensor(tokens, dtype=torch.long)
    doc_ids = torch.zeros_like(tokens) if doc is None else torch.tensor(doc)
    return {"tokens": tokens, "lang_ids": torch.full_like(tokens, lang), "doc_ids": doc_ids, "position": position}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def test_segmenter_marks_exactly_the_whitespace_marker_tokens(data):
    """Checklist 3.8.1 on the real byte-level BPE: word starts are the 'Ġ' tokens (plus the first position and
    the EOS boundaries), and the words concatenate back to the ids."""
    tok = load_tokenizer(data.tokenizer_dir)
    word_start, special = tokenizer_word_starts(tok)
    assert special[0] and special.sum() == 1 and not word_start[0]
    text = "the bank of the river, and a house with water.\nNew line here"
    ids = np.array(tok.encode(text).ids)
    starts = segment_words(ids, word_start, special)
    marked = [i for i, t in enumerate(ids) if tok.id_to_token(int(t)).startswith("Ġ")]
    assert list(starts) == sorted(set([0] + marked))
    words = split_words(ids, word_start, special)
    assert [t for w in words for t in w] == ids.tolist()
    assert all(tok.id_to_token(w[0]).startswith("Ġ") for w in words[1:])
    # an EOS is a word of its own and ends the word before it
    with_eos = np.concatenate([ids[:4], [0], ids[4:]])
    assert (0,) in split_words(with_eos, word_start, special)


def test_hand_worked_example_is_input_only():
    """Ratio 1: every table word except the block's last word is switched; the token before a span predicts the
    original first token, the span is ignored, the span's last token predicts the next original token."""
    transform = CodeSwitchTransform(toy_table(), ratio=1.0, seed=0)
    out = transform(raw([0, 2, 6, 7, 4, 5, 8, 2, 2]))
    # unshifted after switching: ids 0 20 21 30 22 8 20 21 2 | targets 0 2 -100 6 4 8 2 -100 2 (last word kept)
    assert out["input_ids"].tolist() == [0, 20, 21, 30, 22, 8, 20, 21]
    assert out["labels"].tolist() == [2, -100, 6, 4, 8, 2, -100, 2]
    assert out["lang_ids"].tolist() == [3] * 8


def test_shorter_switch_is_padded_and_longer_is_cut():
    table = CodeSwitchTable({(6, 7): [(30,)], (12, 13): [(32,)], (2,): [(20, 21, 23, 25)]}, WORD_START, SPECIAL)
    transform = CodeSwitchTransform(table, ratio=1.0, seed=0)
    short = transform(raw([0, 6, 7, 12, 13, 8, 10], doc=[5] * 7))  # 7 tokens -> 5: two pads
    assert short["input_ids"].tolist() == [0, 30, 32, 8, 10, 0]
    assert short["labels"].tolist() == [6, 12, 8, 10, -100, -100]
    assert short["lang_ids"].tolist() == [3, 3, 3, 3, 3, -1] and short["doc_ids"].tolist() == [5] * 5 + [-1]
    long = transform(raw([0, 2, 8, 10, 12]))  # 5 tokens -> 8: the tail is cut
    assert long["input_ids"].tolist() == [0, 20, 21, 23]
    assert long["labels"].tolist() == [2, -100, -100, -100]


def random_words(rng, n_words, vocab_words):
    return [vocab_words[i] for i in rng.integers(len(vocab_words), size=n_words)]


def test_ratio_one_replaces_every_occurrence_and_no_label_is_a_translated_token():
    """Checklist 3.8.3 on random sequences: every occurrence of a table word (except the last word) is
    replaced; each has exactly one label, at the span start, equal to the original first token."""
    rng = np.random.default_rng(0)
    vocab_words = [(2,), (4, 5), (6, 7), (8,), (10, 11, 13), (12,), (14, 15)]
    transform = CodeSwitchTransform(toy_table(), ratio=1.0, seed=0)
    for position in range(50):
        words = [(0,)] + random_words(rng, 30, vocab_words)
        tokens = np.array([t for w in words for t in w])
        ids, targets, _, _, switched = transform.switch(tokens, np.zeros_like(tokens), np.zeros_like(tokens),
                                                        transform.rng(position))
        expected = sum(w in toy_table().translations for w in words[:-1])
        assert switched == expected
        # walk the output: original words stay, table words became their translation with [first, -100...]
        cursor = 0
        for w in words[:-1]:
            if w in toy_table().translations:
                translation = toy_table().translations[w][0]
                assert tuple(ids[cursor:cursor + len(translation)]) == translation
                assert targets[cursor] == w[0] and set(targets[cursor + 1:cursor + len(translation)]) <= {-100}
                cursor += len(translation)
            else:
                assert tuple(ids[cursor:cursor + len(w)]) == w == tuple(targets[cursor:cursor + len(w)])
                cursor += len(w)
        assert not set(targets.tolist()) & TRANSLATED_ONLY


def test_switch_rate_matches_ratio_within_three_sigma():
    """Checklist 3.8.4: over ~1e5 words, the switched fraction of eligible words is within 3 sigma of ratio."""
    rng = np.random.default_rng(1)
    vocab_words = [(2,), (4, 5), (6, 7), (8,), (10, 11), (12,), (14,), (16, 17)]
    transform = CodeSwitchTransform(toy_table(), ratio=0.05, seed=7)
    eligible = switched = 0
    for position in range(200):
        words = random_words(rng, 500, vocab_words)
        tokens = np.array([t for w in words for t in w])
        *_, n = transform.switch(tokens, np.zeros_like(tokens), np.zeros_like(tokens), transform.rng(position))
        eligible += sum(w in toy_table().translations for w in words[:-1])
        switched += n
    sigma = math.sqrt(0.05 * 0.95 / eligible)
    assert abs(switched / eligible - 0.05) < 3 * sigma, (switched, eligible)


def test_deterministic_per_seed_and_position():
    transform = CodeSwitchTransform(toy_table(), ratio=0.5, seed=3)
    tokens = [0] + [2, 4, 5, 6, 7, 8] * 10
    a, b = transform(raw(tokens, position=11)), CodeSwitchTransform(toy_table(), 0.5, 3)(raw(tokens, position=11))
    assert all(torch.equal(a[k], b[k]) for k in a)
    others = [transform(raw(tokens, position=p))["input_ids"] for p in range(12, 16)]
    others.append(CodeSwitchTransform(toy_table(), 0.5, 4)(raw(tokens, position=11))["input_ids"])
    assert any(not torch.equal(a["input_ids"], o) for o in others)
    with pytest.raises(DataError, match="position"):
        transform({k: v for k, v in raw(tokens).items() if k != "position"})


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_ratio_zero_equals_the_plain_stream(data):
    """Checklist 3.8.2: with ratio 0 the transform's batches are identical to the default transform's."""
    cfg = data.data_config(num_workers=0)
    table = CodeSwitchTable.from_alignment_table(SHIPPED_TABLE, data.tokenizer_dir)
    plain = _batches(build_train_loader(cfg, 4), 3)
    switched = _batches(build_train_loader(cfg, 4, transform=CodeSwitchTransform(table, 0.0, 0)), 3)
    for p, s in zip(plain, switched):
        assert set(p) == set(s) and all(torch.equal(p[k], s[k]) for k in p)


def is_subsequence(needle: list[int], haystack: list[int]) -> bool:
    it = iter(haystack)
    return all(any(x == y for y in it) for x in needle)


class WithOriginal:
    """A stream transform returning the code-switched sample plus the plain one's labels and inputs."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample):
        plain = default_transform(sample)
        return {**self.transform(sample), "plain_labels": plain["labels"], "plain_input_ids": plain["input_ids"]}


def test_real_stream_labels_come_only_from_the_original_text(data):
    """On the bundled corpus with the shipped table at ratio 1: inputs change, and the kept labels are, in
    order, a subsequence of the original block's next tokens (no label is a translation's token)."""
    transform = build_codeswitch_transform(str(SHIPPED_TABLE), str(data.tokenizer_dir), 1.0, 0)
    changed = 0
    for batch in _batches(build_train_loader(data.data_config(num_workers=0), 8, transform=WithOriginal(transform)),
                          5):
        for row in range(8):
            assert batch["input_ids"][row].shape == batch["plain_input_ids"][row].shape
            kept = [int(x) for x in batch["labels"][row] if x != -100]
            assert is_subsequence(kept, batch["plain_labels"][row].tolist())
            changed += not torch.equal(batch["input_ids"][row], batch["plain_input_ids"][row])
    assert changed > 10


def test_stream_resume_and_workers_reproduce_the_same_switches(data):
    """Deterministic per seed and resumable with the stream: a loader resumed from a state, and a loader with
    two workers, give the same code-switched batches as one uninterrupted in-process loader."""
    transform = build_codeswitch_transform(str(SHIPPED_TABLE), str(data.tokenizer_dir), 0.3, 0)
    cfg = data.data_config(num_workers=0, codeswitch_ratio=0.3)
    reference = _batches(build_train_loader(cfg, 2, transform=transform), 6)
    first = build_train_loader(cfg, 2, transform=transform)
    _batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_loader(cfg, 2, transform=build_codeswitch_transform(
        str(SHIPPED_TABLE), str(data.tokenizer_dir), 0.3, 0))
    resumed.load_state_dict(state)
    for ref, got in zip(reference[3:], _batches(resumed, 3)):
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    workers = _batches(build_train_loader(data.data_config(num_workers=2), 2, transform=transform), 6)
    for ref, got in zip(reference, workers):
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert any(not torch.equal(r["input_ids"], p["input_ids"])
               for r, p in zip(reference, _batches(build_train_loader(cfg, 2), 6)))
    # the resume fingerprint holds the code-switching settings: another direction is refused, not resumed
    other = build_train_loader(data.data_config(num_workers=0, codeswitch_ratio=0.3,
                                                codeswitch_direction="all_to_all"), 2, transform=transform)
    with pytest.raises(ConfigError, match="^codeswitch: the saved data state"):
        other.load_state_dict(state)


def test_config_validation_and_trainer_wiring(data, tmp_path):
    with pytest.raises(ConfigError, match="^codeswitch_ratio"):
        DataConfig(train_manifest="m.json", codeswitch_ratio=1.5).validate()
    with pytest.raises(ConfigError, match="^codeswitch_table"):
        DataConfig(train_manifest="m.json", codeswitch_table="").validate()
    with pytest.raises(ConfigError, match="^codeswitch_direction"):
        DataConfig(train_manifest="m.json", codeswitch_direction="both").validate()
    assert DataConfig(train_manifest="m.json").codeswitch_direction == "source_to_target"
    from fuxi.pretrain.config import load_train_config
    from fuxi.pretrain.data import TrainData
    from trainer_helpers import run_config

    raw_cfg = run_config(data, tmp_path, data={"codeswitch_ratio": 0.05, "seq_len": 64})
    raw_cfg["model"]["max_seq_len"] = 64
    raw_cfg["model"]["vocab_size"] = 1024
    train_data = TrainData(load_train_config(None, data=raw_cfg), rank=0, world_size=1)
    assert isinstance(train_data.loader.transform, CodeSwitchTransform)
    assert train_data.loader.transform.ratio == 0.05 and len(train_data.loader.transform.table) > 1000
    raw_cfg["data"]["tokenizer"] = None
    with pytest.raises(ConfigError, match="^tokenizer"):
        TrainData(load_train_config(None, data=raw_cfg), rank=0, world_size=1)
    raw_cfg["data"]["codeswitch_ratio"] = 0.0
    assert TrainData(load_train_config(None, data=raw_cfg), 0, 1).loader.transform is default_transform


def test_default_table_maps_source_to_target_as_the_released_code(data, tmp_path):
    """The released loader reads a multi-way line as words[0] -> words[1:] (a one-to-one line as src -> tgt), each
    word tokenised after a space; the default table is exactly that. all_to_all also maps every word to the rest."""
    table_path = tmp_path / "table.jsonl"
    lines = [{"index": 0, "words": "water $ eau $ Wasser", "langs": ["en", "fr", "de"]},
             {"index": 1, "words": "house $ maison", "langs": ["en", "fr"]},
             {"src_text": "book", "tgt_text": "livre", "src_lang": "en", "tgt_lang": "fr"}]
    table_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tok = load_tokenizer(data.tokenizer_dir)
    ids = lambda word: tuple(tok.encode(" " + word, add_special_tokens=False).ids)  # noqa: E731
    expected = {}  # the released construction, written out: source -> its translations
    for line in lines:
        words = line["words"].split(" $ ") if "words" in line else [line["src_text"], line["tgt_text"]]
        expected.setdefault(ids(words[0]), []).extend(ids(w) for w in words[1:])
    default = CodeSwitchTable.from_alignment_table(table_path, data.tokenizer_dir)
    assert default.translations == expected
    assert ids("eau") not in default.translations and ids("livre") not in default.translations
    everywhere = CodeSwitchTable.from_alignment_table(table_path, data.tokenizer_dir, direction="all_to_all")
    assert everywhere.translations[ids("eau")] == [ids("water"), ids("Wasser")]
    assert everywhere.translations[ids("livre")] == [ids("book")]
    assert {k: v for k, v in everywhere.translations.items() if k in expected} == expected
    # a language filter that drops the source drops the concept (its targets never become keys)
    with pytest.raises(DataError, match="no word of the table has a translation"):
        CodeSwitchTable.from_alignment_table(table_path, data.tokenizer_dir, languages=["fr", "de"])
    with pytest.raises(ConfigError, match="^codeswitch_direction"):
        CodeSwitchTable.from_concepts([[(1,), (2,)]], WORD_START, SPECIAL, direction="both")
