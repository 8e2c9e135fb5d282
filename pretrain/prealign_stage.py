"""PreAlign's alignment initialisation (docs/methods.md §3.3): the `prealign_init` trainer stage.

From a random model, the stage trains on dictionary entries instead of the text stream. Each sample is one
concept of the alignment table with `words_per_entry` of its words; each word is its own short sequence
[BOS, word tokens..., padding] (the word is tokenised as " " + word, the way it appears mid-sentence).

Loss (per micro-batch):
  * word vectors: in every representation space, the sum of the word's token vectors (padding and BOS masked
    out). The spaces are the embedding output, every block output (L + 1, `output_hidden_states`) and the
    output-embedding rows of the word's tokens (lm_head.weight), L + 2 in all;
  * L_align: in each space, InfoNCE on L2-normalised word vectors at temperature tau (0.1) over the micro-batch
    gathered from every rank *with gradient*: for anchor i the positives are the other words of its concept
    (a pair gives the standard symmetric InfoNCE; more words give the supervised-contrastive form, normalised
    by the number of positives) and every other gathered word is a negative. Self-similarity is excluded
    (-inf, not 0), and so is another copy of the same token sequence under a different concept (identical
    inputs cannot be pushed apart). Averaged over anchors and over the L + 2 spaces;
  * L_LM: next-token loss on the word sequences (the model also learns to produce dictionary words);
  * total: L_LM + alpha * L_align (prealign.alpha_weights "align", the default: what both released trainers
    compute) or L_align + alpha * L_LM ("lm"); alpha = 0.1.

Distributed: each rank computes the loss of its own anchors against all gathered words, and its share of the
LM term's token sum, both scaled so that the ranks' mean (what DeepSpeed's gradient averaging differentiates) is
the loss of the whole micro-batch across ranks; 1 rank with batch 2B and 2 ranks with B each give the same loss
and gradients. Negatives come from one
micro-step across ranks, so keep gradient accumulation at 1 to make the contrastive batch the global batch.

At the end of the run, `alignment_report` measures per space the mean cosine of aligned word pairs against
random pairs (alignment_report.json and alignment_per_layer.png in the run folder).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fuxi.common.atomic import save_figure
from fuxi.common.errors import ConfigError
from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.stages import PretrainStage, StepLoss, register_stage

log = logging.getLogger("fuxi.train")
IGNORE_INDEX = -100
STATE_VERSION = 1


# ---- dictionary data ----------------------------------------------------------------------------------------

@dataclass
class DictionaryEntries:
    """The alignment table, tokenised: distinct words (token-id tuples) and the concepts that group them."""

    words: list[tuple[int, ...]]
    word_langs: list[int]  # index into `languages`, per word
    concepts: list[list[int]]  # word indices per concept (at least two)
    concept_ids: list[int]  # the table's concept index, per concept
    languages: list[str]

    @property
    def max_word_tokens(self) -> int:
        return max(len(w) for w in self.words)

    @classmethod
    def from_token_concepts(cls, concepts: list[list[tuple[tuple[int, ...], int]]], languages: list[str],
                            concept_ids: list[int] | None = None) -> "DictionaryEntries":
        """concepts: per concept, (token ids, language index) per word. Words repeated inside a concept are kept
        once; concepts left with fewer than two words are dropped."""
        index: dict[tuple[int, ...], int] = {}
        words, langs, groups, ids = [], [], [], []
        for k, concept in enumerate(concepts):
            members: list[int] = []
            for tokens, lang in concept:
                tokens = tuple(int(t) for t in tokens)
                if not tokens:
                    continue
                if tokens not in index:
                    index[tokens] = len(words)
                    words.append(tokens)
                    langs.append(lang)
                if index[tokens] not in members:
                    members.append(index[tokens])
            if len(members) >= 2:
                groups.append(members)
                ids.append(concept_ids[k] if concept_ids is not None else k)
        if not groups:
            raise ConfigError("prealign.table", "no concept has two distinct words after tokenisation")
        return cls(words, langs, groups, ids, list(languages))

    @classmethod
    def from_table(cls, table_path: str | Path, tokenizer_dir: str | Path, languages: list[str],
                   max_word_tokens: int, only_languages: list[str] | None = None) -> "DictionaryEntries":
        """Tokenise an alignment table; `languages` is the run's language list (table languages it lacks are
        appended). Words longer than max_word_tokens tokens are skipped (counted in the log)."""
        from fuxi.data_pipeline.align_table import read_alignment_table
        from fuxi.data_pipeline.tokenizer import load_tokenizer

        table = read_alignment_table(table_path)
        tok = load_tokenizer(tokenizer_dir)
        languages = list(languages)
        concepts, too_long = [], 0
        for concept in table.concepts:
            members = []
            for word, lang in zip(concept.words, concept.langs):
                lang = lang or "und"
                if only_languages is not None and lang not in only_languages:
                    continue
                ids = tuple(tok.encode(" " + word, add_special_tokens=False).ids)
                if len(ids) > max_word_tokens:
                    too_long += 1
                    continue
                if lang not in languages:
                    languages.append(lang)
                members.append((ids, languages.index(lang)))
            concepts.append(members)
        entries = cls.from_token_concepts(concepts, languages, [c.index for c in table.concepts])
        log.info("prealign: %d concepts, %d distinct words from %s (%d words over %d tokens skipped)",
                 len(entries.concepts), len(entries.words), table_path, too_long, max_word_tokens)
        return entries


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class DictionaryBatches:
    """Sample g (a global position) -> one concept and `words_per_entry` of its words, by arithmetic: pass p over
    the concepts is a permutation seeded by (seed, p); the words are drawn with a generator seeded by (seed, g).
    Concepts with fewer words leave empty slots (concept id -1, excluded from the loss)."""

    def __init__(self, entries: DictionaryEntries, words_per_entry: int, seed: int, bos_id: int = 0,
                 width: int | None = None):
        self.entries, self.k, self.seed, self.bos_id = entries, words_per_entry, seed, bos_id
        self.width = (width or entries.max_word_tokens) + 1  # + BOS
        if self.width - 1 < entries.max_word_tokens:
            raise ConfigError("prealign.max_word_tokens", f"{self.width - 1} is shorter than the longest word "
                              f"({entries.max_word_tokens} tokens)")
        self._perm: tuple[int, np.ndarray] | None = None

    def concept_at(self, g: int) -> int:
        p, r = divmod(g, len(self.entries.concepts))
        if self._perm is None or self._perm[0] != p:
            self._perm = (p, _rng(self.seed, 11, p).permutation(len(self.entries.concepts)))
        return int(self._perm[1][r])

    def sample(self, g: int) -> dict[str, np.ndarray]:
        c = self.concept_at(g)
        members = self.entries.concepts[c]
        if len(members) > self.k:
            chosen = sorted(_rng(self.seed, 12, g).choice(len(members), self.k, replace=False).tolist())
            members = [members[i] for i in chosen]
        k, w = self.k, self.width
        ids = np.full((k, w), self.bos_id, dtype=np.int64)
        labels = np.full((k, w), IGNORE_INDEX, dtype=np.int64)
        langs = np.full((k, w), -1, dtype=np.int64)
        mask = np.zeros((k, w), dtype=np.int64)
        concept = np.full(k, -1, dtype=np.int64)
        word = np.full(k, -1, dtype=np.int64)
        for slot, wi in enumerate(members):
            tokens = self.entries.words[wi]
            n = len(tokens)
            ids[slot, 1:n + 1] = tokens
            labels[slot, :n] = tokens  # labels[t] is the token after input t: BOS predicts the first token
            langs[slot, :n + 1] = self.entries.word_langs[wi]
            mask[slot, 1:n + 1] = 1
            concept[slot] = self.entries.concept_ids[c]
            word[slot] = wi
        return {"input_ids": ids.reshape(-1), "labels": labels.reshape(-1), "lang_ids": langs.reshape(-1),
                "doc_ids": np.repeat(np.arange(k, dtype=np.int64), w), "word_mask": mask.reshape(-1),
                "concept_ids": concept, "word_ids": word}

    def batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.sample(g) for g in positions]
        return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class DictionaryLoader:
    """The dictionary counterpart of data_pipeline's TrainLoader (same contract for the trainer): endless
    batches for one rank, rank r reading positions r, r + R, ...; state = batches consumed."""

    def __init__(self, batches: DictionaryBatches, batch_size: int, rank: int, world_size: int,
                 bytes_per_token: dict[str, float] | None = None):
        self.source, self.batch_size, self.rank, self.world_size = batches, batch_size, rank, world_size
        self.languages = batches.entries.languages
        self.bytes_per_token = dict(bytes_per_token or {})
        self.batches = 0
        self.tokens_seen = torch.zeros(len(self.languages), dtype=torch.int64)

    def fingerprint(self) -> dict:
        e = self.source.entries
        return {"seed": self.source.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "words_per_entry": self.source.k, "concepts": len(e.concepts),
                "words": len(e.words)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "batches": self.batches, "tokens_seen": self.tokens_seen.tolist(),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint():
            raise ConfigError("prealign", f"the saved dictionary-data state {state.get('fingerprint')} does not match "
                              f"this run's {self.fingerprint()}; the sample order would differ")
        self.batches = int(state["batches"])
        self.tokens_seen = torch.tensor(state["tokens_seen"], dtype=torch.int64)

    def mixture_report(self) -> str:
        """Word tokens consumed per language on this rank (the trainer logs it at the end of a run)."""
        from fuxi.common.tables import format_table

        total = max(int(self.tokens_seen.sum()), 1)
        rows = [[lang, int(n), f"{100 * int(n) / total:.1f}%"]
                for lang, n in zip(self.languages, self.tokens_seen.tolist()) if n]
        return format_table(["lang", "word tokens", "share"], rows)

    def __iter__(self):
        while True:
            first = self.batches * self.batch_size
            positions = [self.rank + self.world_size * k for k in range(first, first + self.batch_size)]
            batch = self.source.batch(positions)
            self.batches += 1
            langs = batch["lang_ids"][batch["word_mask"].bool()]
            self.tokens_seen += torch.bincount(langs, minlength=len(self.languages))[:len(self.languages)]
            yield batch


def build_dictionary_loader(cfg: TrainConfig, batch_size: int, rank: int, world_size: int) -> DictionaryLoader:
    """The prealign_init stage's data: the alignment table, tokenised with the run's tokenizer, in the order of
    the train manifest's language list (so held-out per-language validation keeps its language ids)."""
    from fuxi.data_pipeline.align_table import SHIPPED_TABLE
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.tokenizer import EOS_ID

    pa = cfg.prealign
    tokenizer = cfg.data.tokenizer or cfg.run.tokenizer
    if not tokenizer:
        raise ConfigError("data.tokenizer", "the prealign_init stage tokenises the alignment table; name the "
                          "tokenizer directory (data.tokenizer or run.tokenizer)")
    languages, bytes_per_token = [], {}
    if cfg.data.train_manifest and Path(cfg.data.train_manifest).is_file():
        manifest = load_manifest(cfg.data.train_manifest)
        languages, bytes_per_token = list(manifest.languages), dict(manifest.bytes_per_token)
    entries = DictionaryEntries.from_table(pa.table or SHIPPED_TABLE, tokenizer, languages, pa.max_word_tokens,
                                           pa.languages)
    batches = DictionaryBatches(entries, pa.words_per_entry, cfg.data.seed, bos_id=EOS_ID,
                                width=pa.max_word_tokens)
    return DictionaryLoader(batches, batch_size, rank, world_size, bytes_per_token)


