"""Stage 1: filters against hand-computed values, MinHash against exact Jaccard, and clean() end to end."""
from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.dedup import (DedupConfig, candidate_probability, jaccard, lsh_params, minhash_signature,
                                      shingles)
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.filters import (DocumentFilter, FilterConfig, alpha_word_fraction, char_repetition_ratio,
                                   count_urls, duplicate_line_fraction, duplicate_ngram_char_fraction,
                                   top_ngram_char_fraction)
from fuxi.data_pipeline.textstats import word_units

WORDS = ("river mountain quiet window garden yellow market letter silver bridge forest thunder candle "
         "harbor lantern meadow pencil rocket saddle timber velvet wander zephyr anchor basket cactus "
         "dragon engine falcon glacier hammer island jungle kettle ladder magnet needle orchard").split()


def prose(seed: int, n: int = 220) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + ".")
    return " ".join(sentences)


def test_word_units_by_script():
    assert word_units("Hello, world!  foo") == ["Hello,", "world!", "foo"]
    assert word_units("我爱北京abc def") == ["我", "爱", "北", "京", "abc", "def"]
    assert word_units("สวัสดี") == list("สวัสดี")


def test_repetition_measures_match_hand_computed_values():
    assert duplicate_line_fraction("a\nb\na\n\na") == pytest.approx(2 / 4)
    units = "the cat the cat the dog".split()
    # most frequent bigram ("the","cat") occurs twice, 6 characters each time, of 18 characters in all
    assert top_ngram_char_fraction(units, 2) == pytest.approx(2 * 6 / 18)
    # 2-grams: "the cat" new, "cat the" new, "the cat" seen -> 6 chars, skip 2, "the dog" new
    assert duplicate_ngram_char_fraction(units, 2) == pytest.approx(6 / 18)
    assert alpha_word_fraction(["abc", "123", "a1", "--"]) == pytest.approx(0.5)
    assert count_urls("see https://x.org/a and www.example.com, not a.b") == 2


def test_char_repetition_ratio_against_bruteforce():
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(rng.choice("abcab ") for _ in range(rng.randint(5, 300)))
        n = 4
        grams = Counter(text[i:i + n] for i in range(len(text) - n + 1))
        freqs = sorted(grams.values(), reverse=True)
        k = int(len(freqs) ** 0.5)
        expected = sum(f for f in freqs[:k] if f > 1) / sum(freqs) if freqs else 0.0
        assert char_repetition_ratio(text, n) == pytest.approx(expected)


def test_document_filter_reasons():
    f = DocumentFilter(FilterConfig())
    good = prose(1)
    assert f.reject_reason(good, "en") is None
    assert f.reject_reason("too short to keep", "en") == "too_short"
    assert f.reject_reason(good + " https://example.org/page", "en") == "url"
    assert f.reject_reason("\n".join(["the same line again and again"] * 10 + [good]), "en") == "dup_lines"
    assert f.reject_reason(" ".join(["spam eggs"] * 200), "en") == "top_ngram"
    assert f.reject_reason("@@ ## %% " * 40 + good[:200], "en") == "alpha_words"
    assert DocumentFilter(FilterConfig(flagged_words=["river"], max_flagged_word_fraction=0.01)) \
        .reject_reason(good, "en") == "flagged_words"
    code = "def f(x):\n    return x + 1\n\n" * 20
    assert f.reject_reason(code, "code_python") is None  # repetition rules do not apply to code
    assert f.reject_reason("x = 1\n" + "y" * 1200 + "\n" + code, "code_python") == "max_line_length"
    assert f.reject_reason("{}[]();\n" * 100, "code_python") == "alnum_fraction"


def test_minhash_estimates_jaccard():
    cfg = DedupConfig(num_perm=256)
    base = prose(2, 400)
    words = base.split()
    for changed in (5, 40, 120):
        rng = random.Random(changed)
        other = list(words)
        for i in rng.sample(range(len(words)), changed):
            other[i] = "zzz%d" % i
        other = " ".join(other)
        a, b = shingles(base, cfg.ngram), shingles(other, cfg.ngram)
        sa_, sb_ = set(a.tolist()), set(b.tolist())
        exact = len(sa_ & sb_) / len(sa_ | sb_)
        assert jaccard(a, b) == pytest.approx(exact)
        estimate = float((minhash_signature(a, cfg) == minhash_signature(b, cfg)).mean())
        assert abs(estimate - exact) < 0.1, (changed, exact, estimate)


