"""Sigmoid scores, the per-expert selection bias and node-limited groups with null experts:
against the materialised N + M pool, and with M = 0 against Megatron's own routing."""

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    topk_routing_with_score_function,
)

from megatron_null_moe.routing import (
    grouped_pool_logits,
    grouped_pool_sigmoid_probs,
    grouped_slot_counts,
    pool_load_balancing_loss,
    route_with_null_experts,
    select_pool_slots,
    selection_keys,
)
from reference import (
    reference_route_with_options,
    reference_sigmoid_balance_loss,
    reference_z_loss,
)

CASES = [(8, 8, 4), (8, 24, 2), (16, 16, 8), (8, 0, 4), (8, 8, 1)]  # (N, M, K)
OPTIONS = {
    "softmax+bias": dict(score_function="softmax", bias=True),
    "sigmoid": dict(score_function="sigmoid"),
    "sigmoid+bias": dict(score_function="sigmoid", bias=True),
    "softmax+groups": dict(score_function="softmax", groups=(4, 2)),
    "sigmoid+bias+groups+null-bias": dict(score_function="sigmoid", bias=True, groups=(4, 2),
                                          null_bias=0.3),
    "sigmoid+scaling": dict(score_function="sigmoid", scaling_factor=2.5),
}


def _logits(num_tokens, num_experts, seed):
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    null = torch.randn(num_tokens, generator=generator, dtype=torch.float64)
    bias = 0.3 * torch.randn(num_experts, generator=generator, dtype=torch.float64)
    return real, null, bias


