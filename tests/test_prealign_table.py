"""The PreAlign alignment table (data_pipeline/align_table.py; docs/methods.md §3.2): both JSONL forms, FreeDict
parsing on hand-made dictd files, the builder's choice of translation, the `fuxi data align-table` command, and
the shipped table with its provenance note."""
from __future__ import annotations

import gzip
import json

import pytest

from fuxi.common.errors import DataError
from fuxi.data_pipeline.align_table import (SHIPPED_TABLE, AlignmentTable, AlignTableConfig, Concept,
                                       build_alignment_table, parse_freedict_entry, read_alignment_table,
                                       read_freedict, write_alignment_table)

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(n: int) -> str:
    digits = ""
    while True:
        n, r = divmod(n, 64)
        digits = B64[r] + digits
        if n == 0:
            return digits


def write_dictd(prefix, entries: list[tuple[str, str]]) -> None:
    """A dictd pair: `.dict.dz` (gzip of the definitions) and `.index` (headword, base64 offset, length)."""
    data, index = b"", []
    for head, definition in entries:
        raw = definition.encode("utf-8")
        index.append(f"{head}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    with gzip.open(f"{prefix}.dict.dz", "wb") as f:
        f.write(data)
    with open(f"{prefix}.index", "w", encoding="utf-8") as f:
        f.write("00databaseinfo\tB\tC\n" + "\n".join(index) + "\n")


def test_read_both_forms_and_merge_concepts(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([
        json.dumps({"index": 3, "words": "bank $ 银行 $ banque", "langs": ["en", "zh", "fr"]}),
        json.dumps({"src_text": "water", "tgt_text": "eau", "src_lang": "en", "tgt_lang": "fr"}),
        json.dumps({"index": 3, "words": "Bank", "langs": ["de"]}),
        json.dumps({"words": ["cat", "chat"]}),
    ]) + "\n", encoding="utf-8")
    table = read_alignment_table(path)
    assert [c.words for c in table.concepts] == [["bank", "银行", "banque", "Bank"], ["water", "eau"],
                                                 ["cat", "chat"]]
    assert table.concepts[0].langs == ["en", "zh", "fr", "de"] and table.languages() == ["en", "zh", "fr", "de"]
    assert len({c.index for c in table.concepts}) == 3
    assert list(table.pairs())[:2] == [("bank", "银行", "en", "zh"), ("bank", "banque", "en", "fr")]
    # round trip in both forms
    multi = read_alignment_table(write_alignment_table(table, tmp_path / "m.jsonl"))
    assert [c.words for c in multi.concepts] == [c.words for c in table.concepts]
    pairs = read_alignment_table(write_alignment_table(table, tmp_path / "p.jsonl", form="pairs"))
    assert len(pairs) == 5 and pairs.concepts[0].words == ["bank", "银行"]


@pytest.mark.parametrize("line,message", [
    ("{not json", "t.jsonl:2: not valid JSON"),
    ('{"foo": 1}', "t.jsonl:2: expected"),
    ('{"words": "a $ b", "langs": ["en"]}', "t.jsonl:2: langs"),
    ('{"words": "a $ ", "index": 9}', "t.jsonl:2: words must hold non-empty"),
    ('{"words": "solo", "index": 9}', "fewer than two words"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"words": "a $ b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_alignment_table(path)


def test_parse_freedict_entries():
    assert parse_freedict_entry("water /wɔːtər/\n1. aquatique\n2. eau, onde\n3. abreuver, arroser\n", "fr") == [
        "aquatique", "eau", "onde", "abreuver", "arroser"]
    german = ("bank /bˈaŋk/\nBank <fem>, Gruppe <fem>\n   Synonyms: {credit institution}\n"
              "      \"the bank\"  - die Bank\n see: {banks}\n")
    assert parse_freedict_entry(german, "de") == ["Bank", "Gruppe"]
    japanese = "bank //bæŋk// <n>\n1. 貯金箱\ndevice used to store coins\n2. 銀行, バンク 2.\ninstitution\n"
    assert parse_freedict_entry(japanese, "ja") == ["貯金箱", "銀行", "バンク"]  # English glosses dropped
    assert parse_freedict_entry("love /lʌv/\n1. faire l'amour\n2. aimer\n", "fr") == ["aimer"]  # phrases dropped
    assert parse_freedict_entry("the /ðæntɑːktik/\nSydpolen\n", "sv") == []  # "the Antarctic", spaces lost
    assert parse_freedict_entry("house /haus/\nдо́м\n", "ru") == ["дом"]  # stress mark removed


def test_read_freedict_and_build_choose_translations(tmp_path):
    dict_dir, parallel, corpus = tmp_path / "dictd", tmp_path / "parallel", tmp_path / "corpus"
    for d in (dict_dir, parallel, corpus):
        d.mkdir()
    write_dictd(dict_dir / "freedict-eng-fra", [
        ("water", "water /wɔːtər/\n1. aquatique\n2. eau, onde\n"),
        ("house", "house /haus/\nmaison\n"),
        ("cancel", "cancel /kænsəl/\nrésilier, annuler\n"),
        ("the", "Arctic /ɑːktik/\nArctique\n"),  # the index points at another headword's entry
        ("IS", "IS /ˈaɪ ˈɛs/\nIslande\n"),
        ("is", "is /ɪz/\nest\n"),
    ])
    (parallel / "en-fr.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"src": "_Cancel", "tgt": "_Annuler", "source": "gettext:x"},
        {"src": "Open the file", "tgt": "Ouvrir le fichier", "source": "gettext:x"},
        {"src": "Door", "tgt": "Porte", "source": "gettext:x"},
    ]) + "\n", encoding="utf-8")
    (corpus / "en.jsonl").write_text("\n".join(json.dumps({"text": t, "lang": "en"}) for t in [
        "the water is in the house and the water is cold", "cancel the water house is is"]) + "\n")
    (corpus / "fr.jsonl").write_text(json.dumps({"text": "l'eau est froide, eau eau maison est", "lang": "fr"}) + "\n")

    fra = read_freedict(dict_dir / "freedict-eng-fra", "fr")
    assert fra["water"] == ["aquatique", "eau", "onde"] and "the" not in fra and fra["is"] == ["est"]

    cfg = AlignTableConfig(languages=["fr"], freedict_dir=str(dict_dir), parallel_dir=str(parallel),
                           corpus_dir=str(corpus), min_english_count=1)
    table, report = build_alignment_table(cfg)
    chosen = {c.words[0]: (c.words[1], c.sources[1]) for c in table.concepts}
    assert chosen["water"] == ("eau", "freedict")  # an early sense seen in French text beats the first sense
    assert chosen["cancel"] == ("annuler", "both")  # attested in the parallel text and the dictionary
    assert chosen["door"] == ("porte", "parallel")  # sentence-case UI label lower-cased
    assert chosen["is"] == ("est", "freedict") and chosen["house"] == ("maison", "freedict")
    assert "the" not in chosen and "open" not in chosen
    order = [c.words[0] for c in table.concepts]
    assert order.index("water") < order.index("house")  # by English frequency
    assert report.per_language["fr"]["words"] == len(table) and report.per_language["fr"]["both"] == 1
    again, _ = build_alignment_table(cfg)
    assert [c.words for c in again.concepts] == [c.words for c in table.concepts]


def test_cli_writes_table_and_provenance(tmp_path, capsys):
    from fuxi.data_pipeline.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "en.jsonl").write_text(json.dumps({"text": "cancel door door", "lang": "en"}) + "\n")
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    (parallel / "en-de.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"src": "Cancel", "tgt": "Abbrechen"}, {"src": "Door", "tgt": "Tür"}]) + "\n")
    out = tmp_path / "table.jsonl"
    assert main(["data", "align-table", str(out), "--no-freedict", "--parallel", str(parallel), "--corpus",
                 str(corpus), "--languages", "de"]) == 0
    table = read_alignment_table(out)
    assert [c.words for c in table.concepts] == [["door", "Tür"], ["cancel", "Abbrechen"]]  # German keeps case
    sources = json.loads((tmp_path / "table.sources.json").read_text())
    assert sources["per_language"]["de"]["parallel"] == 2
    assert "2 concepts" in capsys.readouterr().out


def test_shipped_table_covers_the_bundled_languages_with_provenance():
    table = read_alignment_table(SHIPPED_TABLE)
    assert 1000 <= len(table) <= 3000
    counts = table.words_per_language()
    bundled = ["ar", "bg", "cs", "de", "el", "es", "fa", "fr", "he", "hi", "id", "it", "ja", "ko", "nl", "pl",
               "pt", "ru", "sv", "th", "tr", "uk", "vi", "zh"]
    assert counts["en"] == len(table) and all(counts.get(lang, 0) > 0 for lang in bundled)
    assert all(c.langs[0] == "en" and len(c.words) >= 2 for c in table.concepts)
    sources = json.loads(SHIPPED_TABLE.with_suffix(".sources.json").read_text())
    assert sources["concepts"] == len(table)
    assert {lang: s["words"] for lang, s in sources["per_language"].items()} == \
        {lang: n for lang, n in counts.items() if lang != "en"}
    readme = (SHIPPED_TABLE.parent / "README.md").read_text()
    assert "GPL" in readme and "CC-BY-SA" in readme and "fuxi data align-table" in readme
    # spot checks a reader can verify
    by_word = {c.words[0]: dict(zip(c.langs, c.words)) for c in table.concepts}
    assert by_word["name"]["fr"] == "nom" and by_word["error"]["de"] == "Fehler" and by_word["day"]["es"] == "día"


def test_concepts_need_two_words():
    with pytest.raises(DataError):
        read_alignment_table("/nonexistent/table.jsonl")
    assert len(AlignmentTable([Concept(0, ["a", "b"], ["en", "fr"])])) == 1
