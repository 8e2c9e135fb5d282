# Shipped with every Hugging Face export of an upcycled fuxi-pretrain model (loaded with trust_remote_code=True).
"""FuxiTranyu-MoE configuration: the dense FuxiTranyu fields plus the MoE-LPR routing fields."""
try:
    from .configuration_fuxitranyu import FuxiTranyuConfig
except ImportError:  # loaded as a plain module
    from configuration_fuxitranyu import FuxiTranyuConfig


class FuxiTranyuMoeConfig(FuxiTranyuConfig):
    """num_experts experts per MoE layer (expert 0 the original FFN), num_experts_per_tok chosen per token.

    norm_topk_prob: renormalise the top-K router probabilities to sum to 1 (false only for the released code's
    top-1 behaviour, where the output is p_max * E(x)). moe_layers: indices of the MoE layers (None: all).
    output_router_logits / router_aux_loss_coef: return the per-layer router logits and add the (Mixtral-style,
    per layer, then averaged) load-balancing loss times the coefficient to the loss.
    """

    model_type = "fuxitranyu_moe"

    def __init__(
        self,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        moe_layers=None,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        **kwargs,
    ):
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.moe_layers = moe_layers
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        super().__init__(**kwargs)
