"""Stage 2: the tokenizer (both backends), its HF files, the fast encoders and the fertility report."""
from __future__ import annotations

import json

import pytest

from fuxi.common.errors import ConfigError
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.corpus import bundled_corpus, iter_documents
from fuxi.data_pipeline.encoders import PROBE, FastEncoder
from fuxi.data_pipeline.fertility import fertility, plot_fertility
from fuxi.data_pipeline.textstats import word_units
from fuxi.data_pipeline.tokenizer import (EOS_ID, EOS_TOKEN, META_FILE, TokenizerConfig, load_tokenizer, tokenizer_hash,
                                     train_tokenizer)


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_clean")
    clean(bundled_corpus(), out, max_docs_per_language=12, progress=False)
    return out


@pytest.fixture(scope="module")
def bpe(cleaned, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_tokenizer(cleaned / "train", out, TokenizerConfig(vocab_size=1500, max_docs_per_language=8))


@pytest.fixture(scope="module")
def valid_texts(cleaned):
    return [d.text for d in iter_documents(cleaned / "valid")]


@pytest.mark.hf
def test_bpe_files_load_with_autotokenizer(bpe, valid_texts):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(bpe))
    assert type(hf).__name__ in ("GPT2TokenizerFast", "GPT2Tokenizer")
    assert hf.eos_token == hf.bos_token == EOS_TOKEN and hf.eos_token_id == hf.bos_token_id == EOS_ID
    tok = load_tokenizer(bpe)
    assert tok.get_vocab_size() == 1500 and tok.token_to_id(EOS_TOKEN) == 0
    for text in valid_texts[:40]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == text  # byte-level BPE is lossless on every script
        assert hf.decode(ids) == text
    meta = json.loads((bpe / META_FILE).read_text())
    assert meta["hash"] == tokenizer_hash(bpe) and meta["eos_id"] == 0
    assert max(meta["training_docs_per_language"].values()) <= 8  # per-language cap
    assert len(meta["training_docs_per_language"]) >= 25


def test_gpt2_pretokenization_keeps_digit_runs(bpe):
    tok = load_tokenizer(bpe)
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("In 2024 there were 123456 tokens")]
    assert pieces == ["In", "Ġ2024", "Ġthere", "Ġwere", "Ġ123456", "Ġtokens"]
    # a literal EOS string inside a document is text, not the EOS id
    assert EOS_ID not in tok.encode("a <|endoftext|> b", add_special_tokens=False).ids


def test_fast_encoder_matches_hf(bpe, valid_texts):
    enc = FastEncoder(bpe)
    reference = load_tokenizer(bpe)
    expected = [e.ids for e in reference.encode_batch(valid_texts + [PROBE], add_special_tokens=False)]
    assert enc.encode_batch(valid_texts + [PROBE]) == expected
    assert FastEncoder(bpe, prefer_fast=False).encode_batch(valid_texts[:5]) == expected[:5]


@pytest.mark.hf
def test_sentencepiece_backend_is_equivalent_to_its_hf_export(cleaned, valid_texts, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    out = train_tokenizer(cleaned / "train", tmp_path / "spm",
                          TokenizerConfig(vocab_size=1200, backend="sentencepiece", max_docs_per_language=8))
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    tok = load_tokenizer(out)
    assert sp.id_to_piece(0) == EOS_TOKEN and tok.token_to_id(EOS_TOKEN) == 0
    hf_ids = [e.ids for e in tok.encode_batch(valid_texts, add_special_tokens=False)]
    assert hf_ids == sp.encode(valid_texts)  # the HF conversion reproduces sentencepiece token for token
    assert all(tok.decode(ids) == text for ids, text in zip(hf_ids, valid_texts))
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token_id == hf.bos_token_id == 0
    assert hf(valid_texts[0], add_special_tokens=False)["input_ids"] == hf_ids[0]
    assert FastEncoder(out).name == "sentencepiece"
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(cleaned / "train", tmp_path / "tiny", TokenizerConfig(vocab_size=400, backend="sentencepiece"))


def test_tokenizer_config_errors():
    with pytest.raises(ConfigError, match="^backend"):
        TokenizerConfig(backend="wordpiece").validate()
    with pytest.raises(ConfigError, match="^vocab_size"):
        TokenizerConfig(vocab_size=100).validate()


def test_fertility_matches_direct_counts(bpe, cleaned, tmp_path):
    stats = fertility(bpe, cleaned / "valid")
    tok = load_tokenizer(bpe)
    for lang in ("en", "zh", "th"):
        texts = [d.text for d in iter_documents(cleaned / "valid" / f"{lang}.jsonl")]
        tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
        words = sum(len(word_units(t)) for t in texts)
        assert stats[lang]["tokens_per_word"] == pytest.approx(tokens / words)
        assert stats[lang]["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in texts) / tokens)
    # trained on a capped number of documents per language, the tokenizer merges bytes in every language
    assert all(s["bytes_per_token"] > 1.2 for s in stats.values()), stats
    png = plot_fertility(stats, tmp_path / "fertility.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_inputs(corpus, layout: str, texts: list[str]) -> None:
    """The same documents as per-language folders of text files, or as one .jsonl.gz file."""
    import gzip

    if layout == "folders":
        (corpus / "en").mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (corpus / "en" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    else:
        with gzip.open(corpus, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "lang": "en"}) + "\n" for t in texts)


@pytest.mark.parametrize("layout", ["folders", "gz"])
def test_tokenizer_task_retrains_when_inputs_change_in_any_layout(tmp_path, layout):
    """Every input layout iter_documents reads is part of the task's "inputs changed?" stamp (not only
    <lang>.jsonl files); the job hash lands in the metadata file of the switched-in folder."""
    from fuxi.data_pipeline.engine import ExecutorConfig
    from fuxi.data_pipeline.tokenizer_stage import train_tokenizer_task

    corpus = tmp_path / ("corpus" if layout == "folders" else "corpus.jsonl.gz")
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(3)]
    run = dict(config=TokenizerConfig(vocab_size=300), executor=ExecutorConfig(workers=1, progress=False))
    _write_inputs(corpus, layout, texts[:2])
    out = train_tokenizer_task(corpus, tmp_path / "tok", **run)
    first = json.loads((out / META_FILE).read_text())
    assert first["training_docs_per_language"] == {"en": 2} and first["job"]
    assert train_tokenizer_task(corpus, tmp_path / "tok", **run) == out  # unchanged inputs: reused
    assert json.loads((out / META_FILE).read_text()) == first
    _write_inputs(corpus, layout, texts)  # one more document
    second = json.loads((train_tokenizer_task(corpus, tmp_path / "tok", **run) / META_FILE).read_text())
    assert second["training_docs_per_language"] == {"en": 3} and second["job"] != first["job"]
    assert not (tmp_path / ".tok.work").exists()
