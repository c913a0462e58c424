"""FP8 grouped linear: E4M3 forward and input-gradient GEMMs through torch._scaled_grouped_mm.

Scaling is dynamic and fine-grained, so nothing waits for the host: one scale per row of the
activations (or of the output gradient) and one per output column of each expert's weight,
the amax of that row or column mapped to E4M3's largest value, rounded down to a power of 2
(exact rescaling). The weight gradient stays a BF16 grouped GEMM: its contraction runs over
each expert's jagged token rows, which rowwise scales of a 2D-2D scaled grouped GEMM cannot
follow without per-group rescaling. Needs CUDA with FP8 grouped GEMM support (sm90: H100/H200).

Legend: M rows, K input features, N output features, G experts.
"""

import torch
import torch.nn.functional as F

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
# An all-zero row (a spill row reads zeros) must not give 0 * inf = NaN.
_AMAX_FLOOR = 1e-12


def quantize_e4m3(values: torch.Tensor, dim: int):
    """(E4M3 data, float32 dequantisation scale): one scale per slice along ``dim``.

    values: any shape; the scale tensor has ``dim`` reduced away (amax over ``dim``).
    data * scale.unsqueeze(dim) approximates values.
    """
    amax = values.detach().abs().amax(dim=dim, keepdim=True).float().clamp(min=_AMAX_FLOOR)
    quantise = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    data = (values.float() * quantise).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data, quantise.reciprocal().squeeze(dim)


def _scaled_grouped_mm(rows_MK, columns_GKN_scales, offsets_G):
    columns_GKN, column_scales_GN = columns_GKN_scales
    data_MK, row_scales_M = quantize_e4m3(rows_MK, dim=-1)
    return torch._scaled_grouped_mm(data_MK, columns_GKN, row_scales_M, column_scales_GN,
                                    offs=offsets_G, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)


def _column_major_e4m3(weight_GNK: torch.Tensor):
    """weight as the right operand [G, K, N] in column-major E4M3, scales [G, N]."""
    data_GNK, scales_GN = quantize_e4m3(weight_GNK, dim=-1)
    return data_GNK.transpose(-2, -1), scales_GN


class Fp8GroupedLinear(torch.autograd.Function):
    """out[M, N] = input rows of group g @ weight[g].T with E4M3 operands, BF16 output.

    input_MK: BF16 [M, K], row-major; weight_GNK: BF16 [G, N, K]; offsets_G: int32 [G].
    Backward: d_input by an E4M3 scaled grouped GEMM with the weight transposed, d_weight by
    a BF16 grouped GEMM over the same offsets. K and N must be multiples of 16.
    """

    @staticmethod
    def forward(ctx, input_MK, weight_GNK, offsets_G):
        if not input_MK.is_cuda:
            raise RuntimeError(
                "FP8 lean experts need CUDA: torch._scaled_grouped_mm has no CPU kernel. Train "
                "without --fp8-format on the CPU, or use --moe-null-expert-path megatron.")
        ctx.save_for_backward(input_MK, weight_GNK, offsets_G)
        return _scaled_grouped_mm(input_MK, _column_major_e4m3(weight_GNK), offsets_G)

    @staticmethod
    def backward(ctx, grad_MN):
        input_MK, weight_GNK, offsets_G = ctx.saved_tensors
        grad_MN = grad_MN.contiguous()
        grad_input = None
        if ctx.needs_input_grad[0]:
            # d_input = grad @ weight[g]: the right operand is weight_GNK itself [G, N, K],
            # column-major, one scale per input feature K of each expert.
            transposed_GKN = weight_GNK.transpose(-2, -1).contiguous()
            grad_input = _scaled_grouped_mm(grad_MN, _column_major_e4m3(transposed_GKN),
                                            offsets_G)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # 2D x 2D over the jagged rows: [N, M] x [M, K] -> [G, N, K].
            grad_weight = F.grouped_mm(grad_MN.t(), input_MK.to(grad_MN.dtype),
                                       offs=offsets_G).to(weight_GNK.dtype)
        return grad_input, grad_weight, None
