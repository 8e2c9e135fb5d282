"""Build the small multilingual corpus bundled with the repo (data_pipeline/corpus/) from text installed on a
Debian machine: gettext translation catalogs, translated man pages, fortune cookies, and source code.

The corpus is committed, because CI machines do not have these packages; this script is how it was made. On a
Debian 12 machine:

    apt-get install fortunes fortunes-zh fortunes-de fortunes-es fortunes-ru fortunes-it fortunes-pl \
        fortunes-br fortunes-bg fortunes-cs manpages-de manpages-fr manpages-ru manpages-es manpages-ja \
        manpages-zh manpages-vi manpages-uk manpages-el manpages-tr manpages-it manpages-pl manpages-nl \
        manpages-id groff-base libpython3.11-dev libjs-sphinxdoc libjs-jquery libjs-underscore postgresql-15
    python -m fuxi.data_pipeline.build_corpus            # writes data_pipeline/corpus/

The gettext catalogs come from whatever packages are installed (their set decides what is found). Each
language gets a byte budget (deliberately very uneven, like real pretraining data) filled from its sources
in a seeded order; a per-language validation split is held out; English-to-X sentence pairs from the same
catalogs go to corpus/parallel/ for the alignment table. Every document carries a `source` tag, and
corpus/sources.json and corpus/README.md record package, version and licence per source.
"""
from __future__ import annotations

import argparse
import gettext
import json
import logging
import os
import random
import re
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fuxi.common.atomic import atomic_write, write_json
from fuxi.common.tables import format_table
from fuxi.data_pipeline.corpus import BUNDLED_CORPUS
from fuxi.data_pipeline.filters import DocumentFilter, FilterConfig
from fuxi.data_pipeline.textstats import nfc, script_of

log = logging.getLogger(__name__)

# Byte budgets (UTF-8) per language: uneven on purpose, from 700 kB (English) down to 18 kB.
BUDGETS = {
    "en": 700_000, "zh": 360_000, "de": 330_000, "ru": 300_000, "fr": 260_000, "es": 210_000,
    "ja": 170_000, "it": 130_000, "pl": 120_000, "pt": 100_000, "nl": 80_000, "tr": 70_000, "uk": 70_000,
    "cs": 55_000, "vi": 55_000, "sv": 45_000, "ko": 40_000, "id": 36_000, "el": 32_000, "bg": 28_000,
    "ar": 26_000, "hi": 22_000, "th": 22_000, "he": 18_000, "fa": 18_000,
    "code_python": 260_000, "code_c": 100_000, "code_javascript": 60_000, "code_sql": 36_000,
}
# Locale directory names per language (gettext and man pages).
LOCALES = {"zh": ["zh_CN"], "pt": ["pt", "pt_BR"]}
FORTUNES = {
    "en": ["fortunes", "literature", "wisdom", "science", "people", "platitudes", "humorists", "computers",
           "education", "work", "goedel", "paradoxum", "magic", "linux", "law", "food", "pets", "songs-poems",
           "definitions", "riddles"],
    "zh": ["chinese", "tang300", "song100"],
    "de": ["de/*"], "es": ["es/*"], "ru": ["ru/*"], "it": ["it/*"], "pl": ["pl/*"], "pt": ["brasil"],
    "bg": ["bg/*"], "cs": ["cs/*"],
}
FORTUNE_DIR = Path("/usr/share/games/fortunes")
MAN_DIR = Path("/usr/share/man")
LOCALE_DIR = Path("/usr/share/locale")
# Share of a language's budget per source kind, where the kind exists (the rest is filled by the others).
MIX = {"man": 0.5, "fortune": 0.3, "gettext": 0.2}
VALID_FRACTION = 0.05
VALID_MIN_BYTES = 3_000
PARALLEL_PAIRS = 300  # per language
# ISO catalogs with everyday names (countries, major languages, currencies, scripts); the long tails of
# iso_639-3 and iso_3166-2 are mostly untranslated proper names.
ISO_PAIR_CATALOGS = {"iso_3166-1", "iso_639-2", "iso_4217", "iso_15924"}
# The script a message in a language must mostly be written in (untranslated English copies are dropped).
SCRIPTS = {"zh": {"CJK"}, "ja": {"CJK", "KANA"}, "ko": {"HANGUL"}, "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"},
           "bg": {"CYRILLIC"}, "ar": {"ARABIC"}, "fa": {"ARABIC"}, "hi": {"DEVANAGARI"}, "th": {"THAI"},
           "he": {"HEBREW"}, "el": {"GREEK"}}
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
FORMAT_RE = re.compile(r"%[-+ #0-9.*]*[a-zA-Z]|\{[^}]*\}|\$\{?\w|<[^>]+>|\\[a-z]|&\w+;")