def _valid_groups(groups, num_experts, topk):
    return groups is None or (topk % groups[1] == 0
                              and topk // groups[1] <= num_experts // groups[0])


def _route(real, null, num_null, topk, score_function="softmax", bias=None, groups=None,
           null_bias=None, scaling_factor=None):
    return route_with_null_experts(
        real, null if num_null else None, num_null, topk, scaling_factor=scaling_factor,
        null_selection_bias=None if null_bias is None else torch.tensor([null_bias]),
        score_function=score_function, expert_bias=bias,
        num_groups=groups[0] if groups else None, group_topk=groups[1] if groups else None)


@pytest.mark.parametrize("num_experts,num_null,topk", CASES)
@pytest.mark.parametrize("option", OPTIONS)
def test_routing_with_options_equals_materialised_pool(num_experts, num_null, topk, option):
    settings = OPTIONS[option]
    groups = settings.get("groups")
    if not _valid_groups(groups, num_experts, topk):
        pytest.skip("group_topk must divide K with K/group_topk <= experts per group")
    real, null, bias = _logits(96, num_experts, seed=num_experts * 10 + topk)
    bias = bias if settings.get("bias") else None
    kwargs = dict(score_function=settings["score_function"],
                  scaling_factor=settings.get("scaling_factor"))
    probs, routing_map, slots = _route(real, null, num_null, topk, bias=bias, groups=groups,
                                       null_bias=settings.get("null_bias"), **kwargs)
    ref_probs, ref_map, ref_order = reference_route_with_options(
        real, null, num_null, topk, expert_bias_N=bias, null_bias=settings.get("null_bias", 0.0),
        num_groups=groups[0] if groups else None, group_topk=groups[1] if groups else None,
        **kwargs)
    assert torch.equal(routing_map, ref_map)
    assert torch.equal(slots, ref_order.clamp(max=num_experts))
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    if num_null and topk > 1:
        assert (routing_map.sum(-1) < min(topk, num_experts)).any(), "no token took a null"


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_groups_bound_the_groups_a_token_uses_and_nulls_stay_eligible(score_function):
    real, null, bias = _logits(256, 16, seed=4)
    _, routing_map, slots = _route(real, null, 16, 4, score_function, bias, groups=(4, 1))
    groups_used = routing_map.view(256, 4, 4).any(dim=-1).sum(dim=-1)
    assert groups_used.max() == 1
    _, ungrouped, _ = _route(real, null, 16, 4, score_function, bias)
    assert ungrouped.view(256, 4, 4).any(dim=-1).sum(dim=-1).max() > 1
    # A null logit above every real one: all-null tokens, groups or not.
    _, all_null, _ = _route(real, null + 100.0, 16, 4, score_function, groups=(4, 1))
    assert not all_null.any()


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("topk", [1, 4])
def test_weight_gradients_equal_materialised_pool(score_function, topk):
    """The weights' gradients to the real and null logits: the biases and groups move the
    choice only, so the gradient is that of the unbiased scores at the chosen slots."""
    real, null, bias = _logits(64, 8, seed=topk)
    target = torch.randn(64, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = []
    for route in ("pool", "reference"):
        leaves = [real.clone().requires_grad_(True), null.clone().requires_grad_(True)]
        if route == "pool":
            probs = _route(*leaves, 8, topk, score_function, bias,
                           groups=(4, 2) if topk == 4 else None)[0]
        else:
            probs = reference_route_with_options(
                *leaves, 8, topk, score_function, expert_bias_N=bias,
                num_groups=4 if topk == 4 else None, group_topk=2 if topk == 4 else None)[0]
        grads.append(torch.autograd.grad((probs * target).sum(), leaves, allow_unused=True))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-9)
    assert (grads[0][0].abs().sum() > 0) == (score_function == "sigmoid" or topk > 1)
    assert grads[0][1] is not None and not grads[0][1].any()  # the null logit: zero, present


@pytest.mark.parametrize("num_experts,num_null,topk", [(8, 8, 4), (8, 24, 2), (8, 0, 4)])
def test_sigmoid_balance_and_z_loss_and_gradients_equal_materialised_pool(
        num_experts, num_null, topk):
    """Sigmoid over the pool: P_i = s_i / (sum of real s + M s_null), f_i from the top-K of
    the unbiased scores; the z-loss is the softmax path's, over the N + M logits."""
    real, null, _ = _logits(48, num_experts, seed=num_null + topk)
    leaves = [real.clone().requires_grad_(True), null.clone().requires_grad_(True)]
    null_arg = leaves[1] if num_null else None
    keys = selection_keys(leaves[0].detach(), None if null_arg is None else null.clone(),
                          "sigmoid")
    slots = select_pool_slots(*keys, num_null, topk)
    counts = grouped_slot_counts(slots, num_experts, num_null).sum(0)
    loss = pool_load_balancing_loss(
        grouped_pool_sigmoid_probs(leaves[0], null_arg, num_null), counts, 48, topk,
        num_experts + num_null, 0.01)
    grouped = grouped_pool_logits(leaves[0], null_arg, num_null)
    z_loss = 1e-3 * torch.logsumexp(grouped, dim=-1).square().mean()
    ref_leaves = [real.clone().requires_grad_(True), null.clone().requires_grad_(True)]
    ref_loss = reference_sigmoid_balance_loss(*ref_leaves, num_null, topk, 0.01)
    ref_z = reference_z_loss(*ref_leaves, num_null, 1e-3)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(z_loss, ref_z, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss + z_loss, [leaves[0], leaves[1]], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss + ref_z, ref_leaves, allow_unused=True)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=1e-5, atol=1e-9)
    if num_null:
        torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=1e-5, atol=1e-9)
        assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("score_function,bias,groups,topk", [
    ("softmax", False, (4, 2), 4),
    ("sigmoid", False, None, 4),
    ("sigmoid", True, None, 4),
    ("sigmoid", True, (4, 2), 4),
    ("sigmoid", True, None, 1),
])
def test_without_null_copies_routing_equals_megatrons(score_function, bias, groups, topk):
    """M = 0: what Megatron's topk_routing_with_score_function computes (its softmax path
    has no expert bias), and its balance-loss scores for sigmoid."""
    real, _, expert_bias = _logits(128, 8, seed=21)
    real, expert_bias = real.float(), expert_bias.float() if bias else None
    probs, routing_map, _ = _route(real, None, 0, topk, score_function, expert_bias, groups,
                                   scaling_factor=1.5)
    megatron_probs, megatron_map = topk_routing_with_score_function(
        real, topk, num_groups=groups[0] if groups else None,
        group_topk=groups[1] if groups else None, scaling_factor=1.5,
        score_function=score_function, expert_bias=expert_bias)
    assert torch.equal(routing_map, megatron_map)
    torch.testing.assert_close(probs, megatron_probs, rtol=1e-6, atol=1e-7)
    if score_function == "sigmoid":
        _, megatron_scores = compute_routing_scores_for_aux_loss(real, topk, "sigmoid")
        torch.testing.assert_close(grouped_pool_sigmoid_probs(real, None, 0), megatron_scores,
                                   rtol=1e-6, atol=1e-8)


def test_unknown_score_function_refused():
    real, null, _ = _logits(4, 8, seed=1)
    with pytest.raises(ValueError, match="'softmax' or 'sigmoid'; got 'sqrtsoftplus'"):
        _route(real, null, 8, 4, "sqrtsoftplus")
