"""A small real dataset for tests in every room, built once per test process from the bundled corpus.

    from data_helpers import tiny_dataset

    @pytest.fixture(scope="session")
    def data(tmp_path_factory):
        return tiny_dataset(tmp_path_factory)      # PreparedData(tokenizer_dir, train_manifest, val_manifest)

    cfg = data.data_config(num_workers=0)          # a DataConfig for build_train_loader / build_val_batches

29 languages (25 natural, 4 code), at most 24 documents each per split, a 1024-token byte-level BPE
tokenizer (EOS/BOS id 0), seq_len 64. Building takes a few seconds on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

from fuxi.data_pipeline.prepare import PreparedData, prepare_dataset

TINY = dict(vocab_size=1024, seq_len=64, max_docs_per_language=24, shard_bytes=128 << 10, seed=0)
_CACHE: dict[tuple, PreparedData] = {}


def tiny_dataset(tmp_path_factory, **overrides) -> PreparedData:
    """The cached tiny dataset (keyword arguments of prepare_dataset override the defaults above)."""
    kwargs = {**TINY, **overrides}
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    if key not in _CACHE:
        out: Path = tmp_path_factory.mktemp("fuxi_tiny_data")
        _CACHE[key] = prepare_dataset(out, **kwargs)
    return _CACHE[key]


def rewrite_shard(manifest_path: Path, index: int, change) -> Path:
    """Rewrite shard `index` of a manifest with `change(tokens, lang_ids, doc_ids) -> (tokens, lang_ids,
    doc_ids)` applied to every sample (any dtypes and lengths), and record the new file's size and sha256 in
    the manifest: a fault only decoding the samples can find. Returns the shard path."""
    import json

    import webdataset as wds

    from fuxi.common.atomic import sha256_file
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.shards import ShardReader, npy_bytes

    manifest = load_manifest(manifest_path)
    shard = manifest.shards[index]
    reader = ShardReader(manifest, shard)
    samples = [(key, reader.read(i)) for i, (key, *_) in enumerate(reader._index)]
    reader.close()
    path = manifest.shard_path(shard)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for key, block in samples:
            tokens, lang_ids, doc_ids = change(block.tokens, block.lang_ids, block.doc_ids)
            tar.write({"__key__": key, "tokens.npy": npy_bytes(tokens), "lang.npy": npy_bytes(lang_ids),
                       "doc.npy": npy_bytes(doc_ids)})
    raw = json.loads(Path(manifest_path).read_text())
    raw["shards"][index].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    Path(manifest_path).write_text(json.dumps(raw))
    return path


def small_corpus(root: Path, languages: tuple[str, ...], train_docs: int, valid_docs: int, duplicates: int) -> Path:
    """train/ and valid/ JSONL (`<lang>.jsonl`) of the first documents of the bundled corpus per language, each
    file ending with `duplicates` exact copies of its first documents (for dedup to find)."""
    import json

    from fuxi.data_pipeline.corpus import bundled_corpus, iter_jsonl

    for split, n in (("train", train_docs), ("valid", valid_docs)):
        for lang in languages:
            docs = [{"text": d.text, "lang": lang} for d in iter_jsonl(bundled_corpus() / split / f"{lang}.jsonl")][:n]
            path = root / split / f"{lang}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs + docs[:duplicates]),
                            encoding="utf-8")
    return root


def take(loader, n: int) -> list:
    """The first n batches of a loader (fails if it has fewer)."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the loader ended")
