"""null_expert_training(): Megatron's loop hooked once, and restored after; the expert load
figures, from the router's counts over all ranks to the log line."""

from types import SimpleNamespace

import megatron.training.training as training
import pytest
import torch

from builders import build_moe_layer, moe_config, moe_config_for
from megatron_null_moe.cpu_ranks import run_on_ranks
from megatron_null_moe.metrics import (
    expert_load_figures,
    expert_parallel_rank_loads,
    load_max_over_mean,
)
from megatron_null_moe.training_hooks import (
    NullExpertMonitor,
    collect_layer_counters,
    null_expert_training,
    print_as_is,
    statistics_from_counters,
    worst_layer_load_values,
)


def test_entered_twice_is_refused_clearly_and_leaves_the_hooks_as_they_were():
    """A wrapper around the entry point or the patched pretrain_gpt.py (which enter it
    themselves) would hook Megatron's loop twice; that fails at once, naming the cause."""
    original = training.train_step
    with null_expert_training(on_cpu=False):
        hooked = training.train_step
        with pytest.raises(RuntimeError, match=r"null_expert_training\(\) is already active.*"
                                               "Enter it once"):
            with null_expert_training(on_cpu=False):
                pass
        assert training.train_step is hooked
    assert training.train_step is original
    with null_expert_training(on_cpu=False):  # entered again after it was left: fine
        assert training.train_step is not original


def _reference_figures(experts_chosen, num_experts, expert_parallel_size):
    """From the list of the experts each real assignment went to, written out: the busiest
    expert over the mean per expert, and the busiest rank over the mean per rank, each rank
    holding Megatron's local_expert_indices (ep_rank * N/EP + i)."""
    per_expert = [experts_chosen.count(e) for e in range(num_experts)]
    local = num_experts // expert_parallel_size
    per_rank = [sum(per_expert[rank * local + i] for i in range(local))
                for rank in range(expert_parallel_size)]
    total = len(experts_chosen)
    return (max(per_expert) / (total / num_experts),
            max(per_rank) / (total / expert_parallel_size), per_rank)


@pytest.mark.parametrize("expert_parallel_size", [1, 2, 4, 8])
def test_load_figures_equal_the_written_out_reference(expert_parallel_size):
    generator = torch.Generator().manual_seed(expert_parallel_size)
    weights = torch.tensor([8.0, 1, 1, 2, 3, 1, 5, 1])  # uneven: figures well above 1
    chosen = torch.multinomial(weights, 500, replacement=True, generator=generator).tolist()
    counts = torch.bincount(torch.tensor(chosen), minlength=8).double()
    expert_figure, rank_figure, per_rank = _reference_figures(chosen, 8, expert_parallel_size)
    figures = expert_load_figures(counts, expert_parallel_size)
    assert figures["expert_load_max_over_mean"] == pytest.approx(expert_figure, rel=1e-12)
    assert expert_parallel_rank_loads(counts, expert_parallel_size).tolist() == per_rank
    if expert_parallel_size == 1:
        assert set(figures) == {"expert_load_max_over_mean"}
    else:
        assert figures["ep_rank_load_max_over_mean"] == pytest.approx(rank_figure, rel=1e-12)
        assert 1 <= figures["ep_rank_load_max_over_mean"] <= figures["expert_load_max_over_mean"]


def test_load_figures_at_the_extremes():
    assert load_max_over_mean(torch.full((8,), 3.0)) == 1.0
    assert load_max_over_mean(torch.tensor([0.0, 0, 5, 0])) == 4.0
    assert expert_load_figures(torch.zeros(8), 2) == {}  # all-null: nothing to compare
    with pytest.raises(ValueError, match="6 experts do not divide among 4"):
        expert_parallel_rank_loads(torch.ones(6), 4)


def test_worst_layer_on_the_log_line_printed_as_is():
    """The log line shows the largest figure over the layers; Megatron prints the sum over
    the interval divided by its advanced iterations, so the sum is set to print the value."""
    values = worst_layer_load_values({
        1: {"expert_load_max_over_mean": 1.5, "ep_rank_load_max_over_mean": 1.1},
        2: {"expert_load_max_over_mean": 1.25, "ep_rank_load_max_over_mean": 1.2}})
    assert values == {"null busiest expert / mean": 1.5, "null busiest EP rank / mean": 1.2}
    total_loss_dict = {"advanced iterations": 3, "null busiest EP rank / mean": 7.0}
    print_as_is(total_loss_dict, {"null busiest expert / mean": 1.5}, skipped_iter=0)
    assert "null busiest EP rank / mean" not in total_loss_dict  # none this interval
    assert float(total_loss_dict["null busiest expert / mean"]) / (3 + 1) == 1.5


def _counters(histograms, assignments):
    """[layers, K+5+N] counters (collect_layer_counters) of K+1-column real-expert
    histograms and N-column real assignments per expert, the other columns zero."""
    histograms = torch.tensor(histograms, dtype=torch.float64)
    zeros = torch.zeros(len(histograms), 4, dtype=torch.float64)
    return torch.cat([histograms, zeros, torch.tensor(assignments, dtype=torch.float64)], 1)


