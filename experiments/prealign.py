"""PreAlign in the English -> English-Clone setting (docs/methods.md §3.5), at tiny scale, in one driver.

The world. A small synthetic English (persons, cities, jobs, colours, objects; a few sentence templates) is
tokenised with a byte-level BPE trained on it. English-Clone is the same language with a disjoint vocabulary:
every English token id t becomes t + V (EOS is shared), a bijection per token, so the word-level alignment
table is exactly that bijection on the generator's words. The two languages share no token, only the model.

The data. English documents hold general sentences, facts about every person ("kelo lives in brimford .",
"kelo works as a baker .") and a labelling task ("kelo found a warm cup . it was a good day .": five adjectives
mean a good day, five a bad one). Clone documents (a quarter of the tokens, other documents) hold general
sentences and the facts of the *filler* persons only, never the labelling task. So the facts about the *fact*
persons and the task are seen in English only.

The arms (same seed, same blocks in the same order, same steps):
  joint       random init -> LM on English + Clone                             (the baseline)
  prealign    random init -> alignment init on the table -> LM with input-only code-switching
  init only   alignment init, then plain LM          (ablation)
  cs only     random init, LM with code-switching     (ablation)
The alignment init's loss is L_LM + alpha * L_align, the released code's weighting (--weightings align); with
--weightings align,lm the two init arms also run with L_align + alpha * L_LM, on the same seeds. Code-switching
replaces English words by their Clone translations (source -> target, as the released table;
--codeswitch-direction all_to_all also switches Clone words into English).

Measured on held-out data: Clone (and English) LM loss; zero-shot cross-lingual transfer (the labelling task
asked in Clone: Clone "good" vs Clone "bad", words Clone text never contains); cross-lingual knowledge
application (English-only facts queried in Clone, answer among all Clone cities / jobs); word alignment per
layer (aligned vs random pairs).

    python -m fuxi.experiments.prealign --out runs/prealign_experiment --seeds 3 --weightings align,lm

Writes results.json, report.md and prealign_english_clone.png under --out; prints tables and, last, one JSON
line. Runs in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fuxi.common.atomic import save_figure, write_json, write_text
from fuxi.data_pipeline.codeswitch import CodeSwitchTable, CodeSwitchTransform, tokenizer_word_starts
from fuxi.data_pipeline.config import CODESWITCH_DIRECTIONS
from fuxi.data_pipeline.stream import default_transform
from fuxi.model import ModelConfig, build_model
from fuxi.pretrain.schedule import cosine_lr
from fuxi.pretrain.stages.prealign.config import AlphaWeights, PreAlignConfig
from fuxi.pretrain.stages.prealign.dictionary import DictionaryBatches, DictionaryEntries
from fuxi.pretrain.stages.prealign.loss import prealign_loss
from fuxi.pretrain.stages.prealign.report import alignment_report, format_alignment_report

log = logging.getLogger(__name__)
EOS = 0
ARMS = {  # name -> (alignment init, code-switching)
    "joint": (False, False),
    "prealign": (True, True),
    "init only": (True, False),
    "cs only": (False, True),
}
RELEASED_WEIGHTING = PreAlignConfig.alpha_weights  # "align": L_LM + alpha * L_align, as both released trainers
# Arm name suffix per init weighting, the released one first (no suffix): "prealign", "prealign, alpha on L_LM".
WEIGHTING_SUFFIX = {w: "" if w == RELEASED_WEIGHTING else f", alpha on L_{w.upper()}"
                    for w in sorted(get_args(AlphaWeights), key=lambda w: w != RELEASED_WEIGHTING)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/prealign_experiment", help="output folder")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run (world, data and weights change)")
    parser.add_argument("--vocab", type=int, default=384, help="English BPE vocabulary (Clone doubles it)")
    parser.add_argument("--english-docs", type=int, default=2400)
    parser.add_argument("--clone-docs", type=int, default=800)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600, help="LM steps per arm")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--init-steps", type=int, default=300, help="alignment-init steps")
    parser.add_argument("--init-batch", type=int, default=64, help="dictionary entries per init step")
    parser.add_argument("--init-lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--weightings", default="align",
                        help="init losses to run, comma-separated: align = L_LM + alpha L_align (released), "
                             "lm = L_align + alpha L_LM")
    parser.add_argument("--codeswitch-ratio", type=float, default=0.05)
    parser.add_argument("--codeswitch-direction", default="source_to_target", choices=CODESWITCH_DIRECTIONS)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest at these shapes)")


# ---- 1. the world ----------------------------------------------------------------------------------------

CITIES = ["avalon", "brimford", "corvale", "dunmore", "elmstead", "fairhold", "glenrock", "harlow", "ivywood",
          "jarrow", "kestrel", "lowmoor"]
JOBS = ["baker", "doctor", "farmer", "pilot", "teacher", "singer", "painter", "tailor", "miner", "sailor",
        "judge", "nurse"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
NOUNS = ["ball", "cup", "hat", "book", "box", "car", "dog", "cat", "bag", "pen", "lamp", "kite", "chair", "bowl",
         "coat", "shoe"]
POSITIVE = ["big", "new", "happy", "fast", "warm"]
NEGATIVE = ["small", "old", "quiet", "slow", "cold"]
ADJECTIVES = POSITIVE + NEGATIVE
MOODS = ["good", "bad"]
PLACES = ["park", "garden", "market", "school", "library", "kitchen", "river", "forest"]
VERBS = ["saw", "found", "bought", "lost", "painted", "carried", "washed", "sold"]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vi", "dor", "el", "nu", "ba", "ri", "ko", "tha", "ze", "mon"]


@dataclass
class World:
    fact_persons: list[str]  # their facts appear in English only
    filler_persons: list[str]  # their facts appear in both languages
    lives_in: dict[str, str]
    works_as: dict[str, str]

    @property
    def persons(self) -> list[str]:
        return self.fact_persons + self.filler_persons

    def vocabulary(self) -> list[str]:
        function = ["a", "the", "in", "and", "to", "from", "has", "is", "it", "of", "lives", "works", "as", "went",
                    "likes", "job", "home", "met", "was", "day", "."]
        words = function + CITIES + JOBS + COLORS + NOUNS + ADJECTIVES + PLACES + VERBS + MOODS + self.persons
        return list(dict.fromkeys(words))


def make_world(rng: np.random.Generator, fact_persons: int = 24, filler_persons: int = 24) -> World:
    names: list[str] = []
    while len(names) < fact_persons + filler_persons:
        name = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
        if name not in names:
            names.append(name)
    return World(names[:fact_persons], names[fact_persons:],
                 {p: str(rng.choice(CITIES)) for p in names}, {p: str(rng.choice(JOBS)) for p in names})


def general_sentence(rng: np.random.Generator, world: World) -> str:
    p, q = rng.choice(world.persons, size=2, replace=False)
    pick = lambda items: str(rng.choice(items))  # noqa: E731
    templates = [
        lambda: f"{p} saw a {pick(ADJECTIVES)} {pick(NOUNS)} in the {pick(PLACES)} .",
        lambda: f"the {pick(NOUNS)} in the {pick(PLACES)} is {pick(COLORS)} .",
        lambda: f"{p} and {q} went to the {pick(PLACES)} .",
        lambda: f"{p} {pick(VERBS)} the {pick(COLORS)} {pick(NOUNS)} .",
        lambda: f"a {pick(JOBS)} from {pick(CITIES)} {pick(VERBS)} a {pick(NOUNS)} .",
        lambda: f"{pick(CITIES)} has a {pick(ADJECTIVES)} {pick(PLACES)} .",
        lambda: f"{p} likes the {pick(ADJECTIVES)} {pick(NOUNS)} .",
        lambda: f"{p} met a {pick(JOBS)} in the {pick(PLACES)} .",
        lambda: f"{p} has a {pick(COLORS)} {pick(NOUNS)} .",
    ]
    return templates[int(rng.integers(len(templates)))]()


def fact_sentence(rng: np.random.Generator, world: World, person: str) -> str:
    city, job = world.lives_in[person], world.works_as[person]
    return [f"{person} lives in {city} .", f"the home of {person} is in {city} .",
            f"{person} works as a {job} .", f"the job of {person} is {job} ."][int(rng.integers(4))]


def mood_example(rng: np.random.Generator, world: World) -> tuple[str, str]:
    """(prompt, answer) of the English-only labelling task: the adjective decides a good or a bad day."""
    person, adjective, noun = str(rng.choice(world.persons)), str(rng.choice(ADJECTIVES)), str(rng.choice(NOUNS))
    return f"{person} found a {adjective} {noun} . it was a", MOODS[adjective in NEGATIVE]


def make_documents(rng: np.random.Generator, world: World, n_docs: int, clone: bool) -> list[str]:
    """English: general + facts of everyone + the labelling task; Clone: general + facts of filler persons."""
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(4, 9))):
            kind = rng.random()
            if kind < 0.3:
                persons = world.filler_persons if clone else world.persons
                sentences.append(fact_sentence(rng, world, str(rng.choice(persons))))
            elif kind < 0.45 and not clone:
                prompt, answer = mood_example(rng, world)
                sentences.append(f"{prompt} {answer} day .")
            else:
                sentences.append(general_sentence(rng, world))
        docs.append(" " + " ".join(sentences))
    return docs


class EnglishClone:
    """The English BPE and its clone: ids t -> t + V (EOS shared); word starts and the word table."""

    def __init__(self, tokenizer_dir: Path):
        from fuxi.data_pipeline.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.english_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        word_start, special = tokenizer_word_starts(self.tok)
        self.word_start = np.concatenate([word_start, word_start])
        self.special = np.concatenate([special, special])
        self.special[self.english_vocab + EOS] = False  # the clone of EOS is never used

    @property
    def vocab_size(self) -> int:
        return 2 * self.english_vocab

    def encode(self, text: str, clone: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return self.clone(ids) if clone else ids

    def clone(self, ids) -> list[int]:
        return [t if t == EOS else t + self.english_vocab for t in ids]

    def word_pairs(self, words: list[str]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The alignment table: each word as it appears after a space, in English and in Clone."""
        return [(tuple(self.encode(" " + w)), tuple(self.encode(" " + w, clone=True))) for w in words]


