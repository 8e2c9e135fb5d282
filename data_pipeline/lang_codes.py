"""The project's language codes, and the codes corpora ship with mapped onto them.

The project labels natural languages with ISO 639-1 codes (`de`, `zh`: what py3langid returns and the bundled
corpus uses) and code with `code_<language>`. Corpora label them otherwise: FineWeb-2 with an ISO 639-3 code
and an ISO 15924 script (`deu_Latn`, `cmn_Hani`, `rus_Cyrl`, `arb_Arab`; its `language` column holds `deu`
and its `language_script` column `Latn`), others with BCP 47 tags (`zh-Hant`, `sr-Latn`). `project_language`
maps them:

- an ISO 639-3 or 639-2/B code with a two-letter code becomes that code (`deu` -> `de`), and so does the
  standard individual language of a macrolanguage where a corpus uses that one (`cmn` -> `zh`, `arb` -> `ar`,
  `pes` -> `fa`, `zsm` -> `ms`, ...: `MACROLANGUAGE_MEMBERS`);
- a script that is usual for the language is dropped (`deu_Latn` -> `de`, `srp_Latn` -> `sr`); another script
  is kept, so romanised or otherwise transliterated text stays a language of its own (`hin_Latn` -> `hi_Latn`);
- a code with no two-letter code (`gsw_Latn`, `yue_Hani`, `ckb_Arab`) and any other label (`code_python`,
  `pt-BR`) is kept as given.
"""
from __future__ import annotations

import functools
import re

# Labels that mean "no language given": such documents are labelled by the language identifier.
UNKNOWN_LANGUAGES = frozenset({"", "unk", "und", "unknown", "xx", "none"})

# ISO 639-3 (and 639-2/B) codes of the 184 languages that have an ISO 639-1 code, from Debian's iso-codes
# package (4.15).
ISO639_3_TO_1 = dict(pair.split(":") for pair in """
aar:aa abk:ab afr:af aka:ak alb:sq amh:am ara:ar arg:an arm:hy asm:as ava:av ave:ae aym:ay aze:az bak:ba bam:bm
baq:eu bel:be ben:bn bis:bi bod:bo bos:bs bre:br bul:bg bur:my cat:ca ces:cs cha:ch che:ce chi:zh chu:cu chv:cv
cor:kw cos:co cre:cr cym:cy cze:cs dan:da deu:de div:dv dut:nl dzo:dz ell:el eng:en epo:eo est:et eus:eu ewe:ee
fao:fo fas:fa fij:fj fin:fi fra:fr fre:fr fry:fy ful:ff geo:ka ger:de gla:gd gle:ga glg:gl glv:gv gre:el grn:gn
guj:gu hat:ht hau:ha hbs:sh heb:he her:hz hin:hi hmo:ho hrv:hr hun:hu hye:hy ibo:ig ice:is ido:io iii:ii iku:iu
ile:ie ina:ia ind:id ipk:ik isl:is ita:it jav:jv jpn:ja kal:kl kan:kn kas:ks kat:ka kau:kr kaz:kk khm:km kik:ki
kin:rw kir:ky kom:kv kon:kg kor:ko kua:kj kur:ku lao:lo lat:la lav:lv lim:li lin:ln lit:lt ltz:lb lub:lu lug:lg
mac:mk mah:mh mal:ml mao:mi mar:mr may:ms mkd:mk mlg:mg mlt:mt mon:mn mri:mi msa:ms mya:my nau:na nav:nv nbl:nr
nde:nd ndo:ng nep:ne nld:nl nno:nn nob:nb nor:no nya:ny oci:oc oji:oj ori:or orm:om oss:os pan:pa per:fa pli:pi
pol:pl por:pt pus:ps que:qu roh:rm ron:ro rum:ro run:rn rus:ru sag:sg san:sa sin:si slk:sk slo:sk slv:sl sme:se
smo:sm sna:sn snd:sd som:so sot:st spa:es sqi:sq srd:sc srp:sr ssw:ss sun:su swa:sw swe:sv tah:ty tam:ta tat:tt
tel:te tgk:tg tgl:tl tha:th tib:bo tir:ti ton:to tsn:tn tso:ts tuk:tk tur:tr twi:tw uig:ug ukr:uk urd:ur uzb:uz
ven:ve vie:vi vol:vo wel:cy wln:wa wol:wo xho:xh yid:yi yor:yo zha:za zho:zh zul:zu
""".split())