@dataclass
class Doc:
    text: str
    source: str  # e.g. "man:ls.1", "gettext:coreutils", "fortune:de/zitate", "file:json/decoder.py"
    package: str


@dataclass
class Provenance:
    """Per language: package -> {version, license, documents, bytes} for what was actually used."""
    packages: dict[str, dict[str, dict]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, lang: str, kind: str, doc: Doc, info: "Packages", split: str) -> None:
        entry = self.packages[lang].setdefault(doc.package, {
            "version": info.version(doc.package), "license": info.license(doc.package), "kinds": [],
            "documents": 0, "bytes": 0, "valid_documents": 0})
        if kind not in entry["kinds"]:
            entry["kinds"].append(kind)
        entry["documents"] += 1
        entry["bytes"] += len(doc.text.encode("utf-8"))
        entry["valid_documents"] += int(split == "valid")


class Packages:
    """Which Debian package owns a file, its version and its licence (first DEP-5 License: field)."""

    def __init__(self):
        self.owner: dict[str, str] = {}
        info = Path("/var/lib/dpkg/info")
        for lst in sorted(info.glob("*.list")):
            pkg = lst.name[:-5].split(":")[0]
            for line in lst.read_text(errors="replace").splitlines():
                self.owner.setdefault(line, pkg)
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n"], capture_output=True,
                             text=True, check=True).stdout
        self.versions = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        self._licenses: dict[str, str] = {}

    def of(self, path: Path) -> str:
        real = str(path)
        return self.owner.get(real) or self.owner.get(os.path.realpath(real)) or "unpackaged"

    def version(self, pkg: str) -> str:
        return self.versions.get(pkg, "")

    def license(self, pkg: str) -> str:
        if pkg not in self._licenses:
            self._licenses[pkg] = _read_license(pkg)
        return self._licenses[pkg]


KNOWN_LICENSES = {  # packages whose copyright file is not machine-readable
    "fortunes": "BSD-3-Clause (University of California)", "fortunes-min": "BSD-3-Clause",
    "fortunes-bg": "GPL-2+", "fortunes-it": "GPL-2+", "fortunes-br": "GPL-2+",
    "manpages-ja": "JM Project licence (free redistribution)", "python3.11": "PSF-2.0",
    "libpython3.11-stdlib": "PSF-2.0", "libpython3.11-minimal": "PSF-2.0", "libpython3.11-dev": "PSF-2.0",
    "postgresql-15": "PostgreSQL", "matplotlib": "Matplotlib licence (PSF-based)",
    "unpackaged": "see source file header",
}


def _read_license(pkg: str) -> str:
    """The License of the `Files: *` paragraph of a machine-readable (DEP-5) copyright file."""
    if pkg in KNOWN_LICENSES:
        return KNOWN_LICENSES[pkg]
    path = Path("/usr/share/doc") / pkg / "copyright"
    if not path.is_file():
        return f"see the {pkg} package's copyright file"
    text = path.read_text(errors="replace")
    if re.match(r"Format:\s*\S*copyright-format", text):
        for paragraph in re.split(r"\n\s*\n", text):
            files = re.search(r"^Files:\s*(.*)$", paragraph, re.M)
            found = re.search(r"^License:\s*(\S.*)$", paragraph, re.M)
            if files and found and files.group(1).split()[:1] == ["*"]:
                return found.group(1).strip()
    for name in ("LGPL-2.1", "GPL-3", "GPL-2", "BSD", "MIT", "Expat"):
        if re.search(re.escape(name).replace("\\-", "[- ]"), text):
            return f"{name} (per /usr/share/doc/{pkg}/copyright)"
    return f"see /usr/share/doc/{pkg}/copyright"


