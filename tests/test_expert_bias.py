"""The per-expert selection bias with null experts: Megatron's buffer, the plugin's update,
its composition with the budget controller, checkpoints and parallel layouts."""

import pytest
import torch

from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from builders import build_moe_layer, moe_config, moe_config_for
from megatron_null_moe import pop_layer_statistics
from megatron_null_moe.budget import update_null_budgets
from megatron_null_moe.cpu_ranks import run_on_ranks
from megatron_null_moe.expert_bias import expert_bias_step, update_expert_biases
from megatron_null_moe.metrics import load_max_over_mean
from reference import reference_route_with_options


def test_sign_step_towards_balance_then_recentred():
    bias = torch.tensor([0.5, 0.0, -0.2, 0.1])
    counts = torch.tensor([10.0, 2.0, 4.0, 4.0], dtype=torch.float64)  # mean 5
    upstream = expert_bias_step(bias, counts, 0.1, recentre=False)
    torch.testing.assert_close(upstream, torch.tensor([0.4, 0.1, -0.1, 0.2]))
    recentred = expert_bias_step(bias, counts, 0.1, recentre=True)
    torch.testing.assert_close(recentred, upstream - upstream.mean())
    assert abs(float(recentred.mean())) < 1e-7
    assert recentred.dtype == torch.float32


def _router(score_function="softmax", rate=1e-2, controller=None, seed=0, **overrides):
    config = moe_config(moe_router_score_function=score_function, **overrides)
    return build_moe_layer(config, real_fraction=0.5, seed=seed, expert_bias_rate=rate,
                           budget_control_rate=controller).router.train()


def test_megatrons_buffer_fp32_saved_and_left_to_the_plugin(parallel_state):
    router = _router("sigmoid")
    assert router.expert_bias.shape == (8,) and router.expert_bias.dtype == torch.float32
    assert "expert_bias" in router.state_dict()
    assert build_moe_layer(moe_config(), real_fraction=0.5).router.expert_bias is None
    router.bfloat16()
    assert router.expert_bias.dtype == torch.float32
    # Megatron's own flag builds the router with its buffer; Megatron's finalize_model_grads
    # leaves it alone (it would count after drops, all-reduce apart, never re-centre).
    config = moe_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    megatron_flag = build_moe_layer(config, real_fraction=0.5).router.train()
    assert megatron_flag.expert_bias_rate == config.moe_router_bias_update_rate
    megatron_flag.local_tokens_per_expert.copy_(torch.arange(8.0))
    _update_router_expert_bias([megatron_flag], config)
    assert not megatron_flag.expert_bias.any()


def test_a_checkpoint_without_the_bias_starts_it_at_zero(parallel_state):
    saved = build_moe_layer(moe_config(), real_fraction=0.5, seed=1).router.state_dict()
    router = _router(seed=2)
    router.expert_bias.fill_(0.3)
    router.load_state_dict(saved)
    assert not router.expert_bias.any()
    assert torch.equal(router.weight, saved["weight"])


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_the_bias_moves_the_choice_never_the_weights_or_losses(parallel_state, score_function):
    router = _router(score_function, moe_router_num_groups=4, moe_router_group_topk=2)
    hidden = torch.randn(64, 1, 16, generator=torch.Generator().manual_seed(4))
    losses, maps = [], []
    for scale in (0.0, 0.5):
        router.expert_bias.copy_(scale * torch.linspace(-1, 1, 8))
        get_moe_metrics_tracker().clear()
        probs, routing_map = router(hidden)
        metrics = get_moe_metrics_tracker().metrics
        losses.append({name: entry.values[0].item() for name, entry in metrics.items()})
        logits = router.gating(hidden).reshape(-1, 9).detach()
        ref_probs, ref_map, _ = reference_route_with_options(
            logits[:, :8], logits[:, 8], 8, 4, score_function, expert_bias_N=router.expert_bias,
            num_groups=4, group_topk=2)
        assert torch.equal(routing_map, ref_map)
        torch.testing.assert_close(probs.detach().double(), ref_probs, rtol=1e-5, atol=1e-6)
        maps.append(routing_map)
    assert not torch.equal(maps[0], maps[1])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # balance and z-loss unchanged


def _skewed_tokens(generator, tokens=256):
    """Hidden states with a common direction: the router favours some experts for all."""
    direction = torch.linspace(-1.0, 1.0, 16)
    return torch.randn(tokens, 1, 16, generator=generator) + 1.5 * direction