def pack_blocks(docs: list[list[int]], lang: int, block_len: int) -> dict[str, np.ndarray]:
    """Concatenate documents with EOS separators and cut blocks of block_len (= seq_len + 1) tokens."""
    tokens, doc_ids = [], []
    for d, doc in enumerate(docs):
        tokens += [EOS] + doc
        doc_ids += [d] * (len(doc) + 1)
    n = len(tokens) // block_len
    t = np.asarray(tokens[:n * block_len], dtype=np.int64).reshape(n, block_len)
    return {"tokens": t, "lang_ids": np.full_like(t, lang),
            "doc_ids": np.asarray(doc_ids[:n * block_len], dtype=np.int64).reshape(n, block_len)}


def concat_blocks(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---- 2. training and evaluation ------------------------------------------------------------------------

def build(args, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, ffn_hidden_size=4 * args.hidden, max_seq_len=args.seq_len,
                         init_std=0.02, kernels="torch")
    config.validate()
    return build_model(config)


def alignment_init(model, entries: DictionaryEntries, args, weighting: str) -> list[float]:
    """Stage 1 in-process: the same loss as the trainer's prealign_init stage."""
    source = DictionaryBatches(entries, 2, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.init_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses = []
    for step in tqdm(range(args.init_steps), desc="alignment init", leave=False):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.init_lr, max(1, args.init_steps // 20), args.init_steps, 0.1)
        batch = source.batch(list(range(step * args.init_batch, (step + 1) * args.init_batch)))
        out = prealign_loss(model, batch, model.lm_head.weight, 2, args.temperature, args.alpha, weighting)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.align.value)
    return losses


def make_batch(blocks: dict[str, np.ndarray], rows: np.ndarray, positions: np.ndarray, transform) -> dict:
    samples = []
    for r, g in zip(rows, positions):
        raw = {k: torch.from_numpy(v[r]) for k, v in blocks.items()}
        raw["position"] = int(g)
        samples.append(transform(raw))
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@torch.no_grad()
def lm_loss(model, blocks: dict[str, np.ndarray], batch: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks["tokens"]), batch):
        b = make_batch(blocks, np.arange(start, min(start + batch, len(blocks["tokens"]))),
                       np.zeros(batch, dtype=np.int64), default_transform)
        out = model(b["input_ids"], labels=b["labels"])
        n = int((b["labels"] != -100).sum())
        total += float(out.loss) * n
        count += n
    model.train()
    return total / count


@torch.no_grad()
def choice_accuracy(model, prompts: list[list[int]], candidates: list[list[int]], answers: list[int],
                    chunk: int = 512) -> float:
    """Fraction of prompts whose answer candidate has the highest total log-probability (all prompt x
    candidate sequences scored in right-padded chunks; causal attention makes the padding harmless)."""
    was_training = model.training
    model.eval()
    seqs = [[EOS] + p + c for p in prompts for c in candidates]
    spans = [(1 + len(p), c) for p in prompts for c in candidates]
    scores = []
    for start in range(0, len(seqs), chunk):
        part = seqs[start:start + chunk]
        width = max(len(s) for s in part)
        ids = torch.tensor([s + [EOS] * (width - len(s)) for s in part])
        logp = F.log_softmax(model(ids).logits.float(), -1)
        for row, (begin, cand) in enumerate(spans[start:start + chunk]):
            targets = torch.tensor(cand)[:, None]
            scores.append(float(logp[row, begin - 1:begin - 1 + len(cand)].gather(1, targets).sum()))
    model.train(was_training)
    best = np.asarray(scores).reshape(len(prompts), len(candidates)).argmax(1)
    return float(np.mean(best == np.asarray(answers)))


@dataclass
class EvalSets:
    valid: dict[str, dict[str, np.ndarray]]  # language -> blocks
    knowledge: dict[str, tuple]  # language -> (prompts, candidates, answers) per relation, flattened
    transfer: dict[str, tuple]


def build_eval_sets(rng, world: World, ec: EnglishClone, args) -> EvalSets:
    valid = {"english": pack_blocks([ec.encode(d) for d in make_documents(rng, world, 120, clone=False)], 0,
                                    args.seq_len + 1),
             "clone": pack_blocks([ec.encode(d, clone=True) for d in make_documents(rng, world, 120, clone=True)],
                                  1, args.seq_len + 1)}
    knowledge, transfer = {}, {}
    moods = [mood_example(rng, world) for _ in range(100)]
    for lang, clone in (("english", False), ("clone", True)):
        items = []  # (prompt, candidates, index of the answer)
        for person in world.fact_persons:
            for template, options, truth in ((f" {person} lives in", CITIES, world.lives_in[person]),
                                             (f" {person} works as a", JOBS, world.works_as[person])):
                items.append((ec.encode(template, clone), [ec.encode(" " + o, clone) for o in options],
                              options.index(truth)))
        knowledge[lang] = items
        transfer[lang] = [(ec.encode(" " + p, clone), [ec.encode(" " + m, clone) for m in MOODS], MOODS.index(a))
                          for p, a in moods]
    return EvalSets(valid, knowledge, transfer)


def evaluate(model, sets: EvalSets) -> dict:
    out = {f"loss_{lang}": lm_loss(model, blocks) for lang, blocks in sets.valid.items()}
    for name, data in (("knowledge", sets.knowledge), ("transfer", sets.transfer)):
        for lang, items in data.items():
            groups: dict[tuple, list] = {}  # items sharing a candidate list are scored together
            for item in items:
                groups.setdefault(tuple(map(tuple, item[1])), []).append(item)
            correct = 0.0
            for group in groups.values():
                prompts, answers = [g[0] for g in group], [g[2] for g in group]
                correct += len(group) * choice_accuracy(model, prompts, group[0][1], answers)
            out[f"{name}_{lang}"] = correct / len(items)
    return out


def train_lm(model, blocks, transform, sets: EvalSets, args, desc: str) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = np.random.default_rng(args.seed + 1).permutation(len(blocks["tokens"]))
    model.train()
    curve = []
    for step in tqdm(range(args.steps), desc=desc, leave=False):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.lr, max(1, args.steps // 20), args.steps, 0.1)
        positions = np.arange(step * args.batch, (step + 1) * args.batch)
        batch = make_batch(blocks, order[positions % len(order)], positions, transform)
        out = model(batch["input_ids"], labels=batch["labels"])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": out.loss.item(),
                          "loss_clone": lm_loss(model, sets.valid["clone"]),
                          "loss_english": lm_loss(model, sets.valid["english"])})
    return curve