# ---- the loss -----------------------------------------------------------------------------------------------

def word_vectors(hidden_states: tuple[torch.Tensor, ...], input_ids: torch.Tensor, word_mask: torch.Tensor,
                 output_embedding: torch.Tensor) -> torch.Tensor:
    """[S, R, h] fp32: per representation space (each hidden state, then the output-embedding rows), the sum of
    each row's word-token vectors. input_ids, word_mask: [R, W]."""
    mask = word_mask.to(torch.float32).unsqueeze(-1)
    spaces = [(h.float() * mask).sum(1) for h in hidden_states]
    spaces.append((F.embedding(input_ids, output_embedding).float() * mask).sum(1))
    return torch.stack(spaces)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along `dim` whose backward hands each rank the sum over ranks of the gradient of its slice
    (what torch.distributed.nn.functional.all_gather does, without its all-to-all on gloo)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim, ctx.size = dim, tensor.shape[dim]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(ctx.dim, dist.get_rank() * ctx.size, ctx.size), None


def _gather(tensor: torch.Tensor, with_grad: bool, dim: int) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's `tensor` along dim (equal shapes); -> (gathered, this rank's offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    if with_grad:
        return _GatherWithGrad.apply(tensor, dim), rank * tensor.shape[dim]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim), rank * tensor.shape[dim]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class AlignLoss:
    loss: torch.Tensor  # this rank's share, to backpropagate (ranks' mean = loss of the whole batch)
    per_space: torch.Tensor  # [S] detached loss of the whole batch across ranks, per space
    anchors: torch.Tensor  # number of anchors across ranks
    label_tokens: torch.Tensor | None = None  # the `label_tokens` passed in, summed across ranks

    @property
    def value(self) -> float:
        return float(self.per_space.mean())


