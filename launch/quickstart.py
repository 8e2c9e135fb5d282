"""`make quickstart`: the whole path on the bundled corpus, on one CPU process, in a few minutes.

bundled corpus -> clean/dedup -> byte-level BPE tokenizer -> packed webdataset shards -> balanced stream ->
a tiny FuxiTranyu trained with DeepSpeed -> checkpoint -> Hugging Face export (runs/quickstart/hf), then the
export is loaded with plain transformers (no remote code) for a few greedy samples from its cached generate.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from fuxi.common.atomic import write_json

OUT = Path("runs/quickstart")
CONFIG = "configs/train/quickstart.yaml"
PROMPTS = {"en": "The language of", "de": "Die Sprache", "fr": "La langue", "ru": "Язык", "zh": "语言",
           "code_python": "def main("}


def loss_table(start: dict, end: dict) -> str:
    lines = [f"{'language':<16}{'start':>9}{'end':>9}{'change':>9}{'bpb end':>9}", "-" * 52]
    for lang in sorted(start):
        s, e = start[lang]["loss"], end[lang]["loss"]
        lines.append(f"{lang:<16}{s:>9.3f}{e:>9.3f}{e - s:>+9.3f}{end[lang].get('bpb', float('nan')):>9.3f}")
    return "\n".join(lines)


def greedy_samples(hf_dir: Path, prompts: dict[str, str], max_new_tokens: int = 24) -> dict[str, str]:
    """Load the export exactly as a user would (plain transformers, offline, no remote code) and sample with
    its cached `generate`, all prompts in one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    batch = tokenizer(list(prompts.values()), return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return dict(zip(prompts, texts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of configs/train/quickstart.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "fuxi.data_pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fuxi.data_pipeline.prepare import prepare_dataset
    from fuxi.pretrain.config import load_train_config
    from fuxi.pretrain.trainer import train

    started = time.time()
    shutil.rmtree(OUT, ignore_errors=True)  # a demo: always from scratch
    cfg = load_train_config(CONFIG, args.set)
    print(f"[1/4] preparing the bundled corpus: clean, tokenizer ({cfg.model.vocab_size} tokens), shards")
    prepare_dataset(OUT / "data", vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len, progress=True)
    print(f"[2/4] training a {cfg.model.num_layers}-layer FuxiTranyu (hidden {cfg.model.hidden_size}) for "
          f"{cfg.schedule.total_steps} steps")
    result = train(cfg)
    hf_dir = OUT / "hf"
    print(f"[3/4] exported to {hf_dir}; per-language validation loss (nats/token):")
    print(loss_table(result.start_val, result.final_val))
    print("[4/4] greedy samples from the export (plain transformers, cached generate):")
    samples = greedy_samples(hf_dir, PROMPTS)
    for lang, text in samples.items():
        print(f"  {lang:<12} {text!r}")
    fell = {lang: result.final_val[lang]["loss"] < result.start_val[lang]["loss"] for lang in result.start_val}
    summary = {
        "steps": result.step, "seconds": round(time.time() - started, 1), "hf_export": str(hf_dir),
        "val_loss_start": {k: v["loss"] for k, v in result.start_val.items()},
        "val_loss_end": {k: v["loss"] for k, v in result.final_val.items()},
        "val_bpb_end": {k: v.get("bpb") for k, v in result.final_val.items()},
        "loss_fell_in_every_language": all(fell.values()),
        "samples": samples,
    }
    write_json(OUT / "summary.json", summary, indent=2)
    print(f"wrote {OUT / 'summary.json'} ({summary['seconds']:.0f} s); plot: {OUT / 'loss_per_language.png'}")
    if not summary["loss_fell_in_every_language"]:
        print(f"validation loss did not fall in: {[k for k, v in fell.items() if not v]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
