"""The budget controller: a selection-only null bias per layer that holds the real fraction."""

import pytest
import torch

from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from builders import build_moe_layer, moe_config, moe_config_for
from megatron_null_moe import pop_layer_statistics
from megatron_null_moe.budget import (
    PROPORTIONAL,
    proportional_integral_step,
    update_null_budgets,
)
from megatron_null_moe.cpu_ranks import run_on_ranks
from reference import reference_route


def test_proportional_integral_step():
    integral, bias = proportional_integral_step(0.5, error=0.1, spread=2.0, rate=0.5)
    assert integral == pytest.approx(0.5 + 0.5 * 2.0 * 0.1)
    assert bias == pytest.approx(integral + PROPORTIONAL * 0.5 * 2.0 * 0.1)
    assert proportional_integral_step(0.5, error=0.0, spread=2.0, rate=0.5) == (0.5, 0.5)


def _controlled_router(rate=1.0, weight_scale=1.0, rho=0.5, seed=0):
    config = moe_config(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
                        moe_router_load_balancing_type="none")
    router = build_moe_layer(config, real_fraction=rho, seed=seed,
                             budget_control_rate=rate).router
    with torch.no_grad():
        router.weight.mul_(weight_scale)
        router.null_weight.zero_()  # null logit 0, the real ones around it: ~0.9 real
    return router.train()


def _hold(router, steps, generator=None, tokens=256):
    """Route fresh tokens each step, then one controller step; real fraction per step."""
    generator = generator or torch.Generator().manual_seed(1)
    fractions = []
    for _ in range(steps):
        router(torch.randn(tokens, 1, 16, generator=generator))
        statistics = pop_layer_statistics(router)
        update_null_budgets([router], statistics)
        fractions.append(statistics[1].real_fraction)
    return fractions


@pytest.mark.parametrize("weight_scale", [0.01, 1.0, 100.0])
def test_controller_holds_the_target_whatever_the_logit_scale(parallel_state, weight_scale):
    """A frozen router whose null logit starts far from the target (real fraction ~0.9):
    steps in units of the logit spread hold rho for tiny and for huge logits alike."""
    router = _controlled_router(weight_scale=weight_scale)
    fractions = _hold(router, 40)
    assert fractions[0] > 0.75
    late = fractions[15:]
    assert abs(sum(late) / len(late) - 0.5) < 0.01, fractions
    assert max(abs(f - 0.5) for f in late) < 0.08


def test_selection_bias_changes_the_choice_never_the_weights_or_losses(parallel_state):
    config = moe_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.05)
    router = build_moe_layer(config, real_fraction=0.5, seed=3).router.train()
    hidden = torch.randn(64, 1, 16, generator=torch.Generator().manual_seed(4))
    losses = []
    for bias in (0.0, 0.8):
        router.null_selection_bias.fill_(bias)
        router.null_bias_in_use = bias != 0
        get_moe_metrics_tracker().clear()
        probs, routing_map = router(hidden)
        metrics = get_moe_metrics_tracker().metrics
        losses.append({name: entry.values[0].item() for name, entry in metrics.items()})
        logits = router.gating(hidden).reshape(-1, 9).detach()
        ref_probs, ref_map, _ = reference_route(logits[:, :8], logits[:, 8] + bias, 8, 4)
        assert torch.equal(routing_map, ref_map)
        torch.testing.assert_close(probs.detach().double(), ref_probs, rtol=1e-5, atol=1e-6)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # balance and z-loss unchanged


def test_controller_off_keeps_the_papers_routing(parallel_state):
    router = build_moe_layer(moe_config(), real_fraction=0.5, seed=5).router.train()
    hidden = torch.randn(64, 1, 16, generator=torch.Generator().manual_seed(6))
    router(hidden)
    update_null_budgets([router], pop_layer_statistics(router))
    assert float(router.null_selection_bias) == 0.0 and not router.null_bias_in_use
    _, routing_map = router(hidden)
    logits = router.gating(hidden).reshape(-1, 9).detach()
    assert torch.equal(routing_map, reference_route(logits[:, :8], logits[:, 8], 8, 4)[1])


