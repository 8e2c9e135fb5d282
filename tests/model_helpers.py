"""Tiny models and multilingual inputs shared by tests (no tokenizer needed: UTF-8 bytes are token ids)."""
from __future__ import annotations

import torch

from fuxi.model import ModelConfig, build_model

MULTILINGUAL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
]


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256,
                  max_seq_len=128, kernels="torch")
    fields.update(overrides)
    config = ModelConfig(**fields)
    config.validate()
    return config


def tiny_model(seed: int = 0, std: float = 0.05, **overrides):
    """A tiny FuxiTranyu with weights large enough that every path matters (biases and norms too)."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, std)
            if name.endswith("norm.weight"):
                param.add_(1.0)
    return model.eval()


def multilingual_ids(max_len: int = 48) -> torch.Tensor:
    """[len(MULTILINGUAL_TEXT), max_len] byte ids (zero padded), a real mix of scripts."""
    rows = [list(text.encode("utf-8"))[:max_len] for text in MULTILINGUAL_TEXT]
    return torch.tensor([row + [0] * (max_len - len(row)) for row in rows])
