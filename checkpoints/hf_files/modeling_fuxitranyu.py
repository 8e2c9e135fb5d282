# Shipped with every Hugging Face export of fuxi-pretrain (loaded with trust_remote_code=True).
"""FuxiTranyu for transformers: a Llama-layout decoder with biased attention, a non-gated biased GELU MLP,
full rotary RoPE (rotate-half) and untied embeddings (arXiv 2408.06273).

Self-contained on purpose (only public transformers APIs), so it loads across transformers releases.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from .configuration_fuxitranyu import FuxiTranyuConfig
except ImportError:  # loaded as a plain module
    from configuration_fuxitranyu import FuxiTranyuConfig


class FuxiTranyuRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FuxiTranyuRotaryEmbedding(nn.Module):
    def __init__(self, head_dim, base):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    @torch.no_grad()
    def forward(self, position_ids, dtype):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64,
                                                     device=position_ids.device).float() / self.head_dim))
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class FuxiTranyuAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, h, bias=bias)
        self.k_proj = nn.Linear(h, h, bias=bias)
        self.v_proj = nn.Linear(h, h, bias=bias)
        self.o_proj = nn.Linear(h, h, bias=bias)

    def forward(self, hidden_states, cos, sin, attention_mask, past_key_values=None):
        bsz, q_len, _ = hidden_states.shape
        shape = (bsz, q_len, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))


class FuxiTranyuMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class FuxiTranyuDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = FuxiTranyuRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = FuxiTranyuAttention(config, layer_idx)
        self.post_attention_layernorm = FuxiTranyuRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FuxiTranyuMLP(config)

    def forward(self, hidden_states, cos, sin, attention_mask, past_key_values=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin,
                                                       attention_mask, past_key_values)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FuxiTranyuPreTrainedModel(PreTrainedModel):
    config_class = FuxiTranyuConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FuxiTranyuDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, FuxiTranyuRMSNorm):
            nn.init.ones_(module.weight)


def _causal_mask(attention_mask, q_len, past_len, device):
    """Boolean [batch or 1, 1, q_len, past_len + q_len]: causal, with padding keys (attention_mask 0) hidden."""
    k_len = past_len + q_len
    rows = torch.arange(past_len, k_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    mask = (cols <= rows)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
        mask = mask | (cols == rows)[None, None]  # a padded query sees itself only, so softmax has no NaN
    return mask


def cache_argument(past_key_values, kwargs):
    """The KV cache handed to forward: `cache=` since transformers 5.24, `past_key_values=` before. Both are
    accepted; ignoring the new keyword would silently restart an empty cache at every generation step."""
    cache = kwargs.pop("cache", None)
    return cache if past_key_values is None else past_key_values


def output_with_cache(output_class, cache, **fields):
    """A model output whose cache sits under the field name this transformers release reads back."""
    name = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
    return output_class(**fields, **{name: cache})


def output_cache(outputs):
    return outputs.cache if "cache" in type(outputs).__dataclass_fields__ else outputs.past_key_values


class FuxiTranyuModel(FuxiTranyuPreTrainedModel):
    decoder_layer = FuxiTranyuDecoderLayer  # FuxiTranyu-MoE: layers whose MLP may be an MoE block

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = FuxiTranyuRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FuxiTranyuRotaryEmbedding(config.hidden_size // config.num_attention_heads,
                                                    config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def layer_inputs(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache):
        """(embeddings, cos, sin, attention mask, the cache the layers update or None) for the layer loop."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_len = inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None:  # left padding: count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        elif position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)[None]
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        mask = _causal_mask(attention_mask, q_len, past_len, inputs_embeds.device)
        return inputs_embeds, cos, sin, mask, past_key_values if use_cache else None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        past_key_values = cache_argument(past_key_values, kwargs)
        hidden_states, cos, sin, mask, cache = self.layer_inputs(input_ids, attention_mask, position_ids,
                                                                 past_key_values, inputs_embeds, use_cache)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, cache)
        return output_with_cache(BaseModelOutputWithPast, cache, last_hidden_state=self.norm(hidden_states))


class FuxiTranyuForCausalLM(FuxiTranyuPreTrainedModel, GenerationMixin):
    model_class = FuxiTranyuModel  # FuxiTranyu-MoE: its MoE model

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def logits_and_loss(self, hidden_states, labels, logits_to_keep):
        """lm_head on the last `logits_to_keep` positions (0: all) and, with labels, the next-token loss."""
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits, loss

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        past_key_values = cache_argument(past_key_values, kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits, loss = self.logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep)
        return output_with_cache(CausalLMOutputWithPast, output_cache(outputs), loss=loss, logits=logits)
