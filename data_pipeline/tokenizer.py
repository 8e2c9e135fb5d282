"""Stage 2, the tokenizer: byte-level BPE as in FuxiTranyu (§3.3), or sentencepiece BPE as the alternative.

Byte-level BPE uses the HF `tokenizers` library with GPT-2's pre-tokenisation regex and byte-level
post-processing; numbers are not split into digits (GPT-2's regex keeps digit runs together). It is trained
on at most N documents per language (FuxiTranyu: 1M), sampled uniformly per language, so that small
languages are not drowned by large ones. Id 0 is "<|endoftext|>", used as both EOS and BOS.

Both backends are saved as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json, class
GPT2TokenizerFast for BPE) that `AutoTokenizer.from_pretrained(dir)` loads offline; the sentencepiece backend
also keeps its `spm.model`, and its tokenizer.json is a lossless conversion of it (tested token for token).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, get_args

from fuxi.common.atomic import write_json
from fuxi.common.errors import ConfigError, DataError
from fuxi.common.staging import staged_folder
from fuxi.common.typed_config import check_choices, require_at_least
from fuxi.data_pipeline.corpus import iter_documents

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
Backend = Literal["bpe", "sentencepiece"]
BACKENDS = get_args(Backend)
META_FILE = "fuxi_tokenizer.json"
# What train_tokenizer writes (a tokenizer folder holding anything else is not replaced).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spm.model", META_FILE)


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    backend: Backend = "bpe"
    # FuxiTranyu trains on up to 1M documents per language.
    max_docs_per_language: int = 1_000_000
    min_frequency: int = 2
    seed: int = 0
    model_max_length: int = 4096

    def validate(self) -> None:
        check_choices(self)
        floor = 258 if self.backend == "bpe" else 300
        if self.vocab_size < floor:
            raise ConfigError("vocab_size", f"must be >= {floor} for the {self.backend} backend "
                                  f"(256 bytes + special tokens), got {self.vocab_size}")
        require_at_least(self, 1, "max_docs_per_language")


def sample_per_language(source: str | Path, max_docs: int, seed: int) -> dict[str, list[str]]:
    """Uniform sample (reservoir) of at most `max_docs` documents of each language in `source`."""
    rng = random.Random(seed)
    samples: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for doc in iter_documents(source):
        if doc.lang is None:
            raise DataError(f"{doc.origin}: document has no language label; run `fuxi data clean` first")
        n = seen.get(doc.lang, 0)
        bucket = samples.setdefault(doc.lang, [])
        if n < max_docs:
            bucket.append(doc.text)
        else:
            j = rng.randrange(n + 1)
            if j < max_docs:
                bucket[j] = doc.text
        seen[doc.lang] = n + 1
    if not samples:
        raise DataError(f"{source}: no documents to train the tokenizer on")
    return samples


def _interleave(samples: dict[str, list[str]]) -> Iterator[str]:
    """Round-robin over languages so the trainer's view is not ordered by language."""
    lists = [samples[lang] for lang in sorted(samples)]
    for i in range(max(len(v) for v in lists)):
        for v in lists:
            if i < len(v):
                yield v[i]


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    tok = Tokenizer(models.BPE())
    # GPT-2 pre-tokenisation (its regex, digits kept in runs) on the byte-level alphabet.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _train_bpe(texts: Iterable[str], count: int, config: TokenizerConfig):
    from tokenizers import pre_tokenizers, trainers
    tok = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=count)
    return tok


