"""Budget controller: hold each MoE layer's realised real fraction at its target rho.

The balance loss alone lets the real fraction settle above rho (0.565 for rho = 0.5 in the
demo), so the expert FLOPs exceed what the user asked for. The controller adds a
selection-only bias b to the null logit of each layer (it changes which slots are chosen;
weights and losses never see it), updated after each optimizer step from the global batch's
realised real fraction f of that layer by a proportional-integral rule:

    e_t = f_t - rho                        more real compute than the budget when positive
    I_t = I_{t-1} + rate * e_t             integral term: removes any steady offset
    b_t = I_t + rate * PROPORTIONAL * e_t  proportional term: answers a change at once

rate is in logits per unit of real-fraction error and step (``--moe-null-budget-rate``). The
state (I, b) lives in the router's buffers ``null_bias_integral`` and
``null_selection_bias``, so it is saved in checkpoints and a resumed run continues exactly.
"""

from typing import Dict, Iterable, Tuple, Union

import torch

# b reacts to the last error with this fraction of the rate, on top of the integral.
PROPORTIONAL = 1.0
DEFAULT_RATE = 1.0

Number = Union[float, torch.Tensor]


def proportional_integral_step(integral: Number, error: Number, rate: float
                               ) -> Tuple[Number, Number]:
    """One PI step: (I_t, b_t) from I_{t-1} and e_t (see the module docstring)."""
    integral = integral + rate * error
    return integral, integral + rate * PROPORTIONAL * error


@torch.no_grad()
def update_null_selection_bias(router, realised_real_fraction: float) -> None:
    """One controller step on a NullExpertRouter's buffers, on their device (no host sync).

    realised_real_fraction: f_t, this layer's real slots / (K tokens) over the global batch.
    """
    error = realised_real_fraction - router.target_real_fraction
    integral, bias = proportional_integral_step(
        router.null_bias_integral, error, router.null_config.budget_control_rate
    )
    router.null_bias_integral.copy_(integral)
    router.null_selection_bias.copy_(bias)


def budget_controlled(router) -> bool:
    """Whether this router's null bias is under the controller."""
    return router.num_null_copies > 0 and router.null_config.budget_control_rate is not None


def update_null_budgets(routers: Iterable, real_fraction_by_layer: Dict[int, float]) -> None:
    """Step the controller of every controlled router whose layer routed tokens.

    real_fraction_by_layer: global layer number (router.global_layer_number) -> f_t; layers
    missing from it (no tokens this step) keep their bias.
    """
    for router in routers:
        layer = router.global_layer_number
        if budget_controlled(router) and layer in real_fraction_by_layer:
            update_null_selection_bias(router, real_fraction_by_layer[layer])