def _train_biases(router, steps, generator=None):
    """Route fresh tokens, then one controller and one per-expert step, as the training loop
    does after each global batch; per step the real fraction and the busiest expert / mean."""
    generator = generator or torch.Generator().manual_seed(1)
    fractions, loads = [], []
    for _ in range(steps):
        router(_skewed_tokens(generator))
        counts = router.real_assignments_per_expert.clone()
        statistics = pop_layer_statistics(router)
        update_null_budgets([router], statistics)
        update_expert_biases([router], {1: counts.double()})
        fractions.append(statistics[1].real_fraction)
        loads.append(load_max_over_mean(counts.double()))
    return fractions, loads


@pytest.mark.parametrize("score_function,rate", [("softmax", 2e-2), ("sigmoid", 5e-3)])
def test_with_the_controller_the_budget_holds_and_the_load_evens(parallel_state,
                                                                 score_function, rate):
    """A frozen router on skewed tokens: with the controller alone the busiest expert carries
    several times the mean; with the per-expert bias too the load evens out while the real
    fraction stays on rho (the re-centred bias leaves the budget to the null bias)."""
    unbiased = _router(score_function, rate=None, controller=1.0,
                       moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
    biased = _router(score_function, rate=rate, controller=1.0,
                     moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
    biased.load_state_dict(unbiased.state_dict())
    fractions, loads = _train_biases(biased, 120)
    _, unbiased_loads = _train_biases(unbiased, 120)
    late = slice(60, None)
    mean_fraction = sum(fractions[late]) / len(fractions[late])
    assert abs(mean_fraction - 0.5) < 0.01, fractions
    balanced = sum(loads[late]) / len(loads[late])
    skewed = sum(unbiased_loads[late]) / len(unbiased_loads[late])
    assert skewed > 2.0 and balanced < 1.4 and balanced < 0.6 * skewed, (balanced, skewed)
    assert abs(float(biased.expert_bias.mean())) < 1e-6


def test_bias_state_is_checkpointed_and_resumes_exactly(parallel_state):
    straight = _router(controller=1.0)
    state = {k: v.clone() for k, v in straight.state_dict().items()}
    expected = _train_biases(straight, 10, torch.Generator().manual_seed(7))
    first = _router(controller=1.0)
    first.load_state_dict(state)
    generator = torch.Generator().manual_seed(7)
    head = _train_biases(first, 5, generator)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = _router(controller=1.0, seed=11)  # other weights until loaded
    resumed.load_state_dict(saved)
    tail = _train_biases(resumed, 5, generator)  # the uninterrupted run's tokens 6-10
    assert head[0] + tail[0] == expected[0] and head[1] + tail[1] == expected[1]
    assert torch.equal(resumed.expert_bias, straight.expert_bias)
    assert resumed.expert_bias.any()


def _bias_step_on_ranks(rank, world_size, parallel_sizes, overrides, weights, inputs):
    """Micro-batches per rank, the counters summed over every rank in the monitor's one
    all-reduce, one per-expert step; returns the bias and the per-expert counts."""
    from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state
    from megatron_null_moe.training_hooks import collect_layer_counters

    init_cpu_parallel_state(**parallel_sizes)
    try:
        config = moe_config_for(parallel_sizes, **overrides)
        layer = build_moe_layer(config, real_fraction=0.5, expert_bias_rate=1e-2)
        layer.router.load_state_dict(weights)
        layer.train()
        for hidden in inputs[rank]:
            layer(hidden)[0].sum().backward()
        counters = collect_layer_counters([layer.router], num_layers=1, topk=4, num_experts=8)
        update_expert_biases([layer.router], {1: counters[0, 4 + 5:]})
        return {"bias": layer.router.expert_bias.clone(), "counts": counters[0, 4 + 5:]}
    finally:
        destroy_cpu_parallel_state()


@pytest.mark.world_size(2)
@pytest.mark.parametrize("parallel_sizes,overrides", [
    ({"expert_model_parallel_size": 2}, {}),
    ({"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1},
     {"sequence_parallel": True}),
], ids=["EP2", "TP2-SP"])
def test_parallel_bias_step_equals_one_process(parallel_state, parallel_sizes, overrides):
    """Two ranks, two micro-batches each: the counts summed over the ranks give every replica
    the bias one process computes from all the tokens (integer counts: exactly)."""
    router = _router(seed=9)
    weights = {k: v.clone() for k, v in router.state_dict().items()}
    generator = torch.Generator().manual_seed(10)
    inputs = [[torch.randn(6, 2, 16, generator=generator) for _ in range(2)] for _ in range(2)]
    ranks = run_on_ranks(_bias_step_on_ranks, 2, parallel_sizes, overrides, weights, inputs)
    single = run_on_ranks(_bias_step_on_ranks, 1, {}, {}, weights,
                          [[hidden for rank in inputs for hidden in rank]])
    assert torch.equal(ranks[0]["counts"], single[0]["counts"])
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])
    assert torch.equal(ranks[0]["bias"], single[0]["bias"])
    assert single[0]["bias"].any()
