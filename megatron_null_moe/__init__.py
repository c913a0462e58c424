"""Zero-compute null experts for token-choice MoE routing in Megatron-Core.

Each token chooses how many of its K slots do real work, at a target average rate rho
(Kilian et al. 2026, "Improving MoE Compute Efficiency by Composing Weight and Data
Sparsity"). Imports are light: nothing is patched or initialised at import time, and the
names below are imported on first use, so that the package's commands can silence
Megatron's import-time notices before Megatron is imported (cli.py).
"""

import importlib

_EXPORTS = {
    "NullExpertConfig": "megatron_null_moe.config",
    "NullExpertMoELayer": "megatron_null_moe.layer",
    "NullExpertRouter": "megatron_null_moe.router",
    "RoutingStatistics": "megatron_null_moe.metrics",
    "pop_layer_statistics": "megatron_null_moe.metrics",
    "set_token_types": "megatron_null_moe.metrics",
    "with_null_experts": "megatron_null_moe.spec",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
