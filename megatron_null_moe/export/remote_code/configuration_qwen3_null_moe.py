"""Configuration of a Qwen3-MoE with zero-compute null experts (megatron_null_moe.export).

Qwen3-MoE's configuration (``num_experts`` N real experts, ``num_experts_per_tok`` K slots,
``mlp_only_layers`` the layers left dense) plus what null experts add:
``num_null_experts`` M (copies of each MoE layer's one null logit; 0 at rho = 1),
``shared_expert_intermediate_size`` (0: none), ``router_dtype`` (the dtype router logits
are computed in: "fp32", "fp64", or None for the model's, as Megatron's
--moe-router-dtype), ``router_topk_scaling_factor`` (Megatron's
--moe-router-topk-scaling-factor) and ``output_real_experts_per_token``.
"""

from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

ROUTER_DTYPES = (None, "fp32", "fp64")


class Qwen3NullMoeConfig(Qwen3MoeConfig):
    model_type = "qwen3_null_moe"

    num_null_experts: int = 0
    shared_expert_intermediate_size: int = 0
    router_dtype: str | None = None
    router_topk_scaling_factor: float | None = None
    output_real_experts_per_token: bool = False

    def __post_init__(self, **kwargs):
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype {self.router_dtype!r}: allowed: "
                             f"{', '.join(map(repr, ROUTER_DTYPES))}.")
        if self.num_null_experts < 0 or self.shared_expert_intermediate_size < 0:
            raise ValueError(f"num_null_experts {self.num_null_experts} and "
                             f"shared_expert_intermediate_size "
                             f"{self.shared_expert_intermediate_size}: allowed: 0 or more.")
        super().__post_init__(**kwargs)

    @property
    def real_fraction(self) -> float:
        """rho: the fraction of the K slots meant for real experts, N / (N + M)."""
        return self.num_experts / (self.num_experts + self.num_null_experts)


__all__ = ["Qwen3NullMoeConfig"]