def test_controller_state_is_checkpointed_and_resumes_exactly(parallel_state):
    straight = _controlled_router(rate=1.0)
    expected = _hold(straight, 10, torch.Generator().manual_seed(7))
    first = _controlled_router(rate=1.0)
    generator = torch.Generator().manual_seed(7)
    head = _hold(first, 5, generator)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    assert {"null_selection_bias", "null_bias_integral"} <= set(saved)
    resumed = _controlled_router(rate=1.0, seed=11)  # different weights until loaded
    resumed.load_state_dict(saved)
    assert resumed.null_bias_in_use
    tail = _hold(resumed, 5, generator)  # the same tokens as the uninterrupted run
    assert head + tail == expected
    assert torch.equal(resumed.null_selection_bias, straight.null_selection_bias)


def test_budget_state_stays_fp32_in_a_bf16_model(parallel_state):
    router = _controlled_router()
    _hold(router, 3)
    bias = router.null_selection_bias.clone()
    router.bfloat16()
    assert router.null_selection_bias.dtype == torch.float32
    assert router.null_bias_integral.dtype == torch.float32
    assert torch.equal(router.null_selection_bias, bias)
    assert router.real_logit_spread_sum.dtype == torch.float32


def _controller_step_on_ranks(rank, world_size, parallel_sizes, overrides, weights, inputs):
    """One step of micro-batches per rank (its tokens), the counters summed over every rank,
    one controller step; returns the bias and the global real fraction."""
    from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state
    from megatron_null_moe.training_hooks import collect_layer_counters, statistics_from_counters

    init_cpu_parallel_state(**parallel_sizes)
    try:
        config = moe_config_for(parallel_sizes, **overrides)
        layer = build_moe_layer(config, real_fraction=0.5, budget_control_rate=1.0)
        layer.router.load_state_dict(weights)
        layer.train()
        for hidden in inputs[rank]:
            layer(hidden)[0].sum().backward()
        counters = collect_layer_counters([layer.router], num_layers=1, topk=4)
        statistics = {1: statistics_from_counters(counters[0], 0.5)}
        update_null_budgets([layer.router], statistics)
        return {"bias": layer.router.null_selection_bias.clone(),
                "real_fraction": statistics[1].real_fraction,
                "tokens": statistics[1].num_tokens}
    finally:
        destroy_cpu_parallel_state()


@pytest.mark.world_size(2)
@pytest.mark.parametrize("parallel_sizes,overrides", [
    ({"expert_model_parallel_size": 2}, {}),
    ({"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1},
     {"sequence_parallel": True}),
], ids=["EP2", "TP2-SP"])
def test_parallel_controller_step_equals_one_process(parallel_state, parallel_sizes, overrides):
    """Two ranks (EP=2: two data-parallel ranks; TP=2 with sequence parallelism: two halves
    of each sequence), two micro-batches each: the counters summed over the ranks give every
    replica the bias one process computes from all the tokens."""
    router = build_moe_layer(moe_config(), real_fraction=0.5, seed=9).router
    weights = {k: v.clone() for k, v in router.state_dict().items()}
    generator = torch.Generator().manual_seed(10)
    inputs = [[torch.randn(6, 2, 16, generator=generator) for _ in range(2)] for _ in range(2)]
    ranks = run_on_ranks(_controller_step_on_ranks, 2, parallel_sizes, overrides, weights,
                         inputs)
    single = run_on_ranks(_controller_step_on_ranks, 1, {}, {}, weights,
                          [[hidden for rank in inputs for hidden in rank]])
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single[0]["tokens"] == 48
    assert ranks[0]["real_fraction"] == ranks[1]["real_fraction"] == single[0]["real_fraction"]
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])  # replicas: the same all-reduced sums
    # One process vs two: the logit spreads come from router GEMMs over other token counts
    # (TP2-SP: half sequences) and are summed in another order, in fp32: equal to a few ulps.
    torch.testing.assert_close(ranks[0]["bias"], single[0]["bias"], rtol=1e-5, atol=1e-7)
    assert float(single[0]["bias"]) != 0
