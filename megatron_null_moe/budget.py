"""Budget controller: hold each MoE layer's realised real fraction at its target rho.

The balance loss alone lets the real fraction settle where the loss balances, not at rho
(0.52-0.58 per layer for rho = 0.5 in the demo), so the expert FLOPs differ from what the
user asked for. The controller adds a
selection-only bias b to the null logit of each layer (it changes which slots are chosen;
weights and losses never see it), updated after each optimizer step from the global batch's
realised real fraction f of that layer by a proportional-integral rule:

    e_t = f_t - rho                            more real compute than the budget when positive
    u_t = rate * s_t * e_t                     s_t: the spread of the real logits (below)
    I_t = I_{t-1} + u_t                        integral term: removes any steady offset
    b_t = I_t + PROPORTIONAL * u_t             proportional term: answers a change at once

How much f moves per unit of b is inversely proportional to how far apart a token's real
logits lie, which grows by orders of magnitude during training (router logits start near
0). Steps are therefore taken in units of s_t, the mean over the global batch's tokens of
the standard deviation of a token's N real logits, so that one rate holds for a fresh and a
trained router. ``rate`` (``--moe-null-budget-rate``) is in logit spreads per unit of
real-fraction error and step.

The state (I, b) lives in the router's buffers ``null_bias_integral`` and
``null_selection_bias``, so it is saved in checkpoints and a resumed run continues exactly.
"""

from typing import Dict, Iterable, Tuple, Union

import torch

from megatron_null_moe.metrics import RoutingStatistics

# The proportional gain as a fraction of the integral gain. In this loop the bias acts on
# the next step at once, so a large proportional term only adds overshoot: it is kept small.
PROPORTIONAL = 0.25
DEFAULT_RATE = 1.0

Number = Union[float, torch.Tensor]


def proportional_integral_step(integral: Number, error: Number, spread: float, rate: float
                               ) -> Tuple[Number, Number]:
    """One PI step: (I_t, b_t) from I_{t-1}, e_t and s_t (see the module docstring)."""
    step = rate * spread * error
    integral = integral + step
    return integral, integral + PROPORTIONAL * step


@torch.no_grad()
def update_null_selection_bias(router, statistics: RoutingStatistics) -> None:
    """One controller step on a NullExpertRouter's buffers, on their device (no host sync).

    statistics: this layer's routing over the global batch of the step just taken.
    """
    error = statistics.real_fraction - router.target_real_fraction
    integral, bias = proportional_integral_step(
        router.null_bias_integral, error, statistics.real_logit_spread,
        router.null_config.budget_control_rate,
    )
    router.null_bias_integral.copy_(integral)
    router.null_selection_bias.copy_(bias)
    router.null_bias_in_use = True


def budget_controlled(router) -> bool:
    """Whether this router's null bias is under the controller."""
    return router.num_null_copies > 0 and router.null_config.budget_control_rate is not None


def update_null_budgets(routers: Iterable,
                        statistics_by_layer: Dict[int, RoutingStatistics]) -> None:
    """Step the controller of every controlled router whose layer routed tokens.

    statistics_by_layer: global layer number (router.global_layer_number) -> the layer's
    statistics over the global batch; layers missing from it keep their bias.
    """
    for router in routers:
        statistics = statistics_by_layer.get(router.global_layer_number)
        if budget_controlled(router) and statistics is not None and statistics.num_tokens:
            update_null_selection_bias(router, statistics)
