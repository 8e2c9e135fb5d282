"""Corpora as they ship: the same documents written as parquet, `.jsonl.zst`, FineWeb-2 and Dolma folders,
language folders, and `datasets` folders clean to exactly the output of the same documents as one JSONL file
(the reference); a language given by the data is kept; a file of an unknown kind is a one-line error naming it.
Every corpus here is written by the test (pyarrow, zstandard, datasets)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from fuxi.common.errors import DataError
from fuxi.data_pipeline.chunks import plan_chunks, read_chunk
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.clean_report import CleanReport
from fuxi.data_pipeline.cli import main
from fuxi.data_pipeline.corpus import BUNDLED_CORPUS, find_splits, iter_documents
from fuxi.data_pipeline.lang_codes import normalize_language
from fuxi.data_pipeline.readers import RecordFields

# Project code -> FineWeb-2 folder (ISO 639-3 + script); the language folders sort in the order of this list.
LANGUAGES = {"ar": "arb_Arab", "code_python": "code_python", "de": "deu_Latn", "en": "eng_Latn", "ru": "rus_Cyrl",
             "zh": "cmn_Hani"}
UNLABELLED = "unknown"  # the language folder of documents without a language (sorts before zh)


def _bundled(lang: str, n: int) -> list[str]:
    lines = (BUNDLED_CORPUS / "valid" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, str | None]]:
    """(text, lang) in language-folder order (so every layout reads them in the same order per language);
    documents from the bundled corpus' validation split, which pass the default filters."""
    labelled = [(t, lang) for lang in LANGUAGES for t in _bundled(lang, 2 if lang == "code_python" else 5)]
    unlabelled = [(t, None) for t in _bundled("en", 8)[5:] + _bundled("de", 7)[5:]]
    return [d for d in labelled if d[1] < UNLABELLED] + unlabelled + [d for d in labelled if d[1] > UNLABELLED]


def _write_jsonl(path: Path, records: list[dict], compress: bool = False) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)


def _records(docs, field: str = "lang", **extra) -> list[dict]:
    return [{"text": t, **({field: lang} if lang else {}), **extra} for t, lang in docs]


def _by_folder(docs) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for text, lang in docs:
        folders.setdefault(lang or UNLABELLED, []).append(text)
    return folders


def _iso(lang: str | None) -> tuple[str | None, str | None]:
    """FineWeb-2's "language" and "language_script" values for a project code (code: as it is, no script)."""
    if lang is None or lang.startswith("code_"):
        return lang, None
    code, script = LANGUAGES[lang].split("_")
    return code, script


def _fineweb_table(lang: str, texts: list[str]) -> pa.Table:
    """FineWeb-2's columns; code rows have no language (their folder names it)."""
    code, script = _iso(lang) if not lang.startswith("code_") else (None, None)
    return pa.table({"text": texts, "id": [f"<urn:{lang}:{i}>" for i in range(len(texts))],
                     "url": [f"https://example.org/{i}" for i in range(len(texts))],
                     "language": pa.array([code] * len(texts), pa.string()),
                     "language_script": pa.array([script] * len(texts), pa.string()),
                     "language_score": [0.99] * len(texts)})


