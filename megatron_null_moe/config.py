"""Null-expert configuration: the target real fraction rho and the number of null copies M.

One object, validated once at build time against Megatron's ``TransformerConfig``. Every
refusal is a ``ValueError`` naming the setting, its launch flag, the value and what is allowed.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Tuple

from megatron.core.transformer.transformer_config import TransformerConfig

RHO_FLAG = "--moe-null-expert-rho"
NUM_NULL_FLAG = "--moe-num-null-experts"
BUDGET_RATE_FLAG = "--moe-null-budget-rate"
LEAN_BUFFER_FLAG = "--moe-null-lean-buffer"
EXPERT_BIAS_FLAG = "--moe-router-enable-expert-bias"
EXPERT_BIAS_RATE_FLAG = "--moe-router-bias-update-rate"
# How many rows the lean path's buffers hold (lean/dispatcher.py): "auto" picks "real-rows"
# where the real count is on the host anyway (CPU tensors; expert parallelism, whose
# all-to-all reads it) and "worst-case" (T*K rows, no host read) on a GPU at EP = 1.
LEAN_BUFFERS = ("auto", "real-rows", "worst-case")
# Router score functions the pool routing defines (pool_routing.selection_keys).
SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class NullExpertConfig:
    """What the user states about null experts.

    real_fraction: rho in the paper, the target fraction of the K slots that go to real
        experts, in (0, 1]. rho = 1 means no null experts.
    num_null_copies: M in the paper, the number of null copies in the routing pool. When
        None it is derived as M = N (1 - rho) / rho, which must be a whole number; when given
        with rho < 1 it must be that number rounded down or up (the target becomes N/(N+M)).
    budget_control_rate: the budget controller's rate (budget.py), or None for the paper's
        routing, where only the balance loss pulls the real fraction towards its target.
    lean_buffer: on the lean expert path, how many rows its buffers hold (LEAN_BUFFERS):
        "real-rows" reads the real count on the host (one sync per layer on a GPU),
        "worst-case" carries T*K rows and never waits for the host at EP = 1, "auto" picks
        real-rows on the CPU and with expert parallelism, worst-case on a GPU at EP = 1.
    expert_bias_rate: the per-expert selection bias's update rate (expert_bias.py), or None
        for none (Megatron's own moe_router_enable_expert_bias in the TransformerConfig
        turns it on too, at Megatron's rate).
    """

    real_fraction: float = 1.0
    num_null_copies: Optional[int] = None
    budget_control_rate: Optional[float] = None
    lean_buffer: str = "auto"
    expert_bias_rate: Optional[float] = None

    def __post_init__(self):
        rho = self.real_fraction
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
            raise ValueError(
                f"real_fraction ({RHO_FLAG}) must be a number in (0, 1]; got {rho!r}. "
                "It is the target fraction of the top-K slots routed to real experts."
            )
        m = self.num_null_copies
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(
                f"num_null_copies ({NUM_NULL_FLAG}) must be a whole number >= 0 or unset; "
                f"got {m!r}."
            )
        for name, flag in (("budget_control_rate", BUDGET_RATE_FLAG),
                           ("expert_bias_rate", EXPERT_BIAS_RATE_FLAG)):
            rate = getattr(self, name)
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                     or not 0.0 < rate < math.inf):
                raise ValueError(
                    f"{name} ({flag}) must be a positive finite number or unset; got {rate!r}."
                )
        if self.lean_buffer not in LEAN_BUFFERS:
            raise ValueError(
                f"lean_buffer ({LEAN_BUFFER_FLAG}) must be one of {', '.join(LEAN_BUFFERS)}; "
                f"got {self.lean_buffer!r}."
            )

    def null_copies_for(self, num_experts: int) -> int:
        """M for N = num_experts real experts: N (1 - rho) / rho exactly, or the explicit M
        when it is that number rounded (refused when it contradicts rho)."""
        # Fraction of the decimal rho the user typed (0.3 -> 3/10), not of its binary float.
        rho = Fraction(str(self.real_fraction))
        copies = num_experts * (1 - rho) / rho
        if self.num_null_copies is not None:
            allowed = sorted({math.floor(copies), math.ceil(copies)})
            if self.num_null_copies not in allowed:
                raise ValueError(
                    f"{NUM_NULL_FLAG}={self.num_null_copies} contradicts {RHO_FLAG}="
                    f"{self.real_fraction} with {num_experts} experts: M = N(1-rho)/rho = "
                    f"{float(copies):.4g}; allowed: {' or '.join(map(str, allowed))} (the "
                    f"target real fraction becomes N/(N+M)), or leave {NUM_NULL_FLAG} unset."
                )
            return self.num_null_copies
        if copies.denominator != 1:
            lower, upper = int(copies), int(copies) + 1
            raise ValueError(
                f"{RHO_FLAG}={self.real_fraction} with {num_experts} experts gives "
                f"M = N(1-rho)/rho = {float(copies):.4g} null copies, not a whole number. "
                f"Choose rho = N/(N+M) for a whole M (e.g. M={lower}: rho="
                f"{num_experts / (num_experts + lower):.4g}, M={upper}: rho="
                f"{num_experts / (num_experts + upper):.4g}) or set {NUM_NULL_FLAG} explicitly."
            )
        return int(copies)

    def pool_real_fraction(self, num_experts: int) -> float:
        """N / (N + M): the target real fraction, that the balance loss drives the router
        towards and the budget controller holds (rho itself unless M was rounded)."""
        return num_experts / (num_experts + self.null_copies_for(num_experts))

    def real_experts_range(self, num_experts: int, topk: int) -> Tuple[int, int]:
        """(fewest, most) real experts a token can use: max(0, K - M) and min(K, N)."""
        copies = self.null_copies_for(num_experts)
        return max(0, topk - copies), min(topk, num_experts)


def _refuse(setting: str, flag: str, value, allowed: str, why: str) -> None:
    raise ValueError(
        f"Null experts do not support {setting}={value!r} ({flag}); allowed: {allowed}. {why}"
    )


def validate_for_transformer_config(null_config: NullExpertConfig, config: TransformerConfig):
    """Refuse every Megatron MoE option whose meaning the expanded pool would silently change."""
    num_experts = config.num_moe_experts
    if not num_experts:
        raise ValueError(
            f"Null experts need an MoE model: set num_moe_experts (--num-experts); got {num_experts}."
        )
    copies = null_config.null_copies_for(num_experts)
    topk = config.moe_router_topk
    if topk > num_experts + copies:
        raise ValueError(
            f"moe_router_topk (--moe-router-topk)={topk} exceeds the routing pool of "
            f"N+M = {num_experts}+{copies} = {num_experts + copies} slots; allowed: 1..{num_experts + copies}."
        )
    if config.moe_router_score_function not in SCORE_FUNCTIONS:
        _refuse("moe_router_score_function", "--moe-router-score-function",
                config.moe_router_score_function, ", ".join(map(repr, SCORE_FUNCTIONS)),
                "Null slots compete with real experts on these scores over the N+M pool.")
    if config.moe_router_pre_softmax:
        _refuse("moe_router_pre_softmax", "--moe-router-pre-softmax", True, "False",
                "Weights are renormalised over the selected real experts (paper step 4).")
    _validate_groups(config, num_experts, topk)
    if config.moe_router_fusion:
        _refuse("moe_router_fusion", "--moe-router-fusion", True, "False",
                "Transformer Engine's fused router kernels know only the N real experts.")
    if config.moe_enable_routing_replay:
        _refuse("moe_enable_routing_replay", "--moe-enable-routing-replay", True, "False",
                "Replay records top-K over real experts only.")
    if config.moe_router_force_biased is not None:
        _refuse("moe_router_force_biased", "--moe-router-force-biased",
                config.moe_router_force_biased, "None", "It biases real experts only.")
    _validate_balancing_types(config)
    if config.moe_pad_expert_input_to_capacity:
        _refuse("moe_pad_expert_input_to_capacity", "--moe-pad-expert-input-to-capacity", True,
                "False", "Padding to capacity would spend compute on the slots nulls saved.")
    if config.moe_token_dispatcher_type not in ("alltoall", "flex", "allgather"):
        _refuse("moe_token_dispatcher_type", "--moe-token-dispatcher-type",
                config.moe_token_dispatcher_type, "'alltoall', 'flex', 'allgather'", "")
    return copies


# TransformerConfig fields validate_for_transformer_config reads: a router compares them at
# each forward and validates again when one changed after it was built.
VALIDATED_SETTINGS = (
    "num_moe_experts", "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
    "moe_router_fusion", "moe_enable_routing_replay", "moe_router_force_biased",
    "moe_router_load_balancing_type", "moe_pad_expert_input_to_capacity",
    "moe_token_dispatcher_type",
)


def validated_settings(config: TransformerConfig) -> tuple:
    """The values of VALIDATED_SETTINGS, lists as tuples (a copy, safe from in-place edits)."""
    values = (getattr(config, name) for name in VALIDATED_SETTINGS)
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


def _validate_groups(config: TransformerConfig, num_experts: int, topk: int) -> None:
    """Node-limited routing: groups of real experts (null copies belong to none)."""
    groups, chosen = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is None and chosen is None:
        return
    flags = "--moe-router-num-groups/--moe-router-group-topk"
    if not groups or not chosen:
        _refuse("moe_router_num_groups/moe_router_group_topk", flags, (groups, chosen),
                "both set or both unset", "A token's real experts come from its group_topk "
                "best of num_groups groups.")
    if num_experts % groups or not 0 < chosen <= groups:
        _refuse("moe_router_num_groups/moe_router_group_topk", flags, (groups, chosen),
                f"num_groups dividing --num-experts={num_experts}, 1 <= group_topk <= "
                "num_groups", "Groups are equal blocks of consecutive real experts.")
    if topk % chosen or topk // chosen > num_experts // groups:
        _refuse("moe_router_group_topk", "--moe-router-group-topk", chosen,
                f"a divisor of --moe-router-topk={topk} with topk/group_topk <= "
                f"{num_experts // groups} experts per group",
                "Each group is scored by the sum of its topk/group_topk best real experts.")


_SUPPORTED_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def _validate_balancing_types(config: TransformerConfig) -> None:
    types = config.moe_router_load_balancing_type
    for balancing_type in types if isinstance(types, list) else [types]:
        if balancing_type not in _SUPPORTED_BALANCING:
            _refuse("moe_router_load_balancing_type", "--moe-router-load-balancing-type",
                    balancing_type, ", ".join(repr(t) for t in _SUPPORTED_BALANCING),
                    "The null target is held by the balance loss over the N+M pool.")