# --- sources ----------------------------------------------------------------------------------------------

def _locale_names(lang: str) -> list[str]:
    return LOCALES.get(lang, [lang])


def read_catalog(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a .mo file (singular forms only, non-empty translations)."""
    with open(path, "rb") as f:
        try:
            catalog = gettext.GNUTranslations(f)._catalog  # noqa: SLF001 - the documented way to dump it
        except Exception as err:  # a broken catalog is skipped, not fatal
            log.warning("skipping %s: %s", path, err)
            return {}
    out = {}
    for key, value in catalog.items():
        if not isinstance(key, str) or not key or "\x04" in key or not value:
            continue
        out[key] = value
    return out


def in_script(text: str, lang: str, min_share: float = 0.3) -> bool:
    """Whether at least `min_share` of the letters are in the language's script (true if it has none)."""
    expected = SCRIPTS.get(lang)
    letters = [c for c in text if c.isalpha()]
    if not expected or not letters:
        return True
    return sum(script_of(c) in expected for c in letters) >= min_share * len(letters)


def script_shares(text: str) -> str:
    """"CYRILLIC 92%, LATIN 8%": the scripts with at least 5% of the letters."""
    counts: dict[str, int] = defaultdict(int)
    for c in text:
        if c.isalpha():
            counts[script_of(c)] += 1
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
                     if v >= 0.05 * total)


def _clean_message(text: str) -> str:
    text = text.replace("_", "") if re.search(r"(^|\s)_\w", text) else text  # GTK mnemonics
    return re.sub(r"&(?=\w)", "", text).strip()


def catalogs(lang: str) -> list[Path]:
    paths = []
    for name in _locale_names(lang):
        paths += sorted((LOCALE_DIR / name / "LC_MESSAGES").glob("*.mo"))
    return paths


def gettext_docs(lang: str, info: Packages, rng: random.Random, messages_per_doc: int = 15) -> list[Doc]:
    """Documents of translated messages (or, for English, the source messages), one catalog at a time."""
    docs = []
    english_seen: set[str] = set()
    paths = catalogs("de") if lang == "en" else catalogs(lang)
    for path in paths:
        if path.stem.startswith("iso_"):
            continue  # lists of names, not prose; they go to the parallel pairs
        catalog = read_catalog(path)
        texts = []
        for msgid, msgstr in catalog.items():
            text = msgid if lang == "en" else msgstr
            if lang != "en" and (msgstr == msgid or not in_script(msgstr, lang)):
                continue
            if lang == "en":
                if msgid in english_seen:
                    continue
                english_seen.add(msgid)
            text = _clean_message(text)
            if len(text) >= 12 and len(FORMAT_RE.findall(text)) <= 1:
                texts.append(text)
        rng.shuffle(texts)
        for i in range(0, len(texts), messages_per_doc):
            chunk = texts[i:i + messages_per_doc]
            if len(chunk) >= 5:
                docs.append(Doc("\n".join(chunk), f"gettext:{path.stem}", info.of(path)))
    return docs