def write_layout(layout: str, docs, root: Path) -> Path:
    """The documents in one shipping layout under root; returns the corpus path."""
    if layout == "parquet_lang":  # text + lang, a null language for the unlabelled; 4 rows per row group
        pq.write_table(pa.table({"text": [t for t, _ in docs], "lang": [lang for _, lang in docs]}),
                       root / "c.parquet", row_group_size=4)
        return root / "c.parquet"
    if layout == "parquet_language":  # text + language (ISO 639-3 codes with FineWeb-2's script column)
        iso = [_iso(lang) for _, lang in docs]
        pq.write_table(pa.table({"text": [t for t, _ in docs], "language": [i[0] for i in iso],
                                 "language_script": [i[1] for i in iso]}), root / "c.parquet", row_group_size=5)
        return root / "c.parquet"
    if layout == "jsonl_language":  # FineWeb-2's field name in JSON lines
        _write_jsonl(root / "c.jsonl", _records(docs, "language"))
        return root / "c.jsonl"
    if layout == "jsonl_zst":
        _write_jsonl(root / "c.jsonl.zst", _records(docs), compress=True)
        return root / "c.jsonl.zst"
    if layout == "mixed_folder":  # a.jsonl then b.jsonl.zst
        half = len(docs) // 2
        _write_jsonl(root / "c" / "a.jsonl", _records(docs[:half]))
        _write_jsonl(root / "c" / "b.jsonl.zst", _records(docs[half:]), compress=True)
        return root / "c"
    if layout == "language_folders_jsonl":  # de/part-0.jsonl ...: JSON documents without a language field
        for folder, texts in _by_folder(docs).items():
            _write_jsonl(root / "c" / folder / "part-0.jsonl", [{"text": t} for t in texts[:2]])
            _write_jsonl(root / "c" / folder / "part-1.jsonl", [{"text": t} for t in texts[2:]])
        return root / "c"
    if layout == "language_folders_text":  # one .txt document per file
        for folder, texts in _by_folder(docs).items():
            (root / "c" / folder).mkdir(parents=True)
            for i, text in enumerate(texts):
                (root / "c" / folder / f"{i:03d}.txt").write_text(text, encoding="utf-8")
        return root / "c"
    if layout == "dolma":  # <lang>/*.jsonl.zst, Dolma's fields
        for folder, texts in _by_folder(docs).items():
            _write_jsonl(root / "c" / folder / "0000.jsonl.zst",
                         [{"id": str(i), "text": t, "added": "2024-01-01", "metadata": {"length": len(t)}}
                          for i, t in enumerate(texts)], compress=True)
        return root / "c"
    if layout == "datasets":  # Dataset.save_to_disk in 3 data files
        import datasets
        datasets.Dataset.from_list([{"text": t, "lang": lang} for t, lang in docs]).save_to_disk(
            str(root / "c"), num_shards=3)
        return root / "c"
    raise AssertionError(layout)


def _output(out: Path) -> tuple[dict[str, bytes], dict]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}
    return files, CleanReport.load(out / "clean_report.json").stats


def _clean(source, out: Path, **kw) -> tuple[dict[str, bytes], dict]:
    clean(source, out, num_proc=1, progress=False, **kw)
    return _output(out)


@pytest.fixture(scope="module")
def reference(docs, tmp_path_factory) -> tuple[dict[str, bytes], dict]:
    root = tmp_path_factory.mktemp("reference")
    _write_jsonl(root / "ref.jsonl", _records(docs))
    return _clean(root / "ref.jsonl", root / "out")


@pytest.mark.parametrize("layout", ["parquet_lang", "parquet_language", "jsonl_language", "jsonl_zst", "mixed_folder",
                                    "language_folders_jsonl", "language_folders_text", "dolma", "datasets"])
def test_each_layout_cleans_to_the_reference(docs, reference, tmp_path, layout):
    source = write_layout(layout, docs, tmp_path)
    files, stats = _clean(source, tmp_path / "out", chunk_mb=0.001)  # several chunks per file where it can
    assert files == reference[0] and stats == reference[1]
    assert len(files) == len(LANGUAGES)
    # the given languages were kept: only the unlabelled documents were identified
    assert sum(c.get("langid_filled", 0) for c in stats["train"].values()) == sum(lang is None for _, lang in docs)


