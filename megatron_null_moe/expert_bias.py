"""Per-expert selection bias with null experts: aux-loss-free balancing of the real experts.

DeepSeek-V3's rule, as Megatron implements it for upstream routing: after each global batch,
every real expert's bias b_i moves by the update rate towards balance,

    b_i <- b_i + rate * sign(mean_j c_j - c_i),     c_i: real assignments of expert i,

and selection compares score + bias (pool_routing.selection_keys); the weights and the losses
never see it. With null experts the real experts also compete with the null copies, whose
level the budget controller (budget.py) sets. The two would pull against each other if the
per-expert biases could drift together: a common rise of every b_i makes real slots win over
null ones, which the controller then answers by raising the null bias, and so on. So after
each update the biases are re-centred to mean zero: they move load between real experts
only, and the null bias alone sets how much goes to real experts. With M = 0 there is
nothing to hold and no re-centring: the bias is upstream's, value for value.

The counts c_i are the layer's real assignments before any capacity drop, summed over the
global batch and all ranks in the all-reduce the training monitor does anyway
(training_hooks.collect_layer_counters): no collective or host sync of their own.
"""

from typing import Dict, Iterable

import torch


def expert_bias_step(bias_N: torch.Tensor, counts_N: torch.Tensor, rate: float,
                     recentre: bool) -> torch.Tensor:
    """The updated bias: one sign step towards balance, re-centred to mean zero if asked."""
    counts_N = counts_N.to(device=bias_N.device, dtype=torch.float32)
    updated = bias_N + rate * torch.sign(counts_N.mean() - counts_N)
    return updated - updated.mean() if recentre else updated


def has_expert_bias(router) -> bool:
    """Whether the router selects with a per-expert bias that the plugin updates."""
    return getattr(router, "expert_bias", None) is not None and \
        getattr(router, "expert_bias_rate", None) is not None


@torch.no_grad()
def update_expert_biases(routers: Iterable, assignments_by_layer: Dict[int, torch.Tensor]
                         ) -> None:
    """One step of every biased router in training mode whose layer routed tokens.

    assignments_by_layer: global layer number -> [N] real assignments per expert over the
    global batch (all ranks, before drops); layers missing from it keep their bias.
    """
    for router in routers:
        counts = assignments_by_layer.get(router.global_layer_number)
        if has_expert_bias(router) and router.training and counts is not None:
            router.expert_bias.copy_(expert_bias_step(
                router.expert_bias, counts, router.expert_bias_rate,
                recentre=router.num_null_copies > 0))
