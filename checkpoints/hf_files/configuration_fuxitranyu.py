# Shipped with every Hugging Face export of fuxi-pretrain (loaded with trust_remote_code=True).
"""FuxiTranyu configuration: the fields of TJUNLP/FuxiTranyu-8B's config.json."""
try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class FuxiTranyuConfig(PreTrainedConfig):
    model_type = "fuxitranyu"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=250680,
        hidden_size=4096,
        intermediate_size=16384,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="gelu_fast",
        max_position_embeddings=4096,
        initializer_range=0.01,
        rms_norm_eps=1e-5,
        use_cache=True,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=True,
        attention_dropout=0.0,
        mlp_bias=True,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # FuxiTranyu uses none; transformers 5 deprecates the attribute
            self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
