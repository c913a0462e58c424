"""Transformer Engine grouped-GEMM experts under null routing (CUDA + Transformer Engine).

Forward and backward of the null-expert layer with TEGroupedMLP experts, BF16 and FP8 (with
the router padding for quantization), against the same experts applied one by one in fp32.
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

te = pytest.importorskip("transformer_engine.pytorch") if torch.cuda.is_available() else None

HIDDEN, FFN, EXPERTS, TOPK = 256, 512, 8, 4


@pytest.fixture(scope="module")
def cuda_parallel_state():
    from megatron_null_moe.process_groups import single_process_parallel_state

    with single_process_parallel_state("cuda", seed=123):
        yield


def _grouped_layer(**overrides):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_null_moe import NullExpertConfig, with_null_experts

    settings = dict(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_attention_heads=4, num_moe_experts=EXPERTS, moe_router_topk=TOPK,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True, add_bias_linear=False,
        bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32",
        moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss",
    )
    settings.update(overrides)
    config = TransformerConfig(**settings)
    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=EXPERTS, moe_grouped_gemm=True)
    torch.manual_seed(0)
    layer = with_null_experts(spec, NullExpertConfig(real_fraction=0.5)).submodules.mlp(
        config=config
    )
    layer.set_layer_number(1)
    return layer.cuda(), config


def _reference(layer, hidden_TH, probs_TN):
    """sum_i w_i fc2_i(act(fc1_i(x))) in fp32, expert by expert, on fp32 leaf copies of the
    expert weights (returned, for their gradients)."""
    params = dict(layer.experts.named_parameters())
    fc1_weights = [params[f"linear_fc1.weight{e}"].detach().float().requires_grad_(True)
                   for e in range(EXPERTS)]
    output = torch.zeros_like(hidden_TH, dtype=torch.float32)
    for expert, fc1 in enumerate(fc1_weights):
        fc2 = params[f"linear_fc2.weight{expert}"].detach().float()
        expert_out = F.gelu(hidden_TH @ fc1.t()) @ fc2.t()
        output = output + probs_TN[:, expert : expert + 1].float() * expert_out
    return output, fc1_weights


def _relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _check(layer, fp8_context, tolerance):
    hidden = torch.randn(64, 2, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.5
    hidden_ref = hidden.detach().float().reshape(-1, HIDDEN)
    hidden = hidden.requires_grad_(True)
    layer.train()
    with fp8_context:
        output, _ = layer(hidden)
    probs, routing_map = layer.router(hidden.detach())
    assert (routing_map.sum(-1) < TOPK).any(), "no token dropped a slot to a null"
    expected, reference_fc1 = _reference(layer, hidden_ref, probs.detach())
    assert _relative_error(output.reshape(-1, HIDDEN), expected) < tolerance
    target = torch.randn_like(expected)
    (output.reshape(-1, HIDDEN).float() * target).sum().backward()
    (expected * target).sum().backward()
    params = dict(layer.experts.named_parameters())
    for expert, reference in enumerate(reference_fc1):
        grad = params[f"linear_fc1.weight{expert}"].grad
        if reference.grad.abs().sum() == 0:  # an expert no token chose
            assert grad is None or grad.abs().sum() == 0
        else:
            assert _relative_error(grad, reference.grad) < tolerance, expert
    assert torch.isfinite(hidden.grad.float()).all()
    assert layer.router.null_weight.grad is not None


@pytest.mark.parametrize("permute_fusion", [False, True])
def test_te_grouped_gemm_bf16_matches_experts_one_by_one(cuda_parallel_state, permute_fusion):
    import contextlib

    layer, _ = _grouped_layer(moe_permute_fusion=permute_fusion)
    _check(layer, contextlib.nullcontext(), tolerance=2e-2)


def test_te_grouped_gemm_fp8_with_padding_matches(cuda_parallel_state):
    from megatron.core.fp8_utils import get_fp8_context

    layer, config = _grouped_layer(fp8="hybrid", fp8_recipe="tensorwise",
                                   moe_router_padding_for_quantization=True)
    _check(layer, get_fp8_context(config), tolerance=1e-1)