def fortune_docs(lang: str, info: Packages, target_bytes: int = 1000) -> list[Doc]:
    """Fortune cookies (split on '%' lines) grouped into documents of about `target_bytes`."""
    files: list[Path] = []
    for pattern in FORTUNES.get(lang, []):
        files += sorted(p for p in FORTUNE_DIR.glob(pattern)
                        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    docs = []
    for path in files:
        raw = path.read_bytes().decode("utf-8", errors="replace")
        if "\ufffd" in raw:
            continue
        items = [ANSI_RE.sub("", t).strip("\n") for t in re.split(r"\n%\n", raw.replace("\r\n", "\n"))]
        items = [t for t in items if t.strip()]
        chunk: list[str] = []
        size = 0
        rel = path.relative_to(FORTUNE_DIR)
        for item in items:
            chunk.append(item)
            size += len(item.encode("utf-8"))
            if size >= target_bytes:
                docs.append(Doc("\n\n".join(chunk), f"fortune:{rel}", info.of(path)))
                chunk, size = [], 0
        if len(chunk) >= 3:
            docs.append(Doc("\n\n".join(chunk), f"fortune:{rel}", info.of(path)))
    return docs


def render_man(path: Path) -> str:
    """A man page as plain text: rendered by man/groff, then unwrapped into one line per paragraph."""
    env = dict(os.environ, MANWIDTH="3000", MAN_KEEP_FORMATTING="0", LC_ALL="C.UTF-8")
    proc = subprocess.run(["man", "-E", "UTF-8", "-l", str(path)], capture_output=True, env=env, timeout=60)
    text = proc.stdout.decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # overstrike bold/underline
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    if len(lines) > 2:
        lines = lines[1:-1]  # header and footer lines
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return out


def man_docs(lang: str, info: Packages, rng: random.Random, budget: int, max_chars: int = 5_000) -> list[Doc]:
    """Man pages of a language (English: the originals of pages translated to German and French)."""
    if lang == "en":
        translated = {p.name for d in ("de", "fr") for p in (MAN_DIR / d).glob("man[18]/*")}
        pages = sorted(p for p in MAN_DIR.glob("man[18]/*") if p.name in translated)
    else:
        pages = []
        for name in _locale_names(lang):
            pages += sorted(p for p in (MAN_DIR / name).glob("man*/*") if p.is_file() and not p.is_symlink())
    rng.shuffle(pages)
    docs: list[Doc] = []
    size = 0
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(pages), 16):
            batch = pages[start:start + 16]
            for path, text in zip(batch, pool.map(render_man, batch)):
                if "\ufffd" in text or len(text) < 400:
                    continue
                if len(text) > max_chars:
                    cut = text.rfind("\n\n", 0, max_chars)
                    text = text[:cut if cut > 0 else max_chars]
                name = path.name.removesuffix(".gz")
                docs.append(Doc(text, f"man:{name}", info.of(path)))
                size += len(text.encode("utf-8"))
            if size >= budget:
                break
    return docs


