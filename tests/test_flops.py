"""FLOPs count the real experts actually used, through Megatron's own formula."""

import argparse

import pytest

from megatron.training.arguments import add_megatron_arguments
from megatron.training.training import num_floating_point_operations

from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.training_hooks import NullExpertMonitor, layer_scalars, null_expert_flops


def gpt_args(topk):
    args = add_megatron_arguments(argparse.ArgumentParser()).parse_args([
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
        "--seq-length", "128", "--num-experts", "16", "--moe-router-topk", str(topk),
        "--moe-ffn-hidden-size", "128", "--swiglu",
    ])
    # Fields Megatron's validate_args would fill in.
    args.ffn_hidden_size, args.kv_channels, args.padded_vocab_size = 1024, 32, 512
    args.num_query_groups = args.num_attention_heads
    return args


def test_k8_half_at_measured_four_equals_k4():
    flops = null_expert_flops(num_floating_point_operations, lambda args: 4.0)
    k8_half, k4 = flops(gpt_args(8), 16), num_floating_point_operations(gpt_args(4), 16)
    assert k8_half == pytest.approx(k4, rel=1e-12)
    assert k8_half < num_floating_point_operations(gpt_args(8), 16)  # upstream overstates


def test_measured_fraction_scales_only_the_routed_experts():
    upstream = num_floating_point_operations(gpt_args(8), 16)
    at = {m: null_expert_flops(num_floating_point_operations, lambda a, m=m: m)(gpt_args(8), 16)
          for m in (0.0, 4.0, 8.0)}
    assert at[8.0] == pytest.approx(upstream)
    assert at[4.0] - at[0.0] == pytest.approx((at[8.0] - at[0.0]) / 2)
    assert at[0.0] > 0  # attention, dense parts and logits remain


def test_no_measurement_keeps_megatron_count():
    flops = null_expert_flops(num_floating_point_operations, lambda args: None)
    assert flops(gpt_args(8), 16) == num_floating_point_operations(gpt_args(8), 16)


def test_layer_scalars_from_counters():
    from types import SimpleNamespace

    import torch

    monitor = NullExpertMonitor()
    args = SimpleNamespace(curr_iteration=3, moe_router_topk=2)
    monitor.expected_real_experts, monitor._iteration = 1.0, 3
    # K=2: tokens with 0, 1, 2 real experts, dropped, spread sum, bias sum, bias replicas;
    # layer 2 routed nothing
    monitor.counters = torch.tensor([[2, 0, 2, 0, 4.0, 1.0, 2], [0, 0, 0, 0, 0, 0, 0],
                                     [0, 4, 0, 1, 2.0, -0.5, 1]], dtype=torch.float64)
    scalars = layer_scalars(monitor, args)
    assert sorted(scalars) == [1, 3]
    assert scalars[1] == {"real_fraction": 0.5, "zero_real_fraction": 0.5}
    assert scalars[3] == {"real_fraction": 0.5, "zero_real_fraction": 0.0,
                          "dropped_fraction": 0.25}
    monitor.null_config = NullExpertConfig(0.5, budget_control_rate=0.3)
    scalars = layer_scalars(monitor, args)
    assert scalars[1]["budget_bias"] == 0.5 and scalars[3]["budget_bias"] == -0.5
    assert monitor.layer_statistics(args)[1].real_logit_spread == 1.0
    args.curr_iteration = 4  # a step whose counters were not collected shows nothing
    assert layer_scalars(monitor, args) == {}
