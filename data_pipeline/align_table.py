"""The word-alignment table of PreAlign (docs/methods.md §3.2): which words of different languages mean the same thing.

Two on-disk forms, both JSON lines, both read by `read_alignment_table`:

    multi-way  {"index": 7, "words": "water $ eau $ Wasser", "langs": ["en", "fr", "de"], "sources": [...]}
    one-to-one {"src_text": "water", "tgt_text": "eau", "src_lang": "en", "tgt_lang": "fr"}

A multi-way line is one concept: " $ " separates its translations, `index` is the concept id (lines with the
same index are one concept), `langs` (ours, optional) names each word's language. A one-to-one line is a
concept of two words. PreAlign uses the table twice: the alignment initialisation pulls the representations
of a concept's words together (pretrain/stages/prealign/), and code-switching swaps a word in the input for
one of its translations (data_pipeline/codeswitch.py).

`build_alignment_table` makes a multi-way English-pivoted table from
  * FreeDict English-to-X word lists (Debian `dict-freedict-eng-<xxx>`, /usr/share/dictd/*.index + .dict.dz),
  * the bundled corpus's sentence-parallel pairs (corpus/parallel/en-<lang>.jsonl): pairs whose English side
    is a single word and whose other side is a single word (UI terms such as "Cancel" -> "Annuler").
English words are the most frequent words of the English corpus; for each language the translation is the
candidate attested in the parallel text first, then the one most frequent in that language's corpus, then the
dictionary's first sense. A translation is kept however the tokenizer splits it (PreAlign works on word spans).
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, get_args

from fuxi.common.atomic import atomic_write, write_json
from fuxi.common.errors import ConfigError, DataError
from fuxi.common.typed_config import require_at_least, require_choice
from fuxi.data_pipeline.jsonl import iter_json_records
from fuxi.data_pipeline.textstats import word_units

log = logging.getLogger(__name__)

SEPARATOR = " $ "
EARLY_SENSES = 3  # dictionary candidates counted as the word's main senses
DEFAULT_FREEDICT_DIR = "/usr/share/dictd"
SHIPPED_TABLE = Path(__file__).resolve().parent / "corpus" / "align" / "align_table.jsonl"
TableForm = Literal["multi", "pairs"]  # one line per concept, or one-to-one pairs (see the module docstring)
TABLE_FORMS = get_args(TableForm)

# FreeDict names languages by ISO 639-3; the project uses ISO 639-1.
ISO3_TO_ISO1 = {
    "ara": "ar", "bul": "bg", "ces": "cs", "deu": "de", "ell": "el", "fra": "fr", "hin": "hi", "ind": "id",
    "ita": "it", "jpn": "ja", "nld": "nl", "pol": "pl", "por": "pt", "rus": "ru", "spa": "es", "swe": "sv",
    "tur": "tr", "ukr": "uk", "zho": "zh", "kor": "ko", "vie": "vi", "heb": "he", "fas": "fa", "tha": "th",
    "dan": "da", "fin": "fi", "hun": "hu", "nor": "no", "hrv": "hr", "srp": "sr", "lit": "lt", "afr": "af",
}
ISO1_TO_ISO3 = {v: k for k, v in ISO3_TO_ISO1.items()}
LATIN_SCRIPT = frozenset({"en", "fr", "de", "es", "it", "pt", "nl", "sv", "pl", "cs", "tr", "id", "vi", "da",
                          "fi", "hu", "no", "hr", "lt", "af"})
SPACELESS = frozenset({"zh", "ja", "th"})

_ENGLISH_WORD = re.compile(r"[A-Za-z]+")
_ANNOTATION = re.compile(r"\([^)]*\)|\[[^\]]*\]|<[^>]*>|\{[^}]*\}")
_STRIP = ".,:;!?\"'«»„“”‘’()[]…*/-_&"
_CAMEL = re.compile(r"[a-zà-ÿα-ωа-я][A-ZÀ-ÞΑ-ΩА-Я]")
_PRONUNCIATION = re.compile(r"/([^/]*)/")


# ---- the table ----------------------------------------------------------------------------------------------

@dataclass
class Concept:
    """One meaning: its words in several languages (langs[i] is words[i]'s language, None when unknown)."""

    index: int
    words: list[str]
    langs: list[str | None]
    sources: list[str] = field(default_factory=list)


@dataclass
class AlignmentTable:
    concepts: list[Concept]

    def __len__(self) -> int:
        return len(self.concepts)

    def languages(self) -> list[str]:
        """Languages named in the table, in first-seen order."""
        seen: dict[str, None] = {}
        for concept in self.concepts:
            for lang in concept.langs:
                if lang is not None:
                    seen.setdefault(lang, None)
        return list(seen)

    def words_per_language(self) -> dict[str | None, int]:
        counts: Counter = Counter()
        for concept in self.concepts:
            counts.update(concept.langs)
        return dict(counts)

    def pairs(self) -> Iterator[tuple[str, str, str | None, str | None]]:
        """(src, tgt, src_lang, tgt_lang): the first word of each concept against each of the others."""
        for concept in self.concepts:
            for word, lang in zip(concept.words[1:], concept.langs[1:]):
                yield concept.words[0], word, concept.langs[0], lang


def _check_word(word: object, origin: str, key: str) -> str:
    if not isinstance(word, str) or not word.strip():
        raise DataError(f"{origin}: {key} must hold non-empty strings, got {word!r}")
    return word.strip()


def read_alignment_table(path: str | Path) -> AlignmentTable:
    """Read either form (see the module docstring); a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: alignment table not found")
    by_index: dict[int, Concept] = {}
    order: list[int] = []
    next_free = 0
    for origin, record in iter_json_records(path):
        if "words" in record:
            raw = record["words"]
            words = raw.split("$") if isinstance(raw, str) else raw
            if not isinstance(words, list):
                raise DataError(f"{origin}: words must be a ' $ '-separated string or a list")
            words = [_check_word(w, origin, "words") for w in words]
            langs = record.get("langs", [None] * len(words))
            if not isinstance(langs, list) or len(langs) != len(words):
                raise DataError(f"{origin}: langs must list one language per word ({len(words)} words)")
            index = record.get("index", None)
            if index is None:
                index = next_free
            if not isinstance(index, int) or isinstance(index, bool):
                raise DataError(f"{origin}: index must be an integer, got {index!r}")
        elif "src_text" in record and "tgt_text" in record:
            words = [_check_word(record["src_text"], origin, "src_text"),
                     _check_word(record["tgt_text"], origin, "tgt_text")]
            langs = [record.get("src_lang"), record.get("tgt_lang")]
            index = record.get("index", next_free)
        else:
            raise DataError(f"{origin}: expected {{\"words\": \"a $ b\", \"index\": k}} or "
                            f"{{\"src_text\": ..., \"tgt_text\": ...}}, got keys {sorted(record)}")
        sources = record.get("sources", [])
        if index in by_index:
            concept = by_index[index]
            for w, lang in zip(words, langs):
                if (w, lang) not in zip(concept.words, concept.langs):
                    concept.words.append(w)
                    concept.langs.append(lang)
        else:
            by_index[index] = Concept(index, list(words), list(langs), list(sources))
            order.append(index)
        next_free = max(next_free, index + 1)
    concepts = [by_index[i] for i in order]
    small = [c.index for c in concepts if len(c.words) < 2]
    if small:
        raise DataError(f"{path}: concepts {small[:10]} have fewer than two words (nothing to align)")
    if not concepts:
        raise DataError(f"{path}: the alignment table is empty")
    return AlignmentTable(concepts)


def write_alignment_table(table: AlignmentTable, path: str | Path, form: TableForm = "multi") -> Path:
    """Write atomically in the multi-way form (one line per concept) or one-to-one pairs."""
    require_choice("form", form, TABLE_FORMS)
    path = Path(path)
    with atomic_write(path) as f:
        if form == "multi":
            for c in table.concepts:
                record = {"index": c.index, "words": SEPARATOR.join(c.words), "langs": c.langs}
                if c.sources:
                    record["sources"] = c.sources
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            for i, (src, tgt, src_lang, tgt_lang) in enumerate(table.pairs()):
                f.write(json.dumps({"src_text": src, "tgt_text": tgt, "src_lang": src_lang,
                                    "tgt_lang": tgt_lang}, ensure_ascii=False) + "\n")
    return path


# ---- sources ------------------------------------------------------------------------------------------------

def _b64_number(text: str) -> int:
    """dictd index offsets/lengths: base64 digits, most significant first."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for char in text:
        value = value * 64 + alphabet.index(char)
    return value


def clean_word(text: str, lang: str) -> str | None:
    """One dictionary/UI word as it would appear in text, or None if it is not a single word of `lang`."""
    text = unicodedata.normalize("NFD", text)
    text = text.replace("\u0301", "") if lang in ("ru", "bg", "uk") else text  # stress marks
    text = unicodedata.normalize("NFC", text).replace("\u2010", "-").strip().strip(_STRIP).strip()
    if not text or any(ch.isspace() for ch in text) or "~" in text or "$" in text or len(text) > 40:
        return None
    if any(ch.isdigit() for ch in text) or not any(ch.isalpha() for ch in text):
        return None
    if _CAMEL.search(text):  # "LosPaísesBajos": a phrase whose spaces the source lost
        return None
    letters = [ch for ch in text if ch.isalpha()]
    ascii_only = all(ord(ch) < 128 for ch in letters)
    if lang in LATIN_SCRIPT:
        if not all("LATIN" in unicodedata.name(ch, "") for ch in letters):
            return None
    elif ascii_only:  # an English gloss in a non-Latin-script dictionary
        return None
    return text


def parse_freedict_entry(definition: str, lang: str) -> list[str]:
    """Candidate single-word translations of one FreeDict entry, in the dictionary's order.

    Line 1 is the headword (with pronunciation and part of speech); translation lines follow, optionally
    numbered ("1. eau, onde"); indented lines are examples, notes or cross-references and are skipped. Some
    older lists index a phrase under its first word with the spaces lost ("the /ðæntɑːktik/" = "the
    Antarctic"): an entry whose pronunciation is far longer than its headword is such a phrase and is skipped."""
    lines = definition.split("\n")
    head = lines[0].split(" /")[0].strip()
    pron = _PRONUNCIATION.search(lines[0])
    if pron and len(pron.group(1).strip("/")) > 2 * len(head) + 1:
        return []
    candidates: list[str] = []
    for line in lines[1:]:
        if not line.strip() or line[0].isspace():
            continue
        line = re.sub(r"^\d+\.\s*", "", line.strip())
        line = re.sub(r"\s+\d+\.$", "", line)
        line = _ANNOTATION.sub(" ", line)
        for part in re.split(r"[,;]", line):
            word = clean_word(part, lang)
            if word is not None and word not in candidates:
                candidates.append(word)
    return candidates


def read_freedict(path_prefix: str | Path, lang: str, headwords: set[str] | None = None) -> dict[str, list[str]]:
    """{lower-case English headword: candidate translations} from one FreeDict `.index` + `.dict.dz` pair.
    Only single-word headwords (and, if given, those in `headwords`) are read."""
    index_path, dict_path = Path(f"{path_prefix}.index"), Path(f"{path_prefix}.dict.dz")
    for p in (index_path, dict_path):
        if not p.is_file():
            raise DataError(f"{p}: FreeDict file not found (install the Debian package dict-freedict-*)")
    data = gzip.open(dict_path).read()
    exact: dict[str, list[str]] = {}  # headword as written -> candidates
    with open(index_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[0].startswith("00database") or not parts[0]:
                continue
            head = parts[0].strip()
            if not _ENGLISH_WORD.fullmatch(head):
                continue
            key = head.lower()
            if headwords is not None and key not in headwords:
                continue
            try:
                offset, length = _b64_number(parts[1]), _b64_number(parts[2])
            except ValueError:
                raise DataError(f"{index_path}:{lineno}: bad offset/length {parts[1:]!r}") from None
            definition = data[offset:offset + length].decode("utf-8", errors="replace")
            if definition.split(" /")[0].split("\n")[0].strip().lower() != key:
                continue  # the index points at another headword's entry (a phrase indexed by one word)
            bucket = exact.setdefault(head, [])
            for word in parse_freedict_entry(definition, lang):
                if head.islower() and word[:1].isupper() and lang != "de":
                    continue  # a proper noun for a common word: a mis-indexed phrase ("the" -> "Ukraina")
                if word not in bucket:
                    bucket.append(word)
    # "is" is not "IS" (Iceland) or "Is": capitalised headwords count only where no lower-case one exists.
    out: dict[str, list[str]] = {}
    for head in sorted(exact, key=lambda h: h != h.lower()):
        if exact[head] and (head == head.lower() or head.lower() not in out):
            out.setdefault(head.lower(), []).extend(w for w in exact[head] if w not in out.get(head.lower(), []))
    return out


def parallel_word_pairs(parallel_dir: str | Path, lang: str) -> Counter:
    """Counter of (english word, translation) from en-<lang>.jsonl pairs where both sides are single words."""
    path = Path(parallel_dir) / f"en-{lang}.jsonl"
    pairs: Counter = Counter()
    if not path.is_file():
        return pairs
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                src, tgt = record["src"], record["tgt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: expected {{\"src\": ..., \"tgt\": ...}}") from None
            src, tgt = src.replace("_", "").replace("&", ""), tgt.replace("_", "").replace("&", "")
            english = clean_word(src, "en")
            target = clean_word(tgt, lang)
            if english is None or target is None or not _ENGLISH_WORD.fullmatch(english):
                continue
            if len(target) > 1 and target.isupper():  # "DOSYA": an all-caps UI label
                target = target.title() if lang == "de" else target.lower()
            elif english[0].isupper() and english[1:].islower() and target[:1].isupper() and lang != "de":
                target = target[0].lower() + target[1:]  # sentence-case UI labels
            pairs[(english.lower(), target)] += 1
    return pairs


class CorpusFrequency:
    """How often a word occurs in one language's text (substring counts for scripts written without spaces)."""

    def __init__(self, texts: list[str], lang: str):
        self.lang = lang
        self.text = "\n".join(texts)
        self.counts = Counter() if lang in SPACELESS else Counter(w.lower() for w in word_units(self.text))

    def __call__(self, word: str) -> int:
        if self.lang in SPACELESS:
            return self.text.count(word)
        return self.counts[word.lower().strip(_STRIP)]


def language_texts(corpus_dir: str | Path, lang: str) -> list[str]:
    from fuxi.data_pipeline.readers import iter_jsonl
    path = Path(corpus_dir) / f"{lang}.jsonl"
    return [doc.text for doc in iter_jsonl(path)] if path.is_file() else []


def _package_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "not installed"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- the builder --------------------------------------------------------------------------------------------

@dataclass
class AlignTableConfig:
    # Target languages (ISO 639-1); default: every language with a FreeDict list or a parallel file.
    languages: list[str] | None = None
    freedict_dir: str | None = DEFAULT_FREEDICT_DIR
    # Folder of en-<lang>.jsonl sentence pairs (default: the bundled corpus's parallel/); "" disables it.
    parallel_dir: str | None = None
    # Folder of <lang>.jsonl documents for word frequencies (default: the bundled corpus's train/).
    corpus_dir: str | None = None
    max_concepts: int = 1500
    # A concept needs at least this many translations besides English.
    min_translations: int = 1
    # English words must occur at least this often in the English corpus (parallel-text words are exempt).
    min_english_count: int = 2

    def validate(self) -> None:
        require_at_least(self, 1, "max_concepts", "min_translations")
        if self.languages is not None and ("en" in self.languages or not self.languages):
            raise ConfigError("languages", f"the non-English languages to translate into, got {self.languages}")


@dataclass
class BuildReport:
    languages: list[str]
    concepts: int
    per_language: dict[str, dict]  # lang -> {"words", "freedict", "parallel", "both", "package", "version"}
    config: dict

    def table(self) -> str:
        from fuxi.common.tables import format_table
        rows = [[lang, s["words"], s["freedict"], s["parallel"], s["both"], s.get("package") or "-"]
                for lang, s in self.per_language.items()]
        return format_table(["lang", "words", "from freedict", "from parallel", "in both", "package"], rows)


def _default_dirs(cfg: AlignTableConfig) -> tuple[Path | None, Path]:
    from fuxi.data_pipeline.corpus import BUNDLED_CORPUS
    parallel = cfg.parallel_dir
    parallel = BUNDLED_CORPUS / "parallel" if parallel is None else (Path(parallel) if parallel else None)
    corpus = Path(cfg.corpus_dir) if cfg.corpus_dir else BUNDLED_CORPUS / "train"
    return parallel, corpus


def available_languages(cfg: AlignTableConfig) -> list[str]:
    parallel, _ = _default_dirs(cfg)
    langs = set()
    if cfg.freedict_dir and Path(cfg.freedict_dir).is_dir():
        for p in Path(cfg.freedict_dir).glob("freedict-eng-*.index"):
            code = ISO3_TO_ISO1.get(p.name[len("freedict-eng-"):-len(".index")])
            if code:
                langs.add(code)
    if parallel is not None and parallel.is_dir():
        langs.update(p.stem[3:] for p in parallel.glob("en-*.jsonl"))
    return sorted(langs)


def build_alignment_table(cfg: AlignTableConfig | None = None) -> tuple[AlignmentTable, BuildReport]:
    """English-pivoted multi-way table from FreeDict lists and single-word parallel pairs (module docstring)."""
    cfg = cfg or AlignTableConfig()
    cfg.validate()
    parallel_dir, corpus_dir = _default_dirs(cfg)
    languages = cfg.languages or available_languages(cfg)
    if not languages:
        raise DataError("languages: no FreeDict lists under "
                        f"{cfg.freedict_dir} and no parallel files under {parallel_dir}: nothing to build from")

    english = CorpusFrequency(language_texts(corpus_dir, "en"), "en")
    english_counts = Counter({w: n for w, n in english.counts.items()
                              if _ENGLISH_WORD.fullmatch(w) and len(w) > 1})
    if not english_counts:
        raise DataError(f"{corpus_dir}/en.jsonl: no English text to rank words by frequency")
    parallel = {lang: (parallel_word_pairs(parallel_dir, lang) if parallel_dir else Counter())
                for lang in languages}
    # Candidate English words: frequent corpus words, plus every single-word English side of the parallel text.
    pool = {w for w, n in english_counts.items() if n >= cfg.min_english_count}
    for pairs in parallel.values():
        pool.update(en for en, _ in pairs)

    translations: dict[str, dict[str, tuple[str, str]]] = {}  # en word -> lang -> (translation, source)
    per_language: dict[str, dict] = {}
    for lang in languages:
        freedict: dict[str, list[str]] = {}
        package = None
        if cfg.freedict_dir and lang in ISO1_TO_ISO3:
            prefix = Path(cfg.freedict_dir) / f"freedict-eng-{ISO1_TO_ISO3[lang]}"
            if Path(f"{prefix}.index").is_file():
                freedict = read_freedict(prefix, lang, pool)
                package = f"dict-freedict-eng-{ISO1_TO_ISO3[lang]}"
        frequency = CorpusFrequency(language_texts(corpus_dir, lang), lang)
        attested: dict[str, Counter] = {}
        for (en, tgt), n in parallel[lang].items():
            attested.setdefault(en, Counter())[tgt] += n
        stats = {"words": 0, "freedict": 0, "parallel": 0, "both": 0, "package": package,
                 "version": _package_version(package) if package else None}
        for en in pool:
            dict_cands = freedict.get(en, [])
            par_cands = attested.get(en, Counter())
            candidates = list(dict.fromkeys(dict_cands + list(par_cands)))
            if not candidates:
                continue

            def score(word: str) -> tuple:
                """Attested in both sources > in the parallel text > an early sense seen in the language's text
                > any sense seen there > the dictionary's order."""
                position = dict_cands.index(word) if word in dict_cands else len(dict_cands)
                freq = frequency(word)
                early = position < EARLY_SENSES and freq > 0
                return (par_cands[word] > 0 and word in dict_cands, par_cands[word], early, freq if early else 0,
                        freq, -position)

            best = max(candidates, key=score)
            in_dict, in_par = best in dict_cands, par_cands[best] > 0
            source = "both" if in_dict and in_par else ("freedict" if in_dict else "parallel")
            translations.setdefault(en, {})[lang] = (best, source)
        per_language[lang] = stats

    ranked = sorted(translations, key=lambda w: (-english_counts.get(w, 0), w))
    concepts: list[Concept] = []
    for en in ranked:
        found = translations[en]
        if len(found) < cfg.min_translations:
            continue
        words, langs, sources = [en], ["en"], ["corpus"]
        for lang in languages:
            if lang in found:
                word, source = found[lang]
                words.append(word)
                langs.append(lang)
                sources.append(source)
        concepts.append(Concept(len(concepts), words, langs, sources))
        if len(concepts) >= cfg.max_concepts:
            break
    if not concepts:
        raise DataError("no concept has a translation; check the FreeDict directory and the parallel files")
    for concept in concepts:
        for lang, source in zip(concept.langs[1:], concept.sources[1:]):
            stats = per_language[lang]
            stats["words"] += 1
            stats["freedict"] += source in ("freedict", "both")
            stats["parallel"] += source in ("parallel", "both")
            stats["both"] += source == "both"
    per_language = {lang: s for lang, s in per_language.items() if s["words"]}
    report = BuildReport(list(per_language), len(concepts), per_language,
                         {**asdict(cfg), "parallel_dir": str(parallel_dir) if parallel_dir else None,
                          "corpus_dir": str(corpus_dir)})
    return AlignmentTable(concepts), report


def write_build_report(report: BuildReport, path: str | Path) -> Path:
    write_json(path, asdict(report))
    return Path(path)