def _code_chunks(text: str, max_bytes: int = 8_000) -> list[str]:
    """Whole files, or files cut at blank lines into pieces of at most ~max_bytes."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    chunks, current = [], []
    size = 0
    for block in re.split(r"\n\n", text):
        b = len(block.encode("utf-8"))
        if current and size + b > max_bytes:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += b
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def code_docs(lang: str, info: Packages) -> list[Doc]:
    import sysconfig
    if lang == "code_python":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
        files = [f for f in files if "test" not in f.parts[-2] and "site-packages" not in str(f)]
    elif lang == "code_c":
        root = Path(sysconfig.get_paths()["include"])
        files = sorted(root.rglob("*.h"))
    elif lang == "code_javascript":
        files = sorted(p for d in ("/usr/share/javascript", "/usr/share/gitweb/static")
                       for p in Path(d).rglob("*.js") if not p.name.endswith(".min.js"))
        try:
            import matplotlib
            files += sorted((Path(matplotlib.__file__).parent / "backends/web_backend/js").glob("*.js"))
        except ImportError:
            pass
    elif lang == "code_sql":
        files = sorted(Path("/usr/share/postgresql").rglob("*.sql"))
    else:
        raise ValueError(lang)
    docs = []
    for path in files:
        if path.is_symlink() or path.stat().st_size < 1500:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        pkg = info.of(path)
        if pkg == "unpackaged" and "matplotlib" in str(path):
            pkg = "matplotlib"
        for chunk in _code_chunks(text):
            docs.append(Doc(chunk, f"file:{path.name}", pkg))
    return docs


def parallel_pairs(lang: str, info: Packages, rng: random.Random, limit: int) -> list[tuple[dict, str]]:
    """English -> `lang` message pairs: half short terms (<= 2 words, incl. ISO country/language names),
    half short sentences, without format directives or markup."""
    words, phrases = {}, {}
    for path in catalogs(lang):
        if path.stem.startswith("iso") and path.stem not in ISO_PAIR_CATALOGS:
            continue
        for msgid, msgstr in read_catalog(path).items():
            src, tgt = _clean_message(msgid), _clean_message(msgstr)
            if not src or not tgt or src == tgt or "\n" in src or "\n" in tgt or len(src) > 80 or len(tgt) > 120:
                continue
            if FORMAT_RE.search(src) or FORMAT_RE.search(tgt) or not re.search(r"[A-Za-z]", src):
                continue
            if not in_script(tgt, lang, 0.5):
                continue
            target = words if len(src.split()) <= 2 else phrases
            target.setdefault(src, (tgt, f"gettext:{path.stem}", info.of(path)))
    out = []
    for pool in (words, phrases):
        keys = sorted(pool)
        rng.shuffle(keys)
        for src in sorted(keys[:limit // 2]):
            tgt, source, pkg = pool[src]
            out.append(({"src": nfc(src), "tgt": nfc(tgt), "source": source}, pkg))
    return out


# --- assembly ---------------------------------------------------------------------------------------------

def collect(lang: str, budget: int, info: Packages, seed: int) -> list[tuple[str, Doc]]:
    """(kind, doc) pairs filling `budget` bytes, the source kinds mixed by MIX where they exist."""
    rng = random.Random(f"{seed}:{lang}")
    if lang.startswith("code_"):
        pools = {"code": code_docs(lang, info)}
        shares = {"code": 1.0}
    else:
        pools = {"gettext": gettext_docs(lang, info, rng), "fortune": fortune_docs(lang, info),
                 "man": man_docs(lang, info, rng, int(budget * MIX["man"] * 1.3))}
        pools = {k: v for k, v in pools.items() if v}
        total = sum(MIX[k] for k in pools)
        shares = {k: MIX[k] / total for k in pools}
    chosen: list[tuple[str, Doc]] = []
    used = 0
    leftovers: list[tuple[str, Doc]] = []
    seen: set[str] = set()  # a page installed under two names is one document
    for kind in pools:
        pools[kind] = [d for d in pools[kind] if not (d.text in seen or seen.add(d.text))]
    for kind, docs in pools.items():
        rng.shuffle(docs)
        quota = budget * shares[kind]
        taken = 0
        for doc in docs:
            b = len(doc.text.encode("utf-8"))
            if taken < quota:
                chosen.append((kind, doc))
                taken += b
            else:
                leftovers.append((kind, doc))
        used += taken
    rng.shuffle(leftovers)
    for kind, doc in leftovers:  # a short source kind leaves room for the others
        if used >= budget:
            break
        chosen.append((kind, doc))
        used += len(doc.text.encode("utf-8"))
    rng.shuffle(chosen)
    return chosen


def split_valid(lang: str, docs: list[tuple[str, Doc]]) -> tuple[list, list]:
    """Hold out the first documents (in the seeded order) that pass the default cleaning filters, so that
    every language keeps a validation split after `fuxi data clean`."""
    doc_filter = DocumentFilter(FilterConfig())
    total = sum(len(d.text.encode("utf-8")) for _, d in docs)
    need = max(VALID_FRACTION * total, VALID_MIN_BYTES)
    valid, train, size = [], [], 0
    for item in docs:
        if size < need and doc_filter.reject_reason(nfc(item[1].text), lang) is None:
            valid.append(item)
            size += len(item[1].text.encode("utf-8"))
        else:
            train.append(item)
    return valid, train


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build(out_dir: Path, seed: int = 0, scale: float = 1.0, languages: list[str] | None = None) -> dict:
    info = Packages()
    provenance = Provenance()
    stats = {}
    for lang, budget in BUDGETS.items():
        if languages and lang not in languages:
            continue
        docs = collect(lang, int(budget * scale), info, seed)
        if not docs:
            log.warning("%s: no source text found; skipped", lang)
            continue
        valid, train = split_valid(lang, docs)
        for split, items in (("train", train), ("valid", valid)):
            _write_jsonl(out_dir / split / f"{lang}.jsonl",
                         [{"text": nfc(d.text), "lang": lang, "source": d.source} for _, d in items])
            for kind, d in items:
                provenance.add(lang, kind, d, info, split)
        all_text = "".join(d.text for _, d in docs)
        stats[lang] = {"documents": len(docs), "valid_documents": len(valid),
                       "bytes": len(all_text.encode("utf-8")), "scripts": script_shares(all_text)}
        if not lang.startswith("code_") and lang != "en":
            pairs = parallel_pairs(lang, info, random.Random(f"{seed}:pairs:{lang}"), PARALLEL_PAIRS)
            _write_jsonl(out_dir / "parallel" / f"en-{lang}.jsonl", [record for record, _ in pairs])
            for record, pkg in pairs:
                provenance.add(lang, "parallel", Doc(record["src"] + record["tgt"], record["source"], pkg),
                               info, "parallel")
            stats[lang]["parallel_pairs"] = len(pairs)
        log.info("%s: %d docs, %d bytes", lang, len(docs), stats[lang]["bytes"])
    write_json(out_dir / "sources.json", {"languages": stats, "packages": provenance.packages})
    _write_readme(out_dir, stats, provenance)
    return stats


def _write_readme(out_dir: Path, stats: dict, provenance: Provenance) -> None:
    rows = [[lang, s["scripts"], s["documents"], s["valid_documents"], s["bytes"], s.get("parallel_pairs", "-")]
            for lang, s in stats.items()]
    lic_rows = []
    for lang, pkgs in provenance.packages.items():
        for pkg, e in sorted(pkgs.items(), key=lambda kv: -kv[1]["bytes"]):
            lic = e["license"] if len(e["license"]) <= 60 else e["license"][:57] + "..."
            lic_rows.append([lang, pkg, lic, "+".join(e["kinds"]), e["documents"], e["bytes"]])
    text = f"""# Bundled multilingual corpus