# The standard member of a macrolanguage, which FineWeb-2 labels with its own ISO 639-3 code; other members
# (Egyptian Arabic `arz`, Cantonese `yue`, Dari `prs`, South Azerbaijani `azb`, ...) keep their codes.
MACROLANGUAGE_MEMBERS = {
    "arb": "ar", "cmn": "zh", "pes": "fa", "zsm": "ms", "ekk": "et", "lvs": "lv", "swh": "sw", "npi": "ne",
    "ory": "or", "plt": "mg", "gaz": "om", "ydd": "yi", "pbt": "ps", "als": "sq", "azj": "az", "uzn": "uz",
    "khk": "mn", "kmr": "ku", "gug": "gn", "ayr": "ay", "kpv": "kv",
}

# The usual scripts of the ISO 639-1 languages not written in Latin script (any other: Latn).
USUAL_SCRIPTS = {
    "ab": {"Cyrl"}, "am": {"Ethi"}, "ar": {"Arab"}, "as": {"Beng"}, "av": {"Cyrl"}, "ba": {"Cyrl"},
    "be": {"Cyrl"}, "bg": {"Cyrl"}, "bn": {"Beng"}, "bo": {"Tibt"}, "bs": {"Latn", "Cyrl"}, "ce": {"Cyrl"},
    "cu": {"Cyrl", "Cyrs"}, "cv": {"Cyrl"}, "dv": {"Thaa"}, "dz": {"Tibt"}, "el": {"Grek"}, "fa": {"Arab"},
    "gu": {"Gujr"}, "he": {"Hebr"}, "hi": {"Deva"}, "hy": {"Armn"}, "ii": {"Yiii"}, "iu": {"Cans"},
    "ja": {"Jpan", "Hani", "Hira", "Kana"}, "ka": {"Geor"}, "kk": {"Cyrl"}, "km": {"Khmr"}, "kn": {"Knda"},
    "ko": {"Hang", "Kore"}, "ks": {"Arab"}, "kv": {"Cyrl"}, "ky": {"Cyrl"}, "lo": {"Laoo"}, "mk": {"Cyrl"},
    "ml": {"Mlym"}, "mn": {"Cyrl"}, "mr": {"Deva"}, "my": {"Mymr"}, "ne": {"Deva"}, "or": {"Orya"},
    "os": {"Cyrl"}, "pa": {"Guru"}, "ps": {"Arab"}, "ru": {"Cyrl"}, "sa": {"Deva"}, "sd": {"Arab"},
    "si": {"Sinh"}, "sr": {"Cyrl", "Latn"}, "ta": {"Taml"}, "te": {"Telu"}, "tg": {"Cyrl"}, "th": {"Thai"},
    "ti": {"Ethi"}, "tt": {"Cyrl"}, "ug": {"Arab"}, "uk": {"Cyrl"}, "ur": {"Arab"}, "yi": {"Hebr"},
    "zh": {"Hani", "Hans", "Hant"},
}

# `deu`, `deu_Latn`, `de-Latn`, `zh_Hant`: a two- or three-letter code and an optional four-letter script.
_CODE = re.compile(r"([A-Za-z]{2,3})(?:[_-]([A-Za-z]{4}))?")


@functools.lru_cache(maxsize=4096)  # called per document; a corpus has few distinct labels
def project_language(label: str) -> str:
    """The project's code for a language label (see the module docstring); a label it does not know is kept."""
    match = _CODE.fullmatch(label)
    if not match:
        return label
    code, script = match.group(1).lower(), match.group(2)
    two = code if len(code) == 2 else ISO639_3_TO_1.get(code) or MACROLANGUAGE_MEMBERS.get(code)
    if two is None:
        return label
    if script is None:
        return two
    script = script.title()
    return two if script in USUAL_SCRIPTS.get(two, {"Latn"}) else f"{two}_{script}"


def normalize_language(label: object) -> str | None:
    """The project's code for a language label found in the data or a folder name; None for no label or one
    that means "unknown" (`und`, `unknown`, ...), which the language identifier then fills."""
    if not isinstance(label, str):
        return None
    label = label.strip()
    if label.lower() in UNKNOWN_LANGUAGES:
        return None
    return project_language(label)