# ---- 3. the run ---------------------------------------------------------------------------------------------

METRICS = ["loss_clone", "loss_english", "transfer_english", "transfer_clone", "knowledge_english",
           "knowledge_clone"]


def summarise(runs: list[dict]) -> dict:
    """Per arm and metric: mean, std and the per-seed values; plus the mean alignment gap per space."""
    summary = {}
    for name in runs[0]["arms"]:
        arm = {}
        for metric in METRICS:
            values = [r["arms"][name]["final"][metric] for r in runs]
            arm[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        gaps = np.array([r["arms"][name]["alignment_end"]["gap"] for r in runs])
        arm["alignment_gap"] = gaps.mean(0).tolist()
        summary[name] = arm
    return summary


def plot(out: Path, runs: list[dict], summary: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for i, name in enumerate(summary):
        curves = np.array([[p["loss_clone"] for p in r["arms"][name]["curve"]] for r in runs])
        steps = [p["step"] for p in runs[0]["arms"][name]["curve"]]
        ax.plot(steps, curves.mean(0), "-o", ms=3, color=f"C{i}", label=name)
        if len(runs) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.15)
    ax.set_xlabel("LM step")
    ax.set_ylabel("held-out Clone loss (nats/token)")
    ax.set_title(f"Clone language modelling (mean of {len(runs)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    metrics = ["transfer_english", "transfer_clone", "knowledge_english", "knowledge_clone"]
    width = 0.8 / len(summary)
    for i, (name, arm) in enumerate(summary.items()):
        ax.bar(np.arange(len(metrics)) + i * width, [100 * arm[m]["mean"] for m in metrics], width,
               yerr=[100 * arm[m]["std"] for m in metrics] if len(runs) > 1 else None, capsize=2, label=name)
    ax.axhline(100 / len(MOODS), color="gray", ls=":", lw=1, label="chance, task")
    ax.axhline(100 / len(CITIES), color="gray", ls="--", lw=1, label="chance, facts")
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2,
                  ["task\nEnglish", "task transfer\nClone", "facts\nEnglish", "facts\nClone"])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Zero-shot transfer and knowledge application")
    ax.legend(fontsize=8)

    ax = axes[2]
    spaces = runs[0]["arms"][next(iter(summary))]["alignment_end"]["spaces"]
    for i, (name, arm) in enumerate(summary.items()):
        ax.plot(range(len(spaces)), arm["alignment_gap"], "-o", ms=3, color=f"C{i}", label=f"{name}: end of LM")
    for weighting, style in zip(WEIGHTING_SUFFIX, itertools.cycle(["k--x", "k:+", "k-.s"])):
        after = [r["init"][weighting]["after"]["gap"] for r in runs if weighting in r.get("init", {})]
        if after:
            ax.plot(range(len(spaces)), np.mean(after, 0), style,
                    label=f"after alignment init{WEIGHTING_SUFFIX[weighting]}")
    ax.set_xticks(range(len(spaces)), spaces, rotation=30, ha="right")
    ax.set_ylabel("cos(aligned) - cos(random)")
    ax.set_title("Word alignment per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "prealign_english_clone.png"
    save_figure(fig, path, dpi=120)
    return str(path)


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Every arm of one seed: world, tokenizer, data, evaluation sets and initial weights all follow the seed."""
    from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer

    args = argparse.Namespace(**{**vars(args), "seed": seed})
    rng = np.random.default_rng(seed)
    world = make_world(rng)
    english = make_documents(rng, world, args.english_docs, clone=False)
    clone = make_documents(rng, world, args.clone_docs, clone=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        with open(corpus / "en.jsonl", "w", encoding="utf-8") as f:
            for doc in english:
                f.write(json.dumps({"text": doc, "lang": "en"}) + "\n")
        tok_dir = train_tokenizer(corpus, Path(tmp) / "tokenizer", TokenizerConfig(vocab_size=args.vocab, seed=seed))
        ec = EnglishClone(tok_dir)
    pairs = ec.word_pairs(world.vocabulary())
    tokens_per_word = float(np.mean([len(e) for e, _ in pairs]))
    blocks = concat_blocks(pack_blocks([ec.encode(d) for d in english], 0, args.seq_len + 1),
                           pack_blocks([ec.encode(d, clone=True) for d in clone], 1, args.seq_len + 1))
    n_en = int((blocks["lang_ids"][:, 0] == 0).sum())
    sets = build_eval_sets(rng, world, ec, args)
    table = CodeSwitchTable.from_concepts([list(p) for p in pairs], ec.word_start, ec.special,
                                          args.codeswitch_direction)
    entries = DictionaryEntries.from_token_concepts([[(e, 0), (c, 1)] for e, c in pairs], ["english", "clone"])
    print(f"seed {seed}: {len(pairs)} words ({tokens_per_word:.2f} tokens/word), vocab {ec.english_vocab} + "
          f"{ec.english_vocab}; {n_en} English + {len(blocks['tokens']) - n_en} Clone blocks of {args.seq_len}; "
          f"{len(world.fact_persons)} fact persons x 2 facts in English only")

    results: dict = {"seed": seed, "words": len(pairs), "tokens_per_word": tokens_per_word,
                     "codeswitch_keys": len(table), "blocks": {"english": n_en, "clone": len(blocks["tokens"]) - n_en},
                     "init": {}, "arms": {}}
    init_states: dict[str, dict] = {}  # weighting -> weights after the alignment init (shared by its arms)
    plan = [(name, w) for name in arm_names(args) for w in (weightings(args) if ARMS[name][0] else [None])]
    for name, weighting in plan:
        use_init, use_cs = ARMS[name]
        key = name + (WEIGHTING_SUFFIX[weighting] if use_init else "")
        t0 = time.time()
        model = build(args, ec.vocab_size)
        if use_init:
            if weighting not in init_states:
                before = alignment_report(model, model.lm_head.weight, entries, args.layers, seed=seed)
                init_losses = alignment_init(model, entries, args, weighting)
                after = alignment_report(model, model.lm_head.weight, entries, args.layers, seed=seed)
                init_states[weighting] = {k: v.clone() for k, v in model.state_dict().items()}
                results["init"][weighting] = {"before": before, "after": after, "losses": init_losses,
                                              "seconds": time.time() - t0}
                print(f"alignment init ({weighting}): {args.init_steps} steps, InfoNCE {init_losses[0]:.3f} -> "
                      f"{np.mean(init_losses[-10:]):.3f}\n{format_alignment_report(after)}")
            model.load_state_dict(init_states[weighting])
        transform = CodeSwitchTransform(table, args.codeswitch_ratio, seed) if use_cs else default_transform
        curve = train_lm(model, blocks, transform, sets, args, desc=f"{key} (seed {seed})")
        final = evaluate(model, sets)
        report = alignment_report(model, model.lm_head.weight, entries, args.layers, seed=seed)
        results["arms"][key] = {"curve": curve, "final": final, "alignment_end": report,
                                "seconds": time.time() - t0}
        print(f"{key:<10} clone loss {final['loss_clone']:.3f}  english loss {final['loss_english']:.3f}  "
              f"task en/clone {final['transfer_english']:.2f}/{final['transfer_clone']:.2f}  "
              f"facts en/clone {final['knowledge_english']:.2f}/{final['knowledge_clone']:.2f}  "
              f"({time.time() - t0:.0f} s)")
    return results


def arm_names(args) -> list[str]:
    return [a.strip() for a in args.arms.split(",") if a.strip()]


def weightings(args) -> list[str]:
    return [w.strip() for w in args.weightings.split(",") if w.strip()]


def results_table(summary: dict) -> str:
    def cell(arm, metric, percent):
        m = arm[metric]
        scale = 100 if percent else 1
        text = f"{scale * m['mean']:.1f}%" if percent else f"{m['mean']:.3f}"
        if len(m["values"]) > 1:
            text += f" ± {scale * m['std']:.1f}" if percent else f" ± {m['std']:.3f}"
        return text

    lines = ["| arm | Clone loss | English loss | task, English | task transfer, Clone | facts, English | "
             "facts, Clone | mean alignment gap |", "|---|---|---|---|---|---|---|---|"]
    for name, arm in summary.items():
        lines.append(f"| {name} | {cell(arm, 'loss_clone', False)} | {cell(arm, 'loss_english', False)} | "
                     f"{cell(arm, 'transfer_english', True)} | {cell(arm, 'transfer_clone', True)} | "
                     f"{cell(arm, 'knowledge_english', True)} | {cell(arm, 'knowledge_clone', True)} | "
                     f"{np.mean(arm['alignment_gap']):.3f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    unknown = [a for a in arm_names(args) if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    unknown = [w for w in weightings(args) if w not in get_args(AlphaWeights)]
    if unknown or not weightings(args):
        raise SystemExit(f"--weightings: {args.weightings!r}; choose from {list(get_args(AlphaWeights))}")
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_seed(args, args.seed + k) for k in range(args.seeds)]
    summary = summarise(runs)
    table_md = results_table(summary)
    print("\n" + table_md + "\n")
    seconds = time.time() - started
    results = {"config": vars(args), "seeds": [r["seed"] for r in runs], "summary": summary, "runs": runs,
               "seconds": seconds}
    results["plot"] = plot(out, runs, summary)
    report_md = ["# PreAlign, English -> English-Clone (tiny scale)", "", table_md, "",
                 f"Mean ± std over seeds {results['seeds']}. Chance: task {100 / len(MOODS):.0f}%, facts "
                 f"{100 / len(CITIES):.1f}%. Total {seconds:.0f} s.", ""]
    for r in runs:
        for weighting, init in r["init"].items():
            report_md += [f"Alignment after the init stage ({weighting}, seed {r['seed']}):", "", "```",
                          format_alignment_report(init["after"]), "```", ""]
    write_text(out / "report.md", "\n".join(report_md))
    write_json(out / "results.json", results, default=float)
    headline = {"out": str(out), "seconds": round(seconds, 1), "seeds": len(runs)}
    for name, arm in summary.items():
        slug = re.sub(r"\W+", "_", name)
        headline.update({f"{slug}_{m}": round(arm[m]["mean"], 4) for m in METRICS})
    print(json.dumps(headline))
    return headline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