def contrastive_alignment_loss(vectors: torch.Tensor, concept_ids: torch.Tensor, word_ids: torch.Tensor,
                               temperature: float, label_tokens: torch.Tensor | None = None) -> AlignLoss:
    """InfoNCE over words gathered from every rank, in each space. vectors [S, N, h] (this rank's N words),
    concept_ids / word_ids [N] (-1: empty slot). See the module docstring for positives and exclusions.
    `label_tokens`, this rank's count of next-token labels, is summed across ranks in the same all-reduce as the
    anchor count: one collective per micro-batch for both losses (see global_token_mean)."""
    z_local = F.normalize(vectors.float(), dim=-1)
    z_all, offset = _gather(z_local, with_grad=True, dim=1)
    ids_all, _ = _gather(torch.stack([concept_ids, word_ids]), with_grad=False, dim=1)
    concept_all, word_all = ids_all[0], ids_all[1]
    n_local, n_all = z_local.shape[1], z_all.shape[1]
    valid_all = concept_all >= 0
    rows = torch.arange(n_local, device=vectors.device)
    is_self = torch.zeros(n_local, n_all, dtype=torch.bool, device=vectors.device)
    is_self[rows, rows + offset] = True
    positive = (concept_ids[:, None] == concept_all[None, :]) & valid_all[None, :] & ~is_self
    same_word = (word_ids[:, None] == word_all[None, :]) & ~positive
    anchor = (concept_ids >= 0) & positive.any(1)
    allowed = valid_all[None, :] & ~is_self & ~same_word
    allowed |= ~anchor[:, None]  # rows that are not anchors: keep finite logits (their loss is masked out)
    logits = torch.einsum("snh,smh->snm", z_local, z_all) / temperature
    log_prob = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1).clamp(min=1)  # [S, n_local]
    local_sum = (per_anchor * anchor).sum(-1)  # [S]
    spaces = local_sum.shape[0]
    counts = [anchor.sum()] + ([label_tokens] if label_tokens is not None else [])
    totals = torch.cat([local_sum.detach().double(), torch.stack(counts).double()])
    if _world_size() > 1:
        dist.all_reduce(totals)  # no host sync: the scale stays on the device
    anchors = totals[spaces].clamp(min=1)
    scale = (_world_size() / anchors).float()
    return AlignLoss((local_sum * scale).mean(), (totals[:spaces] / anchors).float(), totals[spaces],
                     totals[spaces + 1] if label_tokens is not None else None)


