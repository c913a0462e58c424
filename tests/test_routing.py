"""The pure routing math against the materialised N + M pool."""

import pytest
import torch

from megatron_null_moe.routing import (
    grouped_pool_logits,
    grouped_pool_probs,
    grouped_slot_counts,
    pool_load_balancing_loss,
    route_with_null_experts,
)
from reference import reference_balance_loss, reference_route, reference_z_loss

CASES = [  # (N, M, K)
    (8, 8, 4),
    (8, 24, 2),
    (6, 2, 5),
    (4, 0, 2),
    (4, 12, 16),
]


def _logits(num_tokens, num_experts, ties, seed):
    generator = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties between real experts and with the null logit
        real = torch.randint(-2, 3, (num_tokens, num_experts), generator=generator).double()
        null = torch.randint(-2, 3, (num_tokens,), generator=generator).double()
    else:
        real = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
        null = torch.randn(num_tokens, generator=generator, dtype=torch.float64)
    return real, null


@pytest.mark.parametrize("num_experts,num_null,topk", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_routing_equals_materialised_pool(num_experts, num_null, topk, ties):
    if topk > num_experts + num_null:
        pytest.skip("top-K larger than the pool is refused by the config")
    real, null = _logits(64, num_experts, ties, seed=num_experts * 100 + topk)
    probs, routing_map, slots = route_with_null_experts(real, null, num_null, topk)
    ref_probs, ref_map, ref_order = reference_route(real, null, num_null, topk)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)  # weights in fp32
    assert torch.equal(slots, ref_order.clamp(max=num_experts))
    if ties and num_null and topk < num_experts + num_null:
        assert (routing_map.sum(-1) < min(topk, num_experts)).any(), "ties never hit a null"


def test_tokens_without_real_experts_get_zero_and_finite_gradient():
    real = torch.full((3, 4), -5.0, dtype=torch.float64, requires_grad=True)
    null = torch.tensor([0.0, -10.0, 0.0], dtype=torch.float64, requires_grad=True)
    probs, routing_map, _ = route_with_null_experts(real, null, num_null_copies=4, topk=2)
    assert routing_map[0].sum() == 0 and routing_map[2].sum() == 0
    assert torch.all(probs[0] == 0) and torch.all(probs[2] == 0)
    assert routing_map[1].sum() == 2
    (probs * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(real.grad).all() and torch.isfinite(null.grad).all()
    assert torch.all(real.grad[0] == 0)


@pytest.mark.parametrize("num_experts,num_null,topk", [c for c in CASES if c[2] <= c[0] + c[1]])
@pytest.mark.parametrize("ties", [False, True])
def test_balance_and_z_loss_and_gradients_equal_materialised_pool(num_experts, num_null, topk, ties):
    real, null = _logits(48, num_experts, ties, seed=7 + topk)
    real.requires_grad_(True)
    null.requires_grad_(True)
    coeff = 0.01
    grouped = grouped_pool_logits(real, null if num_null else None, num_null)
    _, _, slots = route_with_null_experts(real, null if num_null else None, num_null, topk)
    counts = grouped_slot_counts(slots, num_experts, num_null).sum(0)
    loss = pool_load_balancing_loss(
        grouped_pool_probs(grouped, num_null), counts, real.shape[0], topk,
        num_experts + num_null, coeff,
    )
    z_loss = coeff * torch.logsumexp(grouped, dim=-1).square().mean()
    ref_loss = reference_balance_loss(real, null, num_null, topk, coeff)
    ref_z = reference_z_loss(real, null, num_null, coeff)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(z_loss, ref_z, rtol=1e-12, atol=1e-12)

    grads = torch.autograd.grad(loss + z_loss, [real, null], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss + ref_z, [real, null], allow_unused=True)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=1e-5, atol=1e-9)
    if num_null:
        torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=1e-5, atol=1e-9)
        assert grads[1].abs().sum() > 0, "the null logit gets no gradient"


