"""Per-layer routing statistics: how much real compute the null experts left each token.

Everything derives from one histogram per layer, the number of tokens whose routing chose r
real experts for r = 0..K, and the number of chosen real assignments dropped over capacity
(``--moe-expert-capacity-factor``), accumulated on the device by the router and read at
logging time. Beside it, the real assignments per expert give the load balance over the
experts and over the expert-parallel ranks that hold them.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import torch


@dataclass(frozen=True)
class RoutingStatistics:
    """Routing statistics of one MoE layer over some tokens.

    real_experts_histogram: tokens whose routing chose exactly r real experts, r = 0..K.
    target_real_fraction: rho in the paper, the fraction of slots the budget aims at.
    dropped_real_slots: chosen real assignments dropped over capacity (not computed).
    real_logit_spread_sum: sum over the tokens of the standard deviation of each token's N
        real logits (the scale the budget controller's steps are taken in).
    """

    real_experts_histogram: Tuple[int, ...]
    target_real_fraction: float
    dropped_real_slots: int = 0
    real_logit_spread_sum: float = 0.0

    @classmethod
    def from_histogram(cls, histogram: torch.Tensor, target_real_fraction: float,
                       dropped_real_slots: int = 0, real_logit_spread_sum: float = 0.0):
        return cls(tuple(int(count) for count in histogram.tolist()), float(target_real_fraction),
                   int(dropped_real_slots), float(real_logit_spread_sum))

    @property
    def topk(self) -> int:
        return len(self.real_experts_histogram) - 1

    @property
    def num_tokens(self) -> int:
        return sum(self.real_experts_histogram)

    @property
    def real_slots(self) -> int:
        return sum(r * count for r, count in enumerate(self.real_experts_histogram))

    @property
    def real_fraction(self) -> float:
        """Compute intensity: the fraction of the K slots the routing gave to real experts."""
        return self.real_slots / max(self.num_tokens * self.topk, 1)

    @property
    def mean_real_experts(self) -> float:
        """Real experts per token chosen by the routing: rho * K measured (0: no token)."""
        return self.real_slots / max(self.num_tokens, 1)

    @property
    def computed_real_slots(self) -> int:
        """Real assignments the experts computed: chosen minus dropped over capacity."""
        return self.real_slots - self.dropped_real_slots

    @property
    def mean_computed_experts(self) -> float:
        """Expert computations per token, what FLOPs count (equals mean_real_experts unless
        a capacity factor dropped some)."""
        return self.computed_real_slots / max(self.num_tokens, 1)

    @property
    def real_logit_spread(self) -> float:
        """Mean over tokens of the standard deviation of a token's real logits."""
        return self.real_logit_spread_sum / max(self.num_tokens, 1)

    @property
    def dropped_fraction(self) -> float:
        """Fraction of the chosen real assignments dropped over capacity."""
        return self.dropped_real_slots / max(self.real_slots, 1)

    @property
    def null_fraction(self) -> float:
        return 1.0 - self.real_fraction if self.num_tokens else 0.0

    @property
    def target_null_fraction(self) -> float:
        return 1.0 - self.target_real_fraction

    @property
    def zero_real_fraction(self) -> float:
        """Fraction of tokens whose MoE output is 0 (all K slots null)."""
        return self.real_experts_histogram[0] / max(self.num_tokens, 1)

    @property
    def real_experts_distribution(self) -> Tuple[float, ...]:
        """Fraction of tokens using r real experts, r = 0..K (polarisation shows as mass at
        0 and K)."""
        total = max(self.num_tokens, 1)
        return tuple(count / total for count in self.real_experts_histogram)

    def as_scalars(self) -> Dict[str, float]:
        """Flat name -> value, for a log line or TensorBoard."""
        scalars = {
            "real_fraction": self.real_fraction,
            "null_fraction": self.null_fraction,
            "target_null_fraction": self.target_null_fraction,
            "zero_real_fraction": self.zero_real_fraction,
            "mean_real_experts": self.mean_real_experts,
            "dropped_fraction": self.dropped_fraction,
        }
        for r, share in enumerate(self.real_experts_distribution):
            scalars[f"tokens_with_{r}_real"] = share
        return scalars

    def merged(self, other: "RoutingStatistics") -> "RoutingStatistics":
        if other.topk != self.topk:
            raise ValueError(f"cannot merge statistics of top-{self.topk} and top-{other.topk}")
        summed = tuple(a + b for a, b in zip(self.real_experts_histogram,
                                             other.real_experts_histogram))
        return RoutingStatistics(summed, self.target_real_fraction,
                                 self.dropped_real_slots + other.dropped_real_slots,
                                 self.real_logit_spread_sum + other.real_logit_spread_sum)


def load_max_over_mean(loads: torch.Tensor) -> float:
    """The busiest holder's load over the mean load: max_i L_i / (sum_i L_i / n) for the n
    loads L [n] (1: even; n: one holder takes all). Refused for a total of 0."""
    total = float(loads.sum())
    if total <= 0:
        raise ValueError("load_max_over_mean: no load to compare")
    return float(loads.max()) * loads.numel() / total


def expert_parallel_rank_loads(assignments_per_expert: torch.Tensor,
                               expert_parallel_size: int) -> torch.Tensor:
    """[EP]: the real assignments each expert-parallel rank computes, from those per expert
    [N]. Megatron's layout: rank r holds the experts [r*N/EP, (r+1)*N/EP), so
    L_r = sum_{e = r*N/EP}^{(r+1)*N/EP - 1} c_e."""
    num_experts = assignments_per_expert.numel()
    if expert_parallel_size < 1 or num_experts % expert_parallel_size:
        raise ValueError(f"expert_parallel_rank_loads: {num_experts} experts do not divide "
                         f"among {expert_parallel_size} expert-parallel ranks")
    return assignments_per_expert.reshape(expert_parallel_size, -1).sum(dim=1)


def expert_load_figures(assignments_per_expert: torch.Tensor,
                        expert_parallel_size: int = 1) -> Dict[str, float]:
    """The load balance of one MoE layer from its real assignments per expert c [N]:

    - ``expert_load_max_over_mean``: max_e c_e / (sum_e c_e / N), the busiest expert over the
      mean per expert;
    - with expert_parallel_size > 1, ``ep_rank_load_max_over_mean``: max_r L_r /
      (sum_r L_r / EP) over the ranks' loads L (expert_parallel_rank_loads).

    Each is >= 1, and the rank figure is at most the expert figure. Empty for no assignments.
    """
    if float(assignments_per_expert.sum()) <= 0:
        return {}
    figures = {"expert_load_max_over_mean": load_max_over_mean(assignments_per_expert)}
    if expert_parallel_size > 1:
        figures["ep_rank_load_max_over_mean"] = load_max_over_mean(
            expert_parallel_rank_loads(assignments_per_expert, expert_parallel_size))
    return figures


def null_expert_routers(model: torch.nn.Module):
    """(layer number, router) for every null-expert router in ``model``.

    Found by what they offer (pop_routing_statistics), so this module needs no router import.
    """
    for name, module in model.named_modules():
        if callable(getattr(module, "pop_routing_statistics", None)):
            yield (module.layer_number if module.layer_number is not None else name), module


def pop_layer_statistics(model: torch.nn.Module, by_type: bool = False) -> Dict:
    """Statistics of every null-expert router in ``model`` by layer number, then reset
    (with by_type: a list per layer, one RoutingStatistics per token type)."""
    return {layer: router.pop_routing_statistics(by_type=by_type)
            for layer, router in null_expert_routers(model)}


def set_token_types(model: torch.nn.Module, token_types_BS, num_types: int) -> None:
    """Count every router's statistics per token type (modality) for the next forward.

    token_types_BS: int [batch, sequence] like the model's input ids, or None to stop. The
    routers see tokens sequence-major and unsharded: refused with sequence or context
    parallelism, where each rank routes a slice.
    """
    for _, router in null_expert_routers(model):
        if router.config.sequence_parallel or router.config.context_parallel_size > 1:
            raise ValueError("set_token_types: per-type statistics need the full sequence on "
                             "each rank; turn off --sequence-parallel and context parallelism.")
        flat = None if token_types_BS is None else token_types_BS.t().reshape(-1)
        router.set_token_types(flat, num_types)