def global_token_mean(token_losses: torch.Tensor, label_tokens: torch.Tensor) -> torch.Tensor:
    """This rank's share of the next-token loss of the whole batch across ranks: its token-loss sum times
    world / `label_tokens` (the label tokens on all ranks), so the ranks' mean, which DeepSpeed's gradient
    averaging differentiates, is the token mean of the global batch. Words differ in length, so a per-rank mean
    would weight the ranks' tokens unequally and 2 ranks would not train like 1 process."""
    return token_losses.sum() * (_world_size() / label_tokens.clamp(min=1)).float()


@dataclass
class PreAlignOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor  # this rank's share (see global_token_mean), detached
    align: AlignLoss
    token_losses: torch.Tensor  # [B, K * W]


def prealign_loss(model, batch: dict[str, torch.Tensor], output_embedding: torch.Tensor, words_per_entry: int,
                  temperature: float, alpha: float, alpha_weights: str = "align") -> PreAlignOutput:
    """The stage loss for one micro-batch (module docstring). `model` is the engine or the bare module."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["word_mask"]
    rows = ids.shape[0] * words_per_entry
    ids, labels, mask = (t.reshape(rows, -1) for t in (ids, labels, mask))
    out = model(ids, labels=labels, output_hidden_states=True)
    if out.hidden_states is None:
        raise ConfigError("model.type", "the prealign_init stage needs a model with output_hidden_states")
    vectors = word_vectors(out.hidden_states, ids, mask, output_embedding)
    align = contrastive_alignment_loss(vectors, batch["concept_ids"].reshape(-1), batch["word_ids"].reshape(-1),
                                       temperature, label_tokens=(labels != IGNORE_INDEX).sum())
    lm = global_token_mean(out.token_losses, align.label_tokens)
    if alpha_weights == "align":
        loss = lm + alpha * align.loss
    else:
        loss = align.loss + alpha * lm
    return PreAlignOutput(loss, lm.detach(), align, out.token_losses.reshape(batch["input_ids"].shape))


# ---- measuring alignment ------------------------------------------------------------------------------------

def space_names(num_layers: int) -> list[str]:
    return ["embedding"] + [f"layer {i}" for i in range(1, num_layers + 1)] + ["output embedding"]


@torch.no_grad()
def alignment_report(model, output_embedding: torch.Tensor, entries: DictionaryEntries, num_layers: int,
                     max_concepts: int = 512, seed: int = 0, batch_rows: int = 256,
                     device: torch.device | str = "cpu") -> dict:
    """Per space: mean cosine of aligned pairs (two words of one concept) and of random pairs (words of two
    different concepts, a fixed derangement), and their gap. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(entries.concepts))[:max_concepts]
    a_words = [entries.concepts[c][0] for c in picked]
    b_words = [entries.concepts[c][1 + int(rng.integers(len(entries.concepts[c]) - 1))] for c in picked]
    shift = np.roll(np.arange(len(picked)), 1)  # concept i against the b-word of concept i-1
    distinct = list(dict.fromkeys(a_words + b_words))
    width = max(len(entries.words[w]) for w in distinct) + 1
    ids = torch.zeros(len(distinct), width, dtype=torch.long)
    mask = torch.zeros(len(distinct), width, dtype=torch.long)
    for r, w in enumerate(distinct):
        tokens = entries.words[w]
        ids[r, 1:len(tokens) + 1] = torch.tensor(tokens)
        mask[r, 1:len(tokens) + 1] = 1
    was_training = getattr(model, "training", False)
    model.eval()
    chunks = []
    for start in range(0, len(distinct), batch_rows):
        x, m = ids[start:start + batch_rows].to(device), mask[start:start + batch_rows].to(device)
        out = model(x, output_hidden_states=True)
        chunks.append(F.normalize(word_vectors(out.hidden_states, x, m, output_embedding), dim=-1).cpu())
    if was_training:
        model.train()
    z = torch.cat(chunks, dim=1)  # [S, words, h]
    row = {w: r for r, w in enumerate(distinct)}
    a = torch.tensor([row[w] for w in a_words])
    b = torch.tensor([row[w] for w in b_words])
    aligned = (z[:, a] * z[:, b]).sum(-1)  # [S, pairs]
    random_pairs = (z[:, a] * z[:, b[shift]]).sum(-1)
    same = torch.tensor([entries.words[x] == entries.words[y] for x, y in zip(a_words, [b_words[i] for i in shift])])
    random_pairs = random_pairs[:, ~same] if bool(same.any()) else random_pairs
    names = space_names(num_layers)
    return {"spaces": names, "pairs": len(picked),
            "aligned_cos": aligned.mean(1).tolist(), "random_cos": random_pairs.mean(1).tolist(),
            "gap": (aligned.mean(1) - random_pairs.mean(1)).tolist(),
            "aligned_cos_std": aligned.std(1).tolist(), "random_cos_std": random_pairs.std(1).tolist()}