Built by `python -m fuxi.data_pipeline.build_corpus` (see its docstring for the apt packages it reads) on a
Debian 12 machine. Do not edit by hand: rebuild.

- `train/<lang>.jsonl`, `valid/<lang>.jsonl`: one document per line, `{{"text", "lang", "source"}}`; the
  validation split is held out per language ({VALID_FRACTION:.0%} of the bytes, at least {VALID_MIN_BYTES} bytes,
  from documents that pass the default cleaning filters).
- `parallel/en-<lang>.jsonl`: English-to-X pairs `{{"src", "tgt", "source"}}` (src is English)
  from gettext catalogs (translated UI messages; ISO 3166/639 country and language names). Half are short
  terms (at most two English words), half short sentences. For the PreAlign alignment table.
- `sources.json`: per language, every Debian package used, with version, licence, documents and bytes.

Languages are ISO 639-1 codes; code is `code_<language>`. Sizes are uneven on purpose.

Sources: gettext catalogs (`/usr/share/locale/*/LC_MESSAGES/*.mo`, each under its package's licence);
translated man pages (manpages-l10n: GPL-3+; manpages-ja; manpages-zh: GFDL-1.2+ and others), rendered with
groff; English originals of the same pages (their packages' licences); fortune cookie files (fortunes:
BSD; fortunes-zh: GPL-3+; fortunes-de/es/ru/pl/cs: GPL; fortunes-it/bg/br: GPL-2+); code from the Python
3.11 standard library and C headers (PSF-2.0), PostgreSQL 15 SQL scripts (PostgreSQL licence), and
JavaScript from jQuery/underscore (MIT), sphinxdoc (BSD-2-Clause), gitweb (GPL-2) and matplotlib's web
backend (matplotlib licence). Redistribution follows each licence; the per-package table is below.

## Languages

{format_table(["lang", "scripts (share of letters)", "docs", "valid docs", "bytes", "parallel pairs"], rows)}

## Provenance and licences per language and package

{format_table(["lang", "package", "license", "kinds", "docs", "bytes"], lic_rows)}
"""
    with atomic_write(out_dir / "README.md") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(BUNDLED_CORPUS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every byte budget")
    parser.add_argument("--languages", nargs="*", help="only these languages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = build(Path(args.out), args.seed, args.scale, args.languages)
    print(format_table(["lang", "docs", "bytes"], [[k, v["documents"], v["bytes"]] for k, v in stats.items()]))


if __name__ == "__main__":
    main()
