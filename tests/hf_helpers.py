"""Tiny random transformers models for the Hugging Face tests, built by transformers itself (no hub): one place for
the Llama, Qwen2, Mistral, Mixtral and Qwen2-MoE builders, the greedy decode and the no-remote-code load."""
from __future__ import annotations

import torch

VOCAB = 300  # the tokenizer the families test trains has 300 tokens; id 0 is <|endoftext|> (bos = eos)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def tiny_llama(**fields):
    """LlamaForCausalLM: GQA (2 k/v heads), llama3 RoPE scaling, theta 5e5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(COMMON, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling=LLAMA3_ROPE)
    return LlamaForCausalLM(LlamaConfig(**{**config, **fields}))


def tiny_qwen2(**fields):
    """Qwen2ForCausalLM: q/k/v biases, tied embeddings, GQA, theta 1e6."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = dict(COMMON, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return Qwen2ForCausalLM(Qwen2Config(**{**config, **fields}))


def tiny_mistral(**fields):
    """MistralForCausalLM: one k/v head, full attention."""
    from transformers import MistralConfig, MistralForCausalLM

    config = dict(COMMON, num_key_value_heads=1, sliding_window=None, rms_norm_eps=1e-6)
    return MistralForCausalLM(MistralConfig(**{**config, **fields}))


def tiny_mixtral(**fields):
    """MixtralForCausalLM: 3 experts, top-2, GQA."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = dict(COMMON, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, rms_norm_eps=1e-6,
                  sliding_window=None, router_aux_loss_coef=0.02)
    return MixtralForCausalLM(MixtralConfig(**{**config, **fields}))


def tiny_qwen2_moe(**fields):
    """Qwen2MoeForCausalLM without a shared expert (size 0): 3 routed experts as wide as the FFN, top-2
    renormalised, q/k/v biases, tied embeddings."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = dict(COMMON, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  num_experts=3, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=96,
                  shared_expert_intermediate_size=0, decoder_sparse_step=1, mlp_only_layers=[],
                  use_sliding_window=False, router_aux_loss_coef=0.02)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**config, **fields}))


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def randomize_biases(model, std: float = 0.1):
    """transformers initialises biases to 0; nonzero ones make a test see whether they are carried."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, std)
    return model


def rope_of(config) -> dict:
    """A transformers config's RoPE as one dict: `rope_parameters` (5.x), or theta plus `rope_scaling` (4.x)."""
    rope = getattr(config, "rope_parameters", None)
    if rope is not None:
        return dict(rope)
    return {"rope_theta": config.rope_theta, **(getattr(config, "rope_scaling", None) or {"rope_type": "default"})}


def token_ids(length: int, batch: int = 2, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(hf, ids, n: int = 8):
    """transformers' greedy generate, never stopping at eos."""
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


def load_native(path):
    """AutoModelForCausalLM without trust_remote_code, fp32; every tensor must find its place."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def drift_experts_and_routers(moe, seed: int = 2) -> None:
    """What stage 1 does to an upcycled model, in one step: the experts differ from each other and the router
    matters (random perturbations: 0.05 on the experts, 0.5 on the routers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".experts." in name or ".router." in name:
                p.add_(torch.randn_like(p) * (0.5 if ".router." in name else 0.05))