def test_router_weight_gradients_equal_materialised_rows():
    """W with N+1 rows (paper) vs the pool's N+M rows, the null row copied: same gradient
    (the null row's is the sum over its copies)."""
    torch.manual_seed(0)
    num_experts, num_null, topk, hidden = 6, 6, 4, 5
    x = torch.randn(32, hidden, dtype=torch.float64)
    weight = torch.randn(num_experts + 1, hidden, dtype=torch.float64, requires_grad=True)
    logits = x @ weight.t()
    real, null = logits[:, :num_experts], logits[:, num_experts]
    grouped = grouped_pool_logits(real, null, num_null)
    probs, _, slots = route_with_null_experts(real, null, num_null, topk)
    counts = grouped_slot_counts(slots, num_experts, num_null).sum(0)
    loss = pool_load_balancing_loss(grouped_pool_probs(grouped, num_null), counts, 32, topk,
                                    num_experts + num_null, 0.02)
    target = torch.randn(32, num_experts, dtype=torch.float64)
    total = loss + (probs * target).sum() + 1e-3 * torch.logsumexp(grouped, -1).square().mean()
    (grad,) = torch.autograd.grad(total, [weight])

    pool_weight = torch.cat([weight[:num_experts], weight[num_experts:].expand(num_null, -1)])
    pool_weight = pool_weight.detach().requires_grad_(True)
    pool_logits = x @ pool_weight.t()
    ref_probs, _, _ = reference_route(pool_logits[:, :num_experts].detach(),
                                      pool_logits[:, num_experts].detach(), num_null, topk)
    ref_total = (reference_balance_loss(pool_logits[:, :num_experts], pool_logits[:, num_experts],
                                        num_null, topk, 0.02)
                 + 1e-3 * torch.logsumexp(pool_logits, -1).square().mean())
    sel = ref_probs > 0
    renorm = torch.softmax(pool_logits[:, :num_experts].masked_fill(~sel, -1e30), -1) * sel
    ref_total = ref_total + (renorm * target).sum()
    (pool_grad,) = torch.autograd.grad(ref_total, [pool_weight])
    expected = torch.cat([pool_grad[:num_experts], pool_grad[num_experts:].sum(0, keepdim=True)])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)  # weights in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("num_experts,num_null,topk", [(8, 8, 4), (16, 48, 8), (6, 2, 5)])
def test_routing_in_low_precision_equals_materialised_pool_on_the_same_logits(
        dtype, num_experts, num_null, topk):
    """Selection on the router's own logits (no log M round trip), ties included."""
    generator = torch.Generator().manual_seed(num_experts + topk)
    real = (torch.randn(2048, num_experts, generator=generator) * 2).to(dtype)
    null = (torch.randn(2048, generator=generator) * 2).to(dtype)
    real[::7, 1] = null[::7]  # exact ties between a real expert and the null logit
    probs, routing_map, _ = route_with_null_experts(real, null, num_null, topk)
    ref_probs, ref_map, _ = reference_route(real, null, num_null, topk)
    assert torch.equal(routing_map, ref_map)
    assert probs.dtype == dtype
    tolerance = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-6)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=tolerance, atol=tolerance)


def test_selection_bias_moves_only_the_choice():
    """A bias b on the null logit selects as the pool with z_null + b; the weights are the
    renormalised real probabilities either way."""
    real, null = _logits(256, 8, ties=False, seed=3)
    for bias in (-0.7, 0.0, 0.45):
        probs, routing_map, slots = route_with_null_experts(
            real, null, 8, 4, null_selection_bias=torch.tensor([bias], dtype=torch.float64))
        ref_probs, ref_map, ref_order = reference_route(real, null + bias, 8, 4)
        assert torch.equal(routing_map, ref_map)
        assert torch.equal(slots, ref_order.clamp(max=8))
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    fewer = route_with_null_experts(real, null, 8, 4, null_selection_bias=torch.tensor([0.5]))[1]
    more = route_with_null_experts(real, null, 8, 4, null_selection_bias=torch.tensor([-0.5]))[1]
    assert fewer.sum() < route_with_null_experts(real, null, 8, 4)[1].sum() < more.sum()


def test_non_finite_logits_give_nan_weights_not_silent_nulls():
    """A token with a NaN or infinite logit gets NaN weights on real experts (its output is
    NaN, which Megatron's loss check catches); every other token routes as before."""
    real, null = _logits(8, 6, ties=False, seed=5)
    bad = {0: ("real", float("nan")), 1: ("real", float("inf")), 2: ("null", float("nan")),
           3: ("null", float("inf")), 4: ("real", float("-inf"))}
    for token, (where, value) in bad.items():
        if where == "real":
            real[token, 2] = value
        else:
            null[token] = value
    probs, routing_map, _ = route_with_null_experts(real, null, num_null_copies=6, topk=4)
    for token in bad:
        assert routing_map[token].sum() == 4 and torch.isnan(probs[token][routing_map[token]]).all()
    ref_probs, ref_map, _ = reference_route(real[5:], null[5:], 6, 4)
    assert torch.equal(routing_map[5:], ref_map)
    torch.testing.assert_close(probs[5:], ref_probs, rtol=1e-6, atol=1e-7)
