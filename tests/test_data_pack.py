"""Stages 3-4: packing into blocks with language/document ids, shards and the manifest."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fuxi.data_pipeline.manifest import load_manifest
from fuxi.data_pipeline.pack import pack
from fuxi.data_pipeline.packing import language_files, plan_parts, read_documents
from fuxi.data_pipeline.shards import ShardReader, iter_blocks
from fuxi.data_pipeline.tokenizer import load_tokenizer
from data_helpers import tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _blocks_by_language(manifest, languages=None):
    """All blocks of each language in manifest order, read with our random-access reader."""
    out = {}
    for shard in manifest.shards:
        if languages is not None and shard.language not in languages:
            continue
        reader = ShardReader(manifest, shard)
        out.setdefault(shard.language, []).extend(reader.read(i) for i in range(len(reader)))
    return out


def test_blocks_reproduce_the_shuffled_token_stream(data, tmp_path):
    """Independent reference: tokenize each part's documents in the planned order with the HF tokenizer,
    append EOS, concatenate, cut into blocks; the shards must hold exactly those blocks."""
    clean_train = data.train_manifest.parent.parent / "clean" / "train"
    # parts of 7 documents, so languages have several parts (each dropping its own tail)
    langs = ["code_python", "en", "hi", "zh"]
    path = pack(clean_train, data.tokenizer_dir, tmp_path / "p", seq_len=64, docs_per_part=7, shard_bytes=40_000,
                num_proc=2, progress=False, languages=langs)
    manifest = load_manifest(path)
    tok = load_tokenizer(data.tokenizer_dir)
    blocks = _blocks_by_language(manifest)
    parts = plan_parts(language_files(clean_train), manifest.languages, seed=0, docs_per_part=7)
    assert manifest.languages == langs
    for lang in langs:
        expected_tokens, expected_docs = [], []
        for part in (p for p in parts if p.lang == lang):
            stream, docs = [], []
            for k, text in enumerate(read_documents(part.path, part.offsets, lang)):
                ids = tok.encode(text, add_special_tokens=False).ids + [0]
                stream += ids
                docs += [part.first_doc + k] * len(ids)
            full = len(stream) // 65 * 65
            expected_tokens += stream[:full]
            expected_docs += docs[:full]
        got = blocks[lang]
        assert np.array_equal(np.concatenate([b.tokens for b in got]), np.array(expected_tokens, np.uint32)), lang
        assert np.array_equal(np.concatenate([b.doc_ids for b in got]), np.array(expected_docs, np.uint32)), lang
        assert all((b.lang_ids == manifest.languages.index(lang)).all() for b in got)
        assert all(b.tokens.dtype == np.uint32 and b.lang_ids.dtype == np.uint16 for b in got)
    stats = manifest.language_stats["en"]
    assert stats.samples * 65 + stats.dropped_tokens == stats.tokens
    assert len({s.path for s in manifest.shards if s.language == "en"}) > 1


def test_document_ids_change_exactly_after_eos(data):
    manifest = load_manifest(data.train_manifest)
    for blocks in _blocks_by_language(manifest, {"en", "ja", "ar", "code_c"}).values():
        for b in blocks[:20]:
            changes = np.flatnonzero(np.diff(b.doc_ids.astype(np.int64)) != 0)
            assert np.all(b.tokens[changes] == 0)  # a new document starts only after an EOS
            assert np.all(np.diff(b.doc_ids.astype(np.int64)) >= 0)


def test_manifest_records_counts_hashes_and_bytes_per_token(data):
    manifest = load_manifest(data.train_manifest)
    manifest.check_files(checksums=True)
    raw = json.loads(data.train_manifest.read_text())
    assert raw["block_len"] == 65 and raw["dtypes"]["tokens"] == "uint32"
    for shard in manifest.shards:
        assert sum(shard.tokens_per_language.values()) == shard.samples * 65
    tokens = manifest.tokens_per_language()
    for lang, s in manifest.language_stats.items():
        assert tokens[lang] == s.samples * 65
        assert manifest.bytes_per_token[lang] == pytest.approx(s.utf8_bytes / s.tokens)
        assert raw["language_stats"][lang]["bytes_per_token"] == pytest.approx(s.utf8_bytes / s.tokens)
    assert load_manifest(data.val_manifest).languages == manifest.languages


def test_webdataset_reads_the_same_samples(data):
    manifest = load_manifest(data.val_manifest)
    ours = [b for blocks in _blocks_by_language(manifest).values() for b in blocks]
    theirs = [b for _, b in iter_blocks(manifest)]
    assert len(ours) == len(theirs) == sum(s.samples for s in manifest.shards)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_ids, b.doc_ids)


def test_pack_is_deterministic_across_process_counts(data, tmp_path):
    clean_valid = data.val_manifest.parent.parent / "clean" / "valid"
    previous = os.umask(0o002)  # a cluster group's umask: files come out group-writable, as open() makes them
    try:
        one = load_manifest(pack(clean_valid, data.tokenizer_dir, tmp_path / "a", split="valid", seq_len=64,
                                 num_proc=1, progress=False))
    finally:
        os.umask(previous)
    two = load_manifest(pack(clean_valid, data.tokenizer_dir, tmp_path / "b", split="valid", seq_len=64,
                             num_proc=2, progress=False, fast_encoder=False))
    assert [(s.path, s.sha256) for s in one.shards] == [(s.path, s.sha256) for s in two.shards]
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left behind
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "a").iterdir()} == {0o664}
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "b").iterdir()} == {0o666 & ~previous}


@pytest.mark.parametrize("bad, message", [(b'{"txt": "c"}', 'not a JSON object with a "text" field'),
                                          (b'{"text": "\xff"}', r"not valid UTF-8 \(byte 0xff at column 11\)"),
                                          (b'{"text": "c", "lang": "fr"}', "document has lang 'fr'")])
def test_read_documents_without_line_numbers_names_the_line(tmp_path, bad, message):
    """Without the plan's line numbers (`lines=None`) an error still reads `file:line: ...`, the line counted
    from the byte offset."""
    import re

    from fuxi.common.errors import DataError
    from fuxi.data_pipeline.packing import line_offsets

    path = tmp_path / "en.jsonl"
    path.write_bytes(b'{"text": "a", "lang": "en"}\n\n{"text": "b"}\n' + bad + b"\n")
    offsets, lines = line_offsets(path)
    assert lines.tolist() == [1, 3, 4]
    assert read_documents(str(path), offsets[:2], "en") == ["a", "b"]
    for given in (lines, None):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: {message}"):
            read_documents(str(path), offsets, "en", given)


def test_pack_tasks_take_the_tokenizer_hash_and_vocabulary_from_the_plan(data, tmp_path, monkeypatch):
    """The plan stage parses tokenizer.json once; the pack tasks (here 2) do not hash or load it again."""
    from fuxi.data_pipeline.engine import ExecutorConfig
    import fuxi.data_pipeline.pack_stages as pack_stages
    from fuxi.data_pipeline.tokenizer import tokenizer_hash

    calls = []
    for name in ("tokenizer_hash", "load_tokenizer"):
        original = getattr(pack_stages, name)
        monkeypatch.setattr(pack_stages, name, lambda d, f=original, n=name: (calls.append(n), f(d))[1])
    clean_valid = data.val_manifest.parent.parent / "clean" / "valid"
    path = pack(clean_valid, data.tokenizer_dir, tmp_path / "out", split="valid", seq_len=64,
                languages=load_manifest(data.val_manifest).languages, shard_bytes=128 << 10,
                executor=ExecutorConfig(tasks=2, workers=1, progress=False))
    assert sorted(calls) == ["load_tokenizer", "tokenizer_hash"]
    manifest = load_manifest(path)
    assert manifest.tokenizer_hash == tokenizer_hash(data.tokenizer_dir)
    assert manifest.vocab_size == load_tokenizer(data.tokenizer_dir).get_vocab_size()
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in load_manifest(data.val_manifest).shards]
