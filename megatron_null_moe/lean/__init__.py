"""The lean expert path (``--moe-null-expert-path lean``): real assignments only, and no host
wait where a GPU needs none (EP = 1, the worst-case buffer).

- ``permute``: pure functions, the device-side sort of the [T, K] slots and the
  gathers/scatters in and out of a buffer of the real rows or of the worst case.
- ``grouped_gemm``, ``fp8``: grouped GEMMs over stacked expert weights with device offsets
  (BF16/FP32 ``torch.nn.functional.grouped_mm``; E4M3 ``torch._scaled_grouped_mm``).
- ``experts``: LeanGroupedExperts, checkpoint-compatible with Megatron's experts.
- ``dispatcher``: LeanTokenDispatcher; ``layer``: LeanNullExpertMoELayer.
- ``support``: the options it refuses, at build time.
"""

from megatron_null_moe.lean.dispatcher import LeanTokenDispatcher
from megatron_null_moe.lean.experts import LeanGroupedExperts
from megatron_null_moe.lean.layer import LeanNullExpertMoELayer

__all__ = ["LeanGroupedExperts", "LeanNullExpertMoELayer", "LeanTokenDispatcher"]
