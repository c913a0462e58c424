"""The lean path's permutation: pure functions against Megatron's permute and plain loops."""

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import permute

from megatron_null_moe.lean.permute import (
    gather_probs,
    gather_rows,
    grouped_offsets,
    inverse_order,
    local_expert_order,
    scatter_add_rows,
    slot_experts,
    sort_assignments,
)
from megatron_null_moe.routing import route_with_null_experts


def _routing(num_tokens, num_experts=8, topk=4, null_shift=0.5, seed=0):
    """probs [T, N], routing_map [T, N] with 0..K real experts per token."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(num_tokens, num_experts, generator=generator)
    null = torch.randn(num_tokens, generator=generator) + null_shift
    probs, routing_map, _ = route_with_null_experts(real, null, num_experts, topk)
    return probs, routing_map


def _order(routing_map, topk=4):
    return sort_assignments(slot_experts(routing_map, topk), routing_map.shape[1])


def test_real_rows_come_first_in_megatrons_permute_order():
    probs, routing_map = _routing(40)
    tokens = torch.randn(40, 16)
    order = _order(routing_map)
    num_real = int(routing_map.sum())
    assert 0 < num_real < 40 * 4 and len(set(routing_map.sum(-1).tolist())) > 1
    expected, expected_probs, *_ = permute(tokens, routing_map, probs=probs,
                                           num_out_tokens=num_real)
    rows = gather_rows(tokens, order)
    assert rows.shape == (40 * 4, 16)
    assert torch.equal(rows[:num_real], expected)  # copies: bit-exact
    assert torch.equal(gather_probs(probs, order)[:num_real], expected_probs)
    assert torch.equal(order.tokens_per_expert_N, routing_map.sum(0))
    assert torch.all(rows[num_real:] == 0) and torch.all(gather_probs(probs, order)[num_real:] == 0)
    real = order.real_rows(num_real)
    assert not real.has_spill_rows and real.num_rows == num_real
    assert torch.equal(gather_rows(tokens, real), expected)
    assert torch.equal(gather_probs(probs, real), expected_probs)


def test_real_rows_only_combine_and_backward_like_megatrons_unpermute():
    """Cut to the real rows: the gathers, the combine and their gradients touch only them."""
    from megatron.core.transformer.moe.moe_utils import unpermute

    probs, routing_map = _routing(32, seed=5)
    order = _order(routing_map)
    real = order.real_rows(int(routing_map.sum()))
    tokens = torch.randn(32, 8, requires_grad=True)
    probs = probs.clone().requires_grad_(True)
    rows = gather_rows(tokens, real) * gather_probs(probs, real).unsqueeze(-1)
    combined = scatter_add_rows(rows, real)
    _, _, sorted_indices, *_ = permute(tokens.detach(), routing_map,
                                       num_out_tokens=real.num_rows)
    expected = unpermute(rows.detach(), sorted_indices, tokens.shape, routing_map=routing_map)
    torch.testing.assert_close(combined, expected)  # fp32 sums in another order: default tol
    upstream = torch.randn(32, 8)
    combined.backward(upstream)
    weight_TN = probs.detach() * routing_map
    torch.testing.assert_close(tokens.grad, weight_TN.sum(-1, keepdim=True) * upstream)
    expected_probs_grad = (upstream @ tokens.detach().t()).diagonal().unsqueeze(-1) * routing_map
    torch.testing.assert_close(probs.grad, expected_probs_grad)


def test_scatter_ignores_whatever_the_spill_rows_hold_and_sends_them_no_gradient():
    probs, routing_map = _routing(24, seed=1)
    order = _order(routing_map)
    num_real = int(routing_map.sum())
    rows = torch.randn(24 * 4, 16)
    rows[num_real:] = float("nan")  # undefined: a grouped GEMM never wrote them
    rows.requires_grad_(True)
    combined = scatter_add_rows(rows, order)
    expected = torch.zeros(24, 16)
    real_rows = order.token_row_R[:num_real]
    for row, token in enumerate(real_rows.tolist()):
        expected[token] += rows.detach()[row]
    torch.testing.assert_close(combined, expected)
    combined.sum().backward()
    assert torch.all(rows.grad[:num_real] == 1) and torch.all(rows.grad[num_real:] == 0)


def test_gradients_of_tokens_and_probs_skip_spill_rows():
    probs, routing_map = _routing(16, seed=2)
    order = _order(routing_map)
    num_real = int(routing_map.sum())
    tokens = torch.randn(16, 8, requires_grad=True)
    probs = probs.clone().requires_grad_(True)
    upstream = torch.randn(16 * 4, 8)
    upstream[num_real:] = float("nan")  # what backward through undefined rows may bring
    gather_rows(tokens, order).backward(upstream)
    expected = torch.zeros(16, 8)
    for row, token in enumerate(order.token_row_R[:num_real].tolist()):
        expected[token] += upstream[row]
    torch.testing.assert_close(tokens.grad, expected)
    weights = gather_probs(probs, order)
    weights.backward(torch.where(torch.arange(64) < num_real, 1.0, float("nan")))
    torch.testing.assert_close(probs.grad, routing_map.float())


def test_all_null_micro_batch_and_single_token():
    routing_map = torch.zeros(5, 8, dtype=torch.bool)
    order = _order(routing_map)
    assert torch.all(order.tokens_per_expert_N == 0)
    assert torch.all(order.token_row_R >= 5)  # every row spills
    rows = torch.full((20, 4), float("nan"), requires_grad=True)
    out = scatter_add_rows(rows, order)
    assert torch.all(out == 0)
    probs, routing_map = _routing(1, seed=3, null_shift=-9.0)  # one token, K real experts
    order = _order(routing_map)
    assert int(order.tokens_per_expert_N.sum()) == 4 and (order.tokens_per_expert_N == 0).sum() == 4


def test_top_k_above_the_number_of_experts():
    routing_map = torch.ones(3, 2, dtype=torch.bool)  # N=2 real experts, K=4 slots
    experts = slot_experts(routing_map, topk=4)
    assert experts.tolist() == [[0, 1]] * 3


def test_offsets_are_int32_cumulative_counts():
    offsets = grouped_offsets(torch.tensor([3, 0, 2]), torch.device("cpu"))
    assert offsets.dtype == torch.int32 and offsets.tolist() == [3, 3, 5]


@pytest.mark.parametrize("ranks,local", [(2, 3), (4, 1)])
def test_received_rows_sorted_by_local_expert_like_megatrons_chunk_sort(ranks, local):
    generator = torch.Generator().manual_seed(ranks)
    counts = torch.randint(0, 4, (ranks, local), generator=generator)
    counts[0, 0] = 0  # an empty chunk
    rows = torch.arange(int(counts.sum()))
    chunks = torch.split(rows, counts.reshape(-1).tolist())
    expected = torch.cat([chunks[rank * local + expert] for expert in range(local)
                          for rank in range(ranks)])
    order = local_expert_order(counts, int(counts.sum()))
    assert torch.equal(rows[order], expected)
    assert torch.equal(rows[order][inverse_order(order)], rows)
