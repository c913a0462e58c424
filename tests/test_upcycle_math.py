"""upcycle.weights and upcycle.router_init against the simplest written-out references."""

import pytest
import torch
import torch.nn.functional as F

from megatron_null_moe.routing import route_with_null_experts
from megatron_null_moe.upcycle.convert import cut_group_counts
from megatron_null_moe.upcycle.router_init import (
    calibrate_null_offset,
    grouped_router_weight,
    mean_null_row,
    proxy_router_inputs,
    real_fraction,
)
from megatron_null_moe.upcycle.weights import (
    drop_reinitialise,
    expert_weights,
    ffn_slices,
    shared_expert_weights,
    weight_statistics,
)
from reference import reference_route

HIDDEN, WIDTH = 8, 12


def dense_ffn(x_TH, fc1, fc2, gated):
    """The dense FFN written out: fc2 (silu(gate x) * up x), or fc2 gelu(fc1 x)."""
    if gated:
        gate, up = fc1[:WIDTH], fc1[WIDTH:]
        return (F.silu(x_TH @ gate.t()) * (x_TH @ up.t())) @ fc2.t()
    return F.gelu(x_TH @ fc1.t()) @ fc2.t()


def dense_weights(gated, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fc1 = torch.randn((2 if gated else 1) * WIDTH, HIDDEN, generator=generator, dtype=torch.float64)
    fc2 = torch.randn(HIDDEN, WIDTH, generator=generator, dtype=torch.float64)
    return fc1, fc2


def expert_ffn(x_TH, fc1, fc2, gated):
    if gated:
        gate, up = torch.chunk(fc1, 2, dim=0)
        return (F.silu(x_TH @ gate.t()) * (x_TH @ up.t())) @ fc2.t()
    return F.gelu(x_TH @ fc1.t()) @ fc2.t()


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("granularity", [1, 2, 3, 4])
def test_slices_sum_to_dense_ffn(gated, granularity):
    fc1, fc2 = dense_weights(gated)
    x = torch.randn(5, HIDDEN, dtype=torch.float64)
    slices = ffn_slices(fc1, fc2, granularity, gated)
    assert len(slices) == granularity
    assert all(s[1].shape == (HIDDEN, WIDTH // granularity) for s in slices)
    total = sum(expert_ffn(x, s1, s2, gated) for s1, s2 in slices)
    torch.testing.assert_close(total, dense_ffn(x, fc1, fc2, gated))


@pytest.mark.parametrize("gated", [True, False])
def test_whole_groups_with_any_weights_reproduce_dense_ffn(gated):
    """N=8, G=4: expert e is slice e mod 4 with fc2 x G; a token whose selected experts are
    whole groups, each group's experts with one weight and all weights summing to 1, gets
    exactly FFN(x)."""
    fc1, fc2 = dense_weights(gated)
    experts = expert_weights(fc1, fc2, num_experts=8, granularity=4, gated=gated,
                             output_scale=4)
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    for e, (e_fc1, e_fc2) in enumerate(experts):
        s_fc1, s_fc2 = ffn_slices(fc1, fc2, 4, gated)[e % 4]
        assert torch.equal(e_fc1, s_fc1) and torch.equal(e_fc2, s_fc2 * 4)
    for group_weights in ([1.0, 0.0], [0.3, 0.7]):
        per_expert = [group_weights[e // 4] / 4 for e in range(8)]  # sums to 1
        output = sum(w * expert_ffn(x, *experts[e], gated) for e, w in enumerate(per_expert))
        torch.testing.assert_close(output, dense_ffn(x, fc1, fc2, gated))
    # A partial group is not the dense FFN.
    partial = sum(expert_ffn(x, *experts[e], gated) / 3 for e in range(3))
    assert not torch.allclose(partial, dense_ffn(x, fc1, fc2, gated))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("width_multiple", [1, 2])
def test_shared_expert_carries_its_share_of_dense_ffn(gated, width_multiple):
    fc1, fc2 = dense_weights(gated)
    shared_fc1, shared_fc2 = shared_expert_weights(fc1, fc2, width_multiple * WIDTH, gated, 0.5)
    assert shared_fc2.shape == (HIDDEN, width_multiple * WIDTH)
    x = torch.randn(4, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(expert_ffn(x, shared_fc1, shared_fc2, gated),
                               0.5 * dense_ffn(x, fc1, fc2, gated))


@pytest.mark.parametrize("gated", [True, False])
def test_drop_reinitialise_changes_exactly_the_drawn_units(gated):
    width, hidden = 40, 64
    generator = torch.Generator().manual_seed(3)
    fc1 = torch.randn((2 if gated else 1) * width, hidden, generator=generator) * 0.05 + 0.01
    fc2 = torch.randn(hidden, width, generator=generator) * 0.02
    statistics = weight_statistics(fc1, fc2, gated)
    new_fc1, new_fc2 = drop_reinitialise(fc1, fc2, 0.3, statistics, gated,
                                         torch.Generator().manual_seed(7))
    changed_columns = (new_fc2 != fc2).any(dim=0)
    assert int(changed_columns.sum()) == round(0.3 * width)  # 12 of 40 units
    changed_rows = (new_fc1 != fc1).any(dim=1)
    halves = changed_rows.view(2, width) if gated else changed_rows.view(1, width)
    for half in halves:  # gate and up rows of the same units as the fc2 columns
        assert torch.equal(half, changed_columns)
    again = drop_reinitialise(fc1, fc2, 0.3, statistics, gated, torch.Generator().manual_seed(7))
    assert torch.equal(again[0], new_fc1) and torch.equal(again[1], new_fc2)  # seeded
    fresh = new_fc1[changed_rows]
    mean, std = statistics[0]
    assert abs(float(fresh.mean()) - mean) < 0.02 and abs(float(fresh.std()) / std - 1) < 0.2
    unchanged = drop_reinitialise(fc1, fc2, 0.0, statistics, gated, generator)
    assert torch.equal(unchanged[0], fc1) and torch.equal(unchanged[1], fc2)


def test_grouped_router_rows_and_mean_null_row():
    weight = grouped_router_weight(8, 4, 16, 0.02, torch.Generator().manual_seed(0))
    assert weight.shape == (8, 16)
    for e in range(8):
        assert torch.equal(weight[e], weight[(e // 4) * 4])
    assert not torch.equal(weight[0], weight[4])
    x = torch.randn(10, 16)
    null = mean_null_row(weight)
    torch.testing.assert_close((x @ null.t()).squeeze(-1), (x @ weight.t()).mean(dim=-1))


def test_real_fraction_equals_materialised_pool():
    """real_fraction against paper steps 2-4 on the written-out N + M pool."""
    generator = torch.Generator().manual_seed(1)
    real_rows = torch.randn(6, 16, generator=generator)
    null_row = torch.randn(1, 16, generator=generator)
    x = torch.randn(200, 16, generator=generator)
    for offset in (-2.0, 0.0, 1.5):
        null_logit = (x @ null_row.t()).squeeze(-1) + offset
        _, routing_map, _ = reference_route((x @ real_rows.t()).double(), null_logit.double(),
                                            6, 4)
        expected = float(routing_map.sum()) / (200 * 4)
        assert real_fraction(x, real_rows, null_row, 6, 4, offset) == pytest.approx(expected)


@pytest.mark.parametrize("num_experts,granularity,topk,copies,rho", [
    (64, 4, 8, 64, 0.5),    # the paper's setting
    (16, 1, 4, 48, 0.25),
    (8, 2, 2, 8, 0.5),
])
def test_calibrated_offset_starts_near_rho_and_null_row_alone_does_not(
        num_experts, granularity, topk, copies, rho):
    generator = torch.Generator().manual_seed(0)
    real_rows = grouped_router_weight(num_experts, granularity, 32, 0.02, generator)
    null_row = mean_null_row(real_rows)
    norm_weight = torch.rand(32, generator=generator) + 0.5
    inputs = proxy_router_inputs(norm_weight, 4096, generator)
    offset = calibrate_null_offset(inputs, real_rows, null_row, copies, topk, rho)
    assert real_fraction(inputs, real_rows, null_row, copies, topk, offset) == \
        pytest.approx(rho, abs=0.02)
    # The null row alone (null logit at the mean real logit) starts far above rho.
    assert real_fraction(inputs, real_rows, null_row, copies, topk) > rho + 0.2
    # Fresh inputs of the same distribution: the offset carries over.
    fresh = proxy_router_inputs(norm_weight, 4096, generator)
    assert real_fraction(fresh, real_rows, null_row, copies, topk, offset) == \
        pytest.approx(rho, abs=0.03)


def test_calibrated_offset_holds_rho_on_the_routers_own_selection():
    # Sigmoid scores with a per-expert bias larger than the scores' spread and a group limit:
    # the offset found on that selection holds rho on it; the softmax offset does not.
    generator = torch.Generator().manual_seed(0)
    real_rows = torch.empty(64, 32).normal_(0.0, 0.02, generator=generator)
    null_row = real_rows.mean(dim=0, keepdim=True)
    inputs = torch.empty(4096, 32).normal_(generator=generator)
    bias = torch.empty(64).uniform_(-0.05, 0.05, generator=generator)
    options = dict(score_function="sigmoid", expert_bias=bias, num_groups=8, group_topk=4)
    offset = calibrate_null_offset(inputs, real_rows, null_row, 64, 8, 0.5, **options)
    assert real_fraction(inputs, real_rows, null_row, 64, 8, offset, **options) == \
        pytest.approx(0.5, abs=0.005)
    softmax_offset = calibrate_null_offset(inputs, real_rows, null_row, 64, 8, 0.5)
    assert abs(real_fraction(inputs, real_rows, null_row, 64, 8, softmax_offset, **options)
               - 0.5) > 0.03


def test_calibration_widens_its_bracket_when_a_per_expert_bias_outruns_the_logits():
    # Sigmoid scores with per-expert biases of +-0.5: even a null logit 1 above every real
    # logit leaves more than rho real (biased-up experts still win); the offset must go
    # further.
    generator = torch.Generator().manual_seed(0)
    real_rows = torch.empty(16, 8).normal_(0.0, 0.02, generator=generator)
    null_row = real_rows.mean(dim=0, keepdim=True)
    inputs = torch.empty(2048, 8).normal_(generator=generator)
    options = dict(score_function="sigmoid",
                   expert_bias=torch.empty(16).uniform_(-0.5, 0.5, generator=generator))
    offset = calibrate_null_offset(inputs, real_rows, null_row, 16, 4, 0.5, **options)
    assert real_fraction(inputs, real_rows, null_row, 16, 4, offset, **options) == \
        pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("num_experts,granularity,topk,copies", [
    (64, 4, 8, 64),  # the paper's setting: whole groups
    (4, 2, 2, 4),    # the tests' PAPER_LIKE: whole groups
    (8, 4, 4, 8), (8, 4, 4, 4), (8, 4, 8, 0),
    (8, 4, 2, 8),    # K not a multiple of G: cuts
    (8, 4, 2, 0),
    (8, 4, 4, 2),    # M < K, not a multiple of G: cuts
    (4, 2, 6, 3),    # K > N
    (4, 2, 5, 1),    # K = N + M: every expert taken, whole groups
])
def test_cut_group_counts_are_the_counts_grouped_rows_route(num_experts, granularity, topk,
                                                            copies):
    """cut_group_counts (what --router-init grouped refuses on) against the routing itself:
    tied logits per group, the null logit anywhere among them."""
    generator = torch.Generator().manual_seed(0)
    groups = torch.randn(4000, num_experts // granularity, generator=generator)
    real_logits = groups.repeat_interleave(granularity, dim=1)
    null_logit = 1.5 * torch.randn(4000, generator=generator)
    _, routing_map, _ = route_with_null_experts(real_logits, null_logit, copies, topk)
    counts = set(routing_map.sum(dim=-1).tolist())
    assert {c for c in counts if c % granularity} == \
        set(cut_group_counts(num_experts, granularity, topk, copies))