def test_fineweb2_and_dataset_dict_splits_clean_to_the_reference(docs, tmp_path):
    """FineWeb-2's <iso639-3>_<Script>/{train,test}/*.parquet and a DatasetDict (train, test) are split as the
    reference corpus with train/ and valid/ folders: test is the validation split."""
    import datasets
    labelled = [(t, lang) for t, lang in docs if lang]
    valid = [d for i, d in enumerate(labelled) if i % 3 == 0]
    train = [d for i, d in enumerate(labelled) if i % 3]
    ref = tmp_path / "ref"
    _write_jsonl(ref / "train" / "docs.jsonl", _records(train))
    _write_jsonl(ref / "valid" / "docs.jsonl", _records(valid))
    expected = _clean(ref, tmp_path / "ref_out")
    assert set(expected[1]) == {"valid", "train"}

    fineweb = tmp_path / "fineweb2" / "data"
    for split, part in (("train", train), ("test", valid)):
        for folder, texts in _by_folder(part).items():
            target = fineweb / LANGUAGES[folder] / split / "000_00000.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_fineweb_table(folder, texts), target, row_group_size=2)
    assert list(find_splits(fineweb)) == ["valid", "train"]
    assert _clean(fineweb, tmp_path / "fw_out", chunk_mb=0.001) == expected
    assert not any(c.get("langid_filled") for s in expected[1].values() for c in s.values())

    dd = datasets.DatasetDict({name: datasets.Dataset.from_list([{"text": t, "lang": lang} for t, lang in part])
                               for name, part in (("train", train), ("test", valid))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _clean(tmp_path / "dd", tmp_path / "dd_out") == expected

    with pytest.raises(DataError, match=r"its valid split is read by no split of this job \(train\)"):
        clean({"train": fineweb}, tmp_path / "x", num_proc=1, progress=False)


def test_chunked_reading_equals_whole_reading_and_datasets_own_reader(docs, tmp_path):
    """clean's chunks (parquet row groups, Arrow row ranges, whole .zst files) read the documents
    iter_documents reads, and a `datasets` folder reads as datasets.load_from_disk does."""
    import datasets
    corpus = tmp_path / "c"
    corpus.mkdir()
    pq.write_table(pa.table({"text": [t for t, _ in docs], "lang": [lang for _, lang in docs]}),
                   corpus / "a.parquet", row_group_size=3)
    _write_jsonl(corpus / "b.jsonl.zst", _records(docs), compress=True)
    ds_dir = corpus / "de"  # a `datasets` folder as a language folder, its Arrow file in batches of 4 rows
    datasets.Dataset.from_list([{"text": t} for t, _ in docs]).save_to_disk(str(ds_dir))
    data_file = next(ds_dir.glob("*.arrow"))
    table = pa.ipc.open_stream(data_file.read_bytes()).read_all()
    with pa.OSFile(str(data_file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    whole = [(d.text, d.lang) for d in iter_documents(corpus)]
    assert whole == [(t, lang) for t, lang in docs] * 2 + [(t, "de") for t, _ in docs]
    assert [d["text"] for d in datasets.load_from_disk(str(ds_dir))] == [t for t, _ in docs]
    chunks = plan_chunks({"train": corpus}, 600)
    assert {c.kind for c in chunks} == {"parquet", "jsonl.zst", "arrow"} and len(chunks) > 6
    assert [(d.text, d.lang) for c in chunks for d in read_chunk(c)] == whole


@pytest.mark.parametrize("label, code", [
    ("deu_Latn", "de"), ("cmn_Hani", "zh"), ("rus_Cyrl", "ru"), ("arb_Arab", "ar"), ("jpn_Jpan", "ja"),
    ("kor_Hang", "ko"), ("pes_Arab", "fa"), ("zsm_Latn", "ms"), ("srp_Latn", "sr"), ("srp_Cyrl", "sr"),
    ("hin_Latn", "hi_Latn"), ("gsw_Latn", "gsw_Latn"), ("yue_Hani", "yue_Hani"), ("deu", "de"), ("ger", "de"),
    ("zh-Hant", "zh"), ("de", "de"), ("code_python", "code_python"), ("pt-BR", "pt-BR"), ("und", None),
    ("unknown", None), ("", None)])
def test_fineweb2_codes_map_to_the_project_codes(label, code):
    assert normalize_language(label) == code


def test_language_from_the_record_wins_over_its_folder(tmp_path):
    _write_jsonl(tmp_path / "de" / "a.jsonl", [{"text": "x", "lang": "fr"}, {"text": "y"}, {"text": "z", "lang": "und"},
                                              {"text": "w", "language": "rus", "language_script": "Cyrl"}])
    assert [(d.text, d.lang) for d in iter_documents(tmp_path)] == [("x", "fr"), ("y", "de"), ("z", "de"),
                                                                    ("w", "ru")]


def test_configured_text_and_language_fields(docs, reference, tmp_path):
    pq.write_table(pa.table({"content": [t for t, _ in docs], "lid": [lang for _, lang in docs],
                             "lang": ["xx_Wrong"] * len(docs)}), tmp_path / "c.parquet")
    assert _clean(tmp_path / "c.parquet", tmp_path / "out", text_field="content", lang_field="lid") == reference
    with pytest.raises(DataError, match=r'c.parquet: no language column "language" \(columns: content, lid, lang\)'):
        list(iter_documents(tmp_path / "c.parquet", fields=RecordFields("content", "language")))
    with pytest.raises(DataError, match=r'c.parquet: no text column "text" \(columns: content, lid, lang\)'):
        list(iter_documents(tmp_path / "c.parquet"))


def _write(path: Path, data: bytes = b'{"text": "x"}\n') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, named", [
    (lambda r: (_write(r / "a.jsonl"), _write(r / "notes.csv")), "notes.csv"),
    (lambda r: (_write(r / "a.jsonl"), _write(r / "b.txt", b"text")), "b.txt"),  # text only in a language folder
    (lambda r: (_write(r / "de" / "a.txt", b"Hallo"), _write(r / "de" / "b.html", b"<p>")), "b.html"),
    (lambda r: _write(r / "x.json"), "x.json"),
    (lambda r: (_write(r / "deu_Latn" / "train" / "a.jsonl"), _write(r / "deu_Latn" / "README.md", b"#")),
     "README.md"),
    (lambda r: (_write(r / "deu_Latn" / "train" / "a.jsonl"), _write(r / "fra_Latn" / "a.jsonl")), "fra_Latn"),
    (lambda r: _write(r / "a.parquet", b"not parquet"), "a.parquet"),
    (lambda r: _write(r / "a.jsonl.zst", b"not zstd"), "a.jsonl.zst"),
])
def test_a_file_of_unknown_kind_is_a_one_line_error_naming_it(tmp_path, make, named):
    make(tmp_path / "c")
    source = tmp_path / "c" / "x.json" if named == "x.json" else tmp_path / "c"
    with pytest.raises(DataError) as err:
        list(iter_documents(source))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_dataset_folder_with_a_stray_file_and_a_parquet_row_without_text(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "ds"))
    _write(tmp_path / "ds" / "extra.arrow")
    with pytest.raises(DataError, match="extra.arrow: not part of the dataset"):
        list(iter_documents(tmp_path / "ds"))
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r'n.parquet: row 1: expected an object with a string field "text"'):
        list(iter_documents(tmp_path / "n.parquet"))


def test_the_cli_reports_an_unknown_file_in_one_line(tmp_path, capsys):
    _write(tmp_path / "c" / "a.jsonl")
    _write(tmp_path / "c" / "b.jsonl.bz2")
    assert main(["data", "clean", str(tmp_path / "c"), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'c' / 'b.jsonl.bz2'}: not a corpus file: expected one of .jsonl, .ndjson, .jsonl.gz, "
        f".json.gz, .jsonl.zst, .json.zst, .parquet (.txt/.md text files only inside a language folder)"]
    assert not (tmp_path / "out").exists()