def format_alignment_report(report: dict) -> str:
    lines = [f"{'space':<18}{'aligned cos':>12}{'random cos':>12}{'gap':>9}"]
    for name, a, r, g in zip(report["spaces"], report["aligned_cos"], report["random_cos"], report["gap"]):
        lines.append(f"{name:<18}{a:>12.3f}{r:>12.3f}{g:>9.3f}")
    return "\n".join(lines)


def plot_alignment_report(reports: dict[str, dict], path: str | Path, title: str) -> Path:
    """Aligned vs random cosine per space, one line pair per report (e.g. before / after)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for (label, report), color in zip(reports.items(), ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        x = range(len(report["spaces"]))
        ax.plot(x, report["aligned_cos"], "-o", color=color, label=f"{label}: aligned pairs")
        ax.plot(x, report["random_cos"], "--x", color=color, label=f"{label}: random pairs")
        ax.set_xticks(list(x), report["spaces"], rotation=30, ha="right")
    ax.set_ylabel("mean cosine")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return Path(path)


# ---- the stage ----------------------------------------------------------------------------------------------

class PreAlignInitStage(PretrainStage):
    """`stage: prealign_init`: dictionary data (TrainData builds a DictionaryLoader) and the loss above."""

    name = "prealign_init"

    def __init__(self, cfg: TrainConfig, languages: list[str]):
        super().__init__(cfg, languages)
        if cfg.model.type != "fuxitranyu":
            raise ConfigError("model.type", f"prealign_init aligns a dense 'fuxitranyu' model, got {cfg.model.type!r}")
        if cfg.model.max_seq_len < cfg.prealign.max_word_tokens + 1:
            raise ConfigError("prealign.max_word_tokens", f"{cfg.prealign.max_word_tokens} + BOS exceeds "
                              f"model.max_seq_len {cfg.model.max_seq_len}")
        if cfg.checkpoint.init_from:
            log.warning("prealign_init: checkpoint.init_from is set; PreAlign starts from a random init")
        self.pa = cfg.prealign
        self._window: list[torch.Tensor] = []
        self._entries: DictionaryEntries | None = None
        self._before: dict | None = None  # alignment of the initial weights (not measured on a resumed run)
        self._measured_initial = False

    def _report(self, model, output_embedding: torch.Tensor, device) -> dict:
        from fuxi.data_pipeline.align_table import SHIPPED_TABLE

        if self._entries is None:
            tokenizer = self.cfg.data.tokenizer or self.cfg.run.tokenizer
            self._entries = DictionaryEntries.from_table(self.pa.table or SHIPPED_TABLE, tokenizer, self.languages,
                                                         self.pa.max_word_tokens, self.pa.languages)
        return alignment_report(model, output_embedding, self._entries, self.cfg.model.num_layers,
                                max_concepts=self.pa.report_concepts, seed=self.cfg.run.seed, device=device)

    def output_embedding(self, engine) -> torch.Tensor:
        module = getattr(engine, "module", engine)
        return module.lm_head.weight

    def compute_loss(self, engine, batch: dict) -> StepLoss:
        if not self._measured_initial:  # the first micro-batch of a fresh run sees the initial weights
            self._measured_initial = True
            if getattr(engine, "global_steps", 0) == 0:
                self._before = self._report(engine, self.output_embedding(engine), batch["input_ids"].device)
        out = prealign_loss(engine, batch, self.output_embedding(engine), self.pa.words_per_entry,
                            self.pa.temperature, self.pa.alpha, self.pa.alpha_weights)
        self._window.append(out.align.per_space)
        return StepLoss(out.loss, out.lm_loss, out.token_losses, {"align": out.align.per_space})

    def log_metrics(self) -> dict:
        if not self._window:
            return {}
        per_space = torch.stack(self._window).mean(0)  # already global (all-reduced in the loss)
        self._window = []
        names = space_names(self.cfg.model.num_layers)
        return {"align/loss": float(per_space.mean()),
                **{f"align/loss/{name}": float(v) for name, v in zip(names, per_space)}}

    def end_of_run(self, engine, val_batches: dict, out_dir, ctx) -> dict:
        """Per-space alignment of the initial and the final weights: alignment_report.json (+ PNG)."""
        after = self._report(engine, self.output_embedding(engine), ctx.device)
        if ctx.is_main:
            from fuxi.common.atomic import write_text

            out_dir = Path(out_dir)
            write_text(out_dir / "alignment_report.json", json.dumps({"before": self._before, "after": after},
                                                                        indent=1))
            reports = {"initial weights": self._before, "after prealign_init": after}
            plot_alignment_report({k: v for k, v in reports.items() if v}, out_dir / "alignment_per_layer.png",
                                  "Word alignment per representation space")
            log.info("prealign_init: alignment per space, after the stage\n%s", format_alignment_report(after))
        record = {f"align/gap/{name}": gap for name, gap in zip(after["spaces"], after["gap"])}
        if self._before:
            record.update({f"align/gap_initial/{name}": gap
                           for name, gap in zip(self._before["spaces"], self._before["gap"])})
        return record


register_stage(PreAlignInitStage.name, PreAlignInitStage)