def test_banding_reaches_the_recall_target():
    """The S-curve 1 - (1 - s^r)^b of the chosen banding: >= 99% at the threshold, unlike the old 9x13."""
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and (b, r) == (21, 6)
    assert candidate_probability(0.8, b, r) >= 0.99 > candidate_probability(0.8, 9, 13) + 0.5
    # the fewest candidates below the threshold among the bandings that reach the target
    s = np.linspace(0, 0.8, 501)
    area = np.trapezoid(candidate_probability(s, b, r), s)
    for r2 in range(1, 129):
        b2 = 128 // r2
        if candidate_probability(0.8, b2, r2) >= 0.99:
            assert np.trapezoid(candidate_probability(s, b2, r2), s) >= area - 1e-12


def _write(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


GERMAN = ("Die Stadt liegt an einem breiten Fluss, und im Sommer sitzen die Menschen am Ufer und trinken Kaffee. "
          "Am Abend gehen viele Familien durch den Park, und die Kinder spielen auf der Wiese, bis es dunkel wird. "
          "Im Winter ist es kalt, aber die Märkte in der Altstadt sind voller Licht und es riecht nach Zimt.")


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean_src")
    base = prose(10, 300)
    near = base.split()
    near[50] = "different"
    near[150] = "changed"
    decomposed = unicodedata.normalize("NFD", "Café résumé naïve " + prose(11))
    train = [{"text": base, "lang": "en"}, {"text": "  " + base.replace(" ", "\n", 3) + "  ", "lang": "en"},
             {"text": " ".join(near), "lang": "en"}, {"text": prose(12), "lang": "en"},
             {"text": decomposed, "lang": "en"}, {"text": prose(13) + " http://spam.example", "lang": "en"},
             {"text": GERMAN, "lang": ""}, {"text": prose(14), "lang": "en", "source": "unit-test"},
             {"text": "short", "lang": "en"}]
    valid = [{"text": prose(12), "lang": "en"}, {"text": prose(15), "lang": "en"}]
    _write(root / "train" / "mixed.jsonl", train)
    _write(root / "valid" / "en.jsonl", valid)
    out1, out2 = root / "out1", root / "out2"
    report = clean(root, out1, num_proc=1, progress=False)
    clean(root, out2, progress=False, executor=ExecutorConfig(tasks=3, workers=2, progress=False), chunk_mb=0.001)
    return root, out1, out2, report


def test_clean_removes_duplicates_and_counts_everything(cleaned):
    root, out, _, report = cleaned
    s = report.stats["train"]["en"]
    # exact: the re-wrapped copy, and the copy of a validation document (valid is cleaned first)
    assert s["input"] == 8 and s["exact_dup"] == 2 and s["near_dup"] == 1
    assert s["filter_url"] == 1 and s["filter_too_short"] == 1 and s["kept"] == 3
    assert report.stats["valid"]["en"]["kept"] == 2
    kept = [json.loads(line) for line in (out / "train" / "en.jsonl").read_text().splitlines()]
    texts = [d["text"] for d in kept]
    assert prose(12) not in texts  # decontaminated: it is in the validation split
    assert len(texts) == s["kept"]
    assert any(d.get("source") == "unit-test" for d in kept)
    assert json.loads((out / "clean_report.json").read_text())["stats"]["train"]["en"]["kept"] == s["kept"]
    assert "exact dup" in report.table()


def test_clean_normalizes_and_identifies_language(cleaned):
    _, out, _, report = cleaned
    texts = [json.loads(line)["text"] for line in (out / "train" / "en.jsonl").read_text().splitlines()]
    cafe = [t for t in texts if t.startswith("Caf")][0]
    assert cafe == unicodedata.normalize("NFC", cafe) and "é" in cafe
    german = [json.loads(line) for line in (out / "train" / "de.jsonl").read_text().splitlines()]
    assert [d["text"] for d in german] == [GERMAN]
    assert report.stats["train"]["de"]["langid_filled"] == 1


def test_clean_is_independent_of_process_count(cleaned):
    _, out1, out2, _ = cleaned
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*.jsonl"))
    assert files1 == sorted(p.relative_to(out2) for p in out2.rglob("*.jsonl"))
    for rel in files1:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes()
    assert not list(out1.rglob("*.tmp"))


def test_clean_holdout_and_language_selection(tmp_path):
    docs = [{"text": prose(100 + i), "lang": "en"} for i in range(10)] + [{"text": GERMAN, "lang": "de"}]
    _write(tmp_path / "in.jsonl", docs)
    report = clean(tmp_path / "in.jsonl", tmp_path / "out", holdout_fraction=0.2, languages=["en"], num_proc=1,
                   progress=False)
    assert report.stats["train"]["en"]["held_out"] == 2  # docs 0 and 5 of 10
    assert report.stats["train"]["de"]["not_selected"] == 1
    assert len((tmp_path / "out" / "valid" / "en.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "out" / "train" / "en.jsonl").read_text().splitlines()) == 8
