"""Grouped GEMMs over stacked expert weights with offsets that stay on the device.

Legend: M rows (tokens sorted by expert, possibly followed by unused rows), K input features,
N output features, G experts (groups). ``offsets_G`` are the int32 end rows of the groups;
rows past ``offsets_G[-1]`` are neither read nor written (their output is undefined).

Undefined means uninitialised: torch allocates grouped GEMM outputs with ``empty_strided``, so
unused rows may hold NaN or Inf bit patterns (also in gradients). They never reach outputs or
gradients (they go to dropped padding rows, and their routing-weight gradients to a dropped
zero past the end of the probs in ``permute.gather_probs``, never multiplied by zero), but
``torch.autograd.detect_anomaly`` checks every backward node's whole output and can flag
them. Zeroing them would cost a masked pass over every [M, N] buffer,
forward and backward, so they are left as they are.
"""

import torch
import torch.nn.functional as F

from megatron_null_moe.lean.fp8 import Fp8GroupedLinear


def grouped_linear(input_MK: torch.Tensor, weight_GNK: torch.Tensor,
                   offsets_G: torch.Tensor) -> torch.Tensor:
    """[M, N]: rows of group g times weight_GNK[g] transposed, one kernel for all groups.

    BF16 on the GPU; BF16 and FP32 on the CPU (torch >= 2.10). Differentiable: the weight
    gradient is one grouped GEMM over the same offsets.
    """
    return F.grouped_mm(input_MK, weight_GNK.transpose(-2, -1), offs=offsets_G)


def fp8_grouped_linear(input_MK: torch.Tensor, weight_GNK: torch.Tensor,
                       offsets_G: torch.Tensor) -> torch.Tensor:
    """``grouped_linear`` with E4M3 operands (see ``fp8.Fp8GroupedLinear``); output BF16."""
    return Fp8GroupedLinear.apply(input_MK, weight_GNK, offsets_G)