def character_coverage(texts: Iterable[str], vocab_size: int, ceiling: float = 0.9995,
                       floor: float = 0.98) -> float:
    """The share of characters sentencepiece must cover with its own pieces: 0.9995 unless that needs more
    than half the vocabulary (small vocabularies with CJK text), never below sentencepiece's minimum 0.98;
    byte fallback covers the rest."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(text)
    freqs = sorted(counts.values(), reverse=True)
    total = sum(freqs)
    budget = max(1, (vocab_size - 259) // 2)
    coverage = ceiling if len(freqs) <= budget else max(floor, min(ceiling, sum(freqs[:budget]) / total))
    running, needed = 0, 0
    for f in freqs:  # characters sentencepiece will require at this coverage
        if running >= coverage * total:
            break
        running += f
        needed += 1
    if needed + 259 > vocab_size:
        raise ConfigError("vocab_size", f"{vocab_size} is too small for the sentencepiece backend on this "
                              f"corpus: covering {coverage:.1%} of its characters takes {needed} pieces; use "
                              f"at least {needed + 259 + 64} or the bpe backend")
    return coverage


def _train_sentencepiece(texts: list[str], config: TokenizerConfig, num_threads: int) -> bytes:
    import sentencepiece as spm
    model = io.BytesIO()
    coverage = character_coverage(texts, config.vocab_size)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=config.vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=False, normalization_rule_name="identity",  # nmt_nfkc is lossy
        add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=coverage,
        unk_id=1, bos_id=-1, eos_id=-1, pad_id=-1, control_symbols=[EOS_TOKEN],  # EOS takes id 0
        max_sentence_length=1 << 20, num_threads=num_threads, minloglevel=2)
    return model.getvalue()


def sentencepiece_to_tokenizers(model_proto: bytes):
    """A `tokenizers` BPE equivalent to a sentencepiece BPE model (byte fallback, identity normalisation, no
    dummy prefix): merges are ranked by the merged piece's score, which is how sentencepiece picks them."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {p: i for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((pid, normal[left], normal[right], left, right))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def save_hf_tokenizer(tok, out_dir: Path, config: TokenizerConfig, backend: str) -> None:
    """tokenizer.json plus the small config files transformers reads (written directly, so the pipeline does
    not need transformers; a test loads the result with AutoTokenizer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
               "unk_token": EOS_TOKEN if backend == "bpe" else "<unk>"}
    tokenizer_config = {
        # GPT2TokenizerFast in transformers 4 (AutoTokenizer adds "Fast"); GPT2Tokenizer is the same class in 5.
        "tokenizer_class": "GPT2Tokenizer" if backend == "bpe" else "PreTrainedTokenizerFast",
        **special, "model_max_length": config.model_max_length, "add_prefix_space": False,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", special)


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """sha256 of the canonical tokenizer.json: equal hashes mean identical tokenisation."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{tokenizer_dir}: no tokenizer.json (not a tokenizer directory?)")
    data = json.loads(path.read_text(encoding="utf-8"))
    canonical = json.dumps({k: data.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer", "model")},
                           sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_tokenizer(tokenizer_dir: str | Path):
    """The fast `tokenizers.Tokenizer` (what packing uses); special tokens in text are encoded as text."""
    from tokenizers import Tokenizer
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{tokenizer_dir}: no tokenizer.json (not a tokenizer directory?)")
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" inside a document is not an EOS
    return tok


def train_tokenizer(corpus: str | Path, out_dir: str | Path, config: TokenizerConfig | None = None,
                    num_threads: int = 2, job: str | None = None) -> Path:
    """Train on the cleaned corpus (`<lang>.jsonl` files) and save HF tokenizer files to `out_dir`. `job`: the
    hash of the inputs and settings (tokenizer_stage.py), recorded in the metadata file."""
    config = config or TokenizerConfig()
    config.validate()
    out_dir = Path(out_dir)
    samples = sample_per_language(corpus, config.max_docs_per_language, config.seed)
    count = sum(len(v) for v in samples.values())
    # Written into a staging folder that replaces out_dir when complete (common/staging.py): a failed run never leaves
    # a half-written tokenizer, nor damages one already in out_dir.
    with staged_folder(out_dir, owned=TOKENIZER_FILES) as staging:
        if config.backend == "bpe":
            tok = _train_bpe(_interleave(samples), count, config)
        else:
            proto = _train_sentencepiece(list(_interleave(samples)), config, num_threads)
            (staging / "spm.model").write_bytes(proto)
            tok = sentencepiece_to_tokenizers(proto)
        if tok.token_to_id(EOS_TOKEN) != EOS_ID:
            raise DataError(f"tokenizer: {EOS_TOKEN} got id {tok.token_to_id(EOS_TOKEN)}, expected {EOS_ID}")
        if tok.get_vocab_size() < config.vocab_size:
            log.warning("tokenizer: the corpus supports only %d of the %d requested vocabulary entries",
                        tok.get_vocab_size(), config.vocab_size)
        save_hf_tokenizer(tok, staging, config, config.backend)
        write_json(staging / META_FILE, {
            "backend": config.backend, "vocab_size": tok.get_vocab_size(), "requested": asdict(config),
            "eos_id": EOS_ID, "bos_id": EOS_ID, "training_docs_per_language": {k: len(v) for k, v in
                                                                                sorted(samples.items())},
            "hash": tokenizer_hash(staging), **({"job": job} if job is not None else {})})
    return out_dir
