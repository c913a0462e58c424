"""Zero-compute null experts for token-choice MoE routing in Megatron-Core.

Each token chooses how many of its K slots do real work, at a target average rate rho
(Kilian et al. 2026, "Improving MoE Compute Efficiency by Composing Weight and Data
Sparsity"). Imports are light: nothing is patched or initialised at import time.
"""

from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.layer import NullExpertMoELayer
from megatron_null_moe.metrics import RoutingStatistics, pop_layer_statistics, set_token_types
from megatron_null_moe.router import NullExpertRouter
from megatron_null_moe.spec import with_null_experts

__all__ = [
    "NullExpertConfig",
    "NullExpertMoELayer",
    "NullExpertRouter",
    "RoutingStatistics",
    "pop_layer_statistics",
    "set_token_types",
    "with_null_experts",
]
__version__ = "0.1.0"
