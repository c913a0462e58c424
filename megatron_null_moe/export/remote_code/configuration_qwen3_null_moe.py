"""Configuration of a Qwen3-MoE with zero-compute null experts (megatron_null_moe.export).

Qwen3-MoE's configuration (``num_experts`` N real experts, ``num_experts_per_tok`` K slots,
``mlp_only_layers`` the layers left dense) plus what null experts add:
``num_null_experts`` M (copies of each MoE layer's one null logit; 0 at rho = 1),
``shared_expert_intermediate_size`` (0: none), ``router_dtype`` (the dtype router logits
are computed in: "fp32", "fp64", or None for the model's, as Megatron's
--moe-router-dtype), ``router_topk_scaling_factor`` (Megatron's
--moe-router-topk-scaling-factor), ``router_score_function`` ("softmax" or "sigmoid",
Megatron's --moe-router-score-function), ``router_expert_bias`` (each router holds a
per-expert selection bias ``expert_bias``, Megatron's --moe-router-enable-expert-bias),
``router_num_groups`` and ``router_group_topk`` (node-limited routing, Megatron's
--moe-router-num-groups and --moe-router-group-topk; None: no groups) and
``output_real_experts_per_token``. Without the router_score_function, router_expert_bias
and group entries a model routes as the paper: softmax, no per-expert bias, no groups.
"""

from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

ROUTER_DTYPES = (None, "fp32", "fp64")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


class Qwen3NullMoeConfig(Qwen3MoeConfig):
    model_type = "qwen3_null_moe"

    num_null_experts: int = 0
    shared_expert_intermediate_size: int = 0
    router_dtype: str | None = None
    router_topk_scaling_factor: float | None = None
    router_score_function: str = "softmax"
    router_expert_bias: bool = False
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    output_real_experts_per_token: bool = False

    def __post_init__(self, **kwargs):
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype {self.router_dtype!r}: allowed: "
                             f"{', '.join(map(repr, ROUTER_DTYPES))}.")
        if self.num_null_experts < 0 or self.shared_expert_intermediate_size < 0:
            raise ValueError(f"num_null_experts {self.num_null_experts} and "
                             f"shared_expert_intermediate_size "
                             f"{self.shared_expert_intermediate_size}: allowed: 0 or more.")
        if self.router_score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"router_score_function {self.router_score_function!r}: allowed: "
                             f"{', '.join(map(repr, SCORE_FUNCTIONS))}.")
        groups, chosen = self.router_num_groups, self.router_group_topk
        if (groups is None) != (chosen is None) or groups is not None and (
                groups < 1 or self.num_experts % groups or not 0 < chosen <= groups):
            raise ValueError(f"router_num_groups {groups!r} and router_group_topk {chosen!r}: "
                             f"allowed: both None, or num_groups dividing num_experts "
                             f"{self.num_experts} and 1 <= group_topk <= num_groups.")
        super().__post_init__(**kwargs)

    @property
    def real_fraction(self) -> float:
        """rho: the fraction of the K slots meant for real experts, N / (N + M)."""
        return self.num_experts / (self.num_experts + self.num_null_experts)


__all__ = ["Qwen3NullMoeConfig"]