def test_per_step_figures_show_the_swing_that_the_interval_sum_hides():
    """A selection bias that moves every step can even out the sum over the log interval
    while each step is uneven; the ..._per_step figures average each step's own figure. A
    step in which a layer routed nothing real has no figure and is not counted. The
    interval's statistics count all its steps' tokens."""
    monitor = NullExpertMonitor()
    args = SimpleNamespace(log_interval=2, expert_model_parallel_size=2, curr_iteration=0,
                           moe_router_topk=2)
    monitor.expected_real_experts = 1.0  # rho = 0.5 at K = 2
    # Layer 1: 4 tokens of 2 real experts; layer 2: 4 tokens, none real.
    monitor._add_step_counters(args, _counters([[0, 0, 4], [4, 0, 0]],
                                               [[3, 3, 1, 1], [0, 0, 0, 0]]))
    assert monitor.interval_load_figures(args) == {}  # not a log iteration
    assert monitor.interval_layer_statistics(args) == {}
    args.curr_iteration = 1
    # Layer 1: 4 tokens of 1 real expert and 2 of 2; layer 2: 2 tokens of 2 real experts.
    monitor._add_step_counters(args, _counters([[0, 4, 2], [0, 0, 2]],
                                               [[1, 1, 3, 3], [2, 0, 0, 2]]))
    figures = monitor.interval_load_figures(args)
    assert figures[1] == {"expert_load_max_over_mean": 1.0, "ep_rank_load_max_over_mean": 1.0,
                          "expert_load_max_over_mean_per_step": 1.5,
                          "ep_rank_load_max_over_mean_per_step": 1.5}
    assert figures[2] == {"expert_load_max_over_mean": 2.0, "ep_rank_load_max_over_mean": 1.0,
                          "expert_load_max_over_mean_per_step": 2.0,
                          "ep_rank_load_max_over_mean_per_step": 1.0}
    assert worst_layer_load_values(figures)["null busiest expert / mean per step"] == 2.0
    statistics = monitor.interval_layer_statistics(args)
    assert statistics[1].real_fraction == (8 + 4 + 4) / (10 * 2)
    assert statistics[2].real_fraction == 4 / (6 * 2)
    # The next interval starts afresh.
    args.curr_iteration = 3
    monitor._add_step_counters(args, _counters([[0, 0, 2], [0, 0, 2]],
                                               [[1, 1, 1, 1], [1, 1, 1, 1]]))
    assert monitor.interval_load_figures(args)[2]["expert_load_max_over_mean_per_step"] == 1.0
    assert monitor.interval_layer_statistics(args)[2].real_fraction == 1.0


def _train_on(layer, inputs):
    layer.train()
    for hidden in inputs:
        layer(hidden)[0].sum().backward()


def test_per_expert_columns_ride_in_the_counters(parallel_state):
    """collect_layer_counters with N: the router's counts per expert in columns K+5..,
    summing to the real assignments of the histogram columns; without N the [layers, K+5]
    it always gave."""
    layer = build_moe_layer(moe_config(num_layers=2), real_fraction=0.5, layer_number=2)
    _train_on(layer, [torch.randn(12, 2, 16)])
    histogram = layer.router.real_experts_histogram.sum(dim=0).clone()
    per_expert = layer.router.real_assignments_per_expert.clone()
    counters = collect_layer_counters([layer.router], num_layers=2, topk=4, num_experts=8)
    assert counters.shape == (2, 4 + 5 + 8)
    assert torch.equal(counters[1, :5], histogram.double())
    assert torch.equal(counters[1, 9:], per_expert.double())
    real_slots = statistics_from_counters(counters[1, :9], 0.5).real_slots
    assert counters[1, 9:].sum() == real_slots > 0
    assert counters[0].sum() == 0  # layer 1 is not this router's
    assert int(layer.router.real_assignments_per_expert.sum()) == 0  # reset
    assert collect_layer_counters([layer.router], num_layers=2, topk=4).shape == (2, 9)


def _counters_on_ranks(rank, world_size, parallel_sizes, overrides, weights, inputs):
    """Each rank routes its tokens (a sequence slice under TP with sequence parallelism, a
    data-parallel share under EP); returns the counters summed over every rank."""
    from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state

    init_cpu_parallel_state(**parallel_sizes)
    try:
        layer = build_moe_layer(moe_config_for(parallel_sizes, **overrides), real_fraction=0.5)
        layer.router.load_state_dict(weights)
        _train_on(layer, inputs[rank])
        return collect_layer_counters([layer.router], num_layers=1, topk=4, num_experts=8)
    finally:
        destroy_cpu_parallel_state()


@pytest.mark.world_size(2)
def test_counts_summed_over_ranks_count_every_token_once(parallel_state):
    """TP=2 with sequence parallelism and EP=2 on two ranks: the sums over the ranks are the
    counts one process makes of all the tokens, per expert too (no replica counted twice),
    and the EP ranks' loads are the sums over the experts each holds."""
    layer = build_moe_layer(moe_config(), real_fraction=0.5, seed=9)
    weights = {k: v.clone() for k, v in layer.router.state_dict().items()}
    generator = torch.Generator().manual_seed(10)
    sequences = [torch.randn(8, 2, 16, generator=generator) for _ in range(2)]
    # Sequence parallelism: TP rank r routes positions [4r, 4r+4) of each micro-batch.
    inputs = [[hidden[4 * rank:4 * rank + 4] for hidden in sequences] for rank in range(2)]
    parallel_sizes = {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2,
                      "expert_tensor_parallel_size": 1}
    ranks = run_on_ranks(_counters_on_ranks, 2, parallel_sizes, {"sequence_parallel": True},
                         weights, inputs)
    _train_on(layer, sequences)
    one_process = collect_layer_counters([layer.router], num_layers=1, topk=4, num_experts=8)
    per_expert = one_process[0, 9:]
    for counters in ranks:
        assert statistics_from_counters(counters[0, :9], 0.5).num_tokens == 32
        assert torch.equal(counters[0, :5], one_process[0, :5])
        assert torch.equal(counters[0, 9:], per_expert)
    rank_loads = expert_parallel_rank_loads(per_expert, 2)
    assert rank_loads.tolist() == [per_expert[:4].sum().item(), per_expert[4:].sum().item()]
