"""The bundled corpus (data_pipeline/corpus) and the document readers."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fuxi.common.errors import DataError
from fuxi.data_pipeline.corpus import BUNDLED_CORPUS, find_splits, iter_documents
from fuxi.data_pipeline.textstats import script_of

CODE_PREFIX = "code_"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict[str, list[dict]]]:
    return {split: {p.stem: _read(p) for p in sorted((BUNDLED_CORPUS / split).glob("*.jsonl"))}
            for split in ("train", "valid")}


def test_languages_scripts_and_code(corpus):
    langs = set(corpus["train"])
    natural = {lang for lang in langs if not lang.startswith(CODE_PREFIX)}
    code = langs - natural
    assert len(natural) >= 12 and len(code) >= 3
    assert {"en", "zh", "ru", "ar", "de", "fr", "es"} <= natural and ({"hi", "th"} & natural)
    # Scripts holding at least 20% of a language's letters, from the Unicode character names.
    scripts = set()
    for lang in natural:
        counts = Counter(script_of(c) for doc in corpus["train"][lang] for c in doc["text"] if c.isalpha())
        total = sum(counts.values())
        scripts |= {s for s, n in counts.items() if n >= 0.2 * total}
    assert {"LATIN", "CYRILLIC", "CJK", "ARABIC"} <= scripts
    assert {"DEVANAGARI", "THAI"} <= scripts
    assert len(scripts) >= 5
    for doc in corpus["train"]["code_python"]:  # real code: every whole-file Python document parses
        if doc["text"].startswith(("#!", '"""', "#", "import", "from")) and len(doc["text"]) < 7900:
            compile(doc["text"], doc["source"], "exec")


def test_sizes_are_uneven_and_small(corpus):
    sizes = {lang: sum(len(d["text"].encode()) for d in docs) for lang, docs in corpus["train"].items()}
    natural = {k: v for k, v in sizes.items() if not k.startswith(CODE_PREFIX)}
    assert max(natural.values()) / min(natural.values()) > 20
    total = sum(p.stat().st_size for p in BUNDLED_CORPUS.rglob("*") if p.is_file())
    assert total <= 8 * 1024 * 1024


def test_validation_split_is_held_out(corpus):
    assert set(corpus["valid"]) == set(corpus["train"])
    for lang, docs in corpus["valid"].items():
        assert docs, lang
        train_texts = {d["text"] for d in corpus["train"][lang]}
        assert not any(d["text"] in train_texts for d in docs), lang
        assert all(d["lang"] == lang and d["source"] for d in docs)


def test_provenance_and_parallel_pairs(corpus):
    sources = json.loads((BUNDLED_CORPUS / "sources.json").read_text(encoding="utf-8"))
    for lang in corpus["train"]:
        packages = sources["packages"][lang]
        assert packages and all(p["license"] for p in packages.values()), lang
    assert "licen" in (BUNDLED_CORPUS / "README.md").read_text(encoding="utf-8").lower()
    pair_files = sorted((BUNDLED_CORPUS / "parallel").glob("en-*.jsonl"))
    assert len(pair_files) >= 12
    for path in pair_files:
        pairs = _read(path)
        assert len(pairs) >= 50, path
        assert all(p["src"] and p["tgt"] and p["src"] != p["tgt"] and p["source"] for p in pairs), path


def test_readers_jsonl_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello", "lang": "en"}\n\n{"text": "x", "lang": "und"}\n')
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "doc1.txt").write_text("Hallo Welt")
    docs = list(iter_documents(tmp_path))
    assert [(d.text, d.lang) for d in docs] == [("hello", "en"), ("x", None), ("Hallo Welt", "de")]
    assert find_splits(BUNDLED_CORPUS).keys() == {"train", "valid"}


@pytest.mark.parametrize("line, message", [('{"text": "ok"}\n{not json\n', ":2: not valid JSON"),
                                           ('{"lang": "en"}\n', ':1: expected an object with a string field')])
def test_reader_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line)
    with pytest.raises(DataError, match=message) as err:
        list(iter_documents(path))
    assert "bad.jsonl" in str(err.value)
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.jsonl"))


def test_chunked_reading_equals_iter_documents_documents_and_errors(tmp_path):
    """clean's chunks (byte ranges of JSONL, whole .jsonl.gz files, groups of text files) read the same
    documents as iter_documents, and a bad line gives the same message, also in a chunk starting mid-file."""
    import gzip

    from fuxi.data_pipeline.chunks import plan_chunks, read_chunk

    def chunked(source, chunk_bytes=64):
        return [d for c in plan_chunks({"train": source}, chunk_bytes) for d in read_chunk(c)]

    lines = [json.dumps({"text": f"document {i} " * 3, "lang": "en" if i % 2 else "und", "source": f"s{i}"})
             for i in range(12)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:6]) + "\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[6:]) + "\n")
    (tmp_path / "ru").mkdir()
    for i in range(3):
        (tmp_path / "ru" / f"{i}.txt").write_text(f"документ {i}", encoding="utf-8")
    expected = [(d.text, d.lang, d.source) for d in iter_documents(tmp_path)]
    assert len(expected) == 15 and len(plan_chunks({"train": tmp_path}, 64)) > 3
    assert [(d.text, d.lang, d.source) for d in chunked(tmp_path)] == expected
    for bad in (b"{not json", b'{"lang": "en"}', b'["text"]', b'{"text": "\xff"}'):
        path = tmp_path / "bad" / "c.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(("\n".join(lines[:5]) + "\n").encode() + bad + b"\n")
        with pytest.raises(DataError) as whole:
            list(iter_documents(path))
        with pytest.raises(DataError) as chunk:
            chunked(path)
        assert str(chunk.value) == str(whole.value) and f"{path}:6: " in str(whole.value)
