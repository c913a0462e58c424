"""Megatron's real MoE layer with null experts, one process on the CPU."""

import pytest
import torch

from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.router import TopKRouter

from builders import build_moe_layer, expert_outputs, moe_config
from megatron_null_moe import NullExpertMoELayer, NullExpertRouter, pop_layer_statistics


def _hidden(num_tokens, hidden=16, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, 1, hidden, generator=generator).to(dtype)


def test_spec_builds_null_layer_and_router(parallel_state):
    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    assert isinstance(layer, NullExpertMoELayer)
    assert isinstance(layer.router, NullExpertRouter)
    assert layer.router.num_null_copies == 8 and tuple(layer.router.null_weight.shape) == (1, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rho_one_reproduces_upstream_topk_router(parallel_state, dtype):
    """Same probs, map, gradients and logged losses; bf16: logits in bf16 (router dtype
    unset), the losses computed on them as upstream does."""
    config = moe_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.05,
                        params_dtype=dtype, bf16=dtype == torch.bfloat16)
    upstream = TopKRouter(config=config, pg_collection=parallel_state).to(dtype)
    null = NullExpertRouter(config=config, pg_collection=parallel_state).to(dtype)
    assert null.null_weight is None
    null.weight.data.copy_(upstream.weight.data)
    upstream.set_layer_number(1)
    null.set_layer_number(1)
    results = []
    for router in (upstream, null):
        get_moe_metrics_tracker().clear()
        hidden = _hidden(24, dtype=dtype).requires_grad_(True)
        probs, routing_map = router(hidden)
        (probs * torch.arange(8.0)).sum().backward()
        metrics = {k: v.values.clone() for k, v in get_moe_metrics_tracker().metrics.items()}
        results.append((probs.detach(), routing_map, hidden.grad, router.weight.grad, metrics))
    (probs_a, map_a, dx_a, dw_a, m_a), (probs_b, map_b, dx_b, dw_b, m_b) = results
    assert torch.equal(map_a, map_b)
    torch.testing.assert_close(probs_b, probs_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw_b, dw_a, rtol=1e-5, atol=1e-7)
    assert set(m_a) == set(m_b) == {"load_balancing_loss", "z_loss"}
    for name in m_a:
        torch.testing.assert_close(m_b[name], m_a[name], rtol=1e-6, atol=1e-8)


def test_tokens_get_weighted_sum_of_their_real_experts(parallel_state):
    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    hidden = _hidden(40)
    with torch.no_grad():
        probs, routing_map = layer.router(hidden)
        output, _ = layer(hidden)
        expected = (probs.unsqueeze(-1) * expert_outputs(layer, hidden[:, 0])).sum(dim=1)
    real_per_token = routing_map.sum(-1)
    assert len(set(real_per_token.tolist())) > 1, "every token got the same number of experts"
    torch.testing.assert_close(output[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert torch.all(output[:, 0][real_per_token == 0] == 0)
    torch.testing.assert_close(probs.sum(-1)[real_per_token > 0],
                               torch.ones(int((real_per_token > 0).sum())))


def test_gradients_reach_the_null_row(parallel_state):
    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    layer.train()
    output, _ = layer(_hidden(32).requires_grad_(True))
    output.sum().backward()
    assert layer.router.null_weight.grad is not None
    assert layer.router.null_weight.grad.abs().sum() > 0


def _null_dominated_layer(config, null_scale):
    """A layer whose null logit beats every real logit by ``null_scale`` on positive inputs."""
    layer = build_moe_layer(config, real_fraction=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.null_weight.fill_(null_scale)
    return layer


def test_every_token_null(parallel_state):
    layer = _null_dominated_layer(moe_config(), null_scale=1.0)
    hidden = _hidden(16).abs().requires_grad_(True)
    output, _ = layer(hidden)
    assert torch.all(output == 0)
    output.sum().backward()
    assert torch.isfinite(layer.router.null_weight.grad).all()
    stats = pop_layer_statistics(layer)[1]
    assert stats.zero_real_fraction == 1.0 and stats.real_fraction == 0.0


def test_single_token_and_idle_experts(parallel_state):
    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    hidden = _hidden(1).requires_grad_(True)
    output, _ = layer(hidden)
    probs, routing_map = layer.router(hidden)
    expected = (probs.unsqueeze(-1) * expert_outputs(layer, hidden[:, 0])).sum(dim=1)
    torch.testing.assert_close(output[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert routing_map.sum() < 8  # most experts get no token
    output.sum().backward()
    assert torch.isfinite(hidden.grad).all()


def test_bf16_inputs_with_fp32_router(parallel_state):
    config = moe_config(params_dtype=torch.bfloat16, bf16=True, moe_router_dtype="fp32")
    layer = build_moe_layer(config, real_fraction=0.5).to(torch.bfloat16)
    hidden = _hidden(24, dtype=torch.bfloat16).requires_grad_(True)
    output, _ = layer(hidden)
    assert output.dtype == torch.bfloat16
    logits = layer.router.gating(hidden)
    assert logits.dtype == torch.float32
    output.float().sum().backward()
    assert torch.isfinite(hidden.grad.float()).all()


def test_statistics_count_real_experts_per_token(parallel_state):
    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    layer.train()
    hidden = _hidden(50)
    _, routing_map = layer.router(hidden)
    stats = pop_layer_statistics(layer)[1]
    counts = torch.bincount(routing_map.sum(-1), minlength=5).tolist()
    assert list(stats.real_experts_histogram) == counts
    assert stats.real_fraction == pytest.approx(routing_map.sum().item() / (50 * 4))
    assert stats.target_null_fraction == pytest.approx(0.5)
    assert pop_layer_statistics(layer)[1].num_tokens == 0  # popped


def _separated_inputs(num_tokens, hidden, num_experts, seed=3):
    """Each token points strongly at two experts: real logits ~3 for them, ~0 for the rest."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(num_experts, generator=generator)[:2]
                         for _ in range(num_tokens)])
    x = torch.zeros(num_tokens, hidden)
    x.scatter_(1, picks, 3.0)
    return (x + 0.05 * torch.randn(num_tokens, hidden, generator=generator)).unsqueeze(1)


def test_k4_half_reproduces_k2_exactly(parallel_state):
    """Paper Sec. 4.6: zero experts keep K2 rho=1 inside K4 rho=0.5's solution space."""
    k2 = build_moe_layer(moe_config(moe_router_topk=2), real_fraction=None, seed=5)
    k4 = build_moe_layer(moe_config(moe_router_topk=4), real_fraction=0.5, seed=6)
    k4.load_state_dict(k2.state_dict(), strict=False)
    with torch.no_grad():
        for router in (k2.router, k4.router):
            router.weight.copy_(torch.eye(8, 16))
        k4.router.null_weight.copy_(torch.full((1, 16), 0.25))  # null logit ~1.5: between
    hidden = _separated_inputs(30, 16, 8)
    with torch.no_grad():
        out2, _ = k2(hidden)
        out4, _ = k4(hidden)
        _, map4 = k4.router(hidden)
    assert torch.all(map4.sum(-1) == 2)
    torch.testing.assert_close(out4, out2, rtol=1e-6, atol=1e-7)


def test_capacity_factor_uses_expected_real_slots(parallel_state):
    layer = build_moe_layer(moe_config(moe_expert_capacity_factor=1.0), real_fraction=0.5)
    _, routing_map = layer.router(_hidden(64))
    # capacity = ceil(64 tokens * rho K = 2 / 8 experts * 1.0) = 16 (it would be 32 with K).
    assert routing_map.sum(0).max() <= 16
    output, _ = layer(_hidden(64))
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("scope", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_padding_tokens_are_left_out_of_losses_and_statistics(parallel_state, scope):
    """A batch with padded positions gives the losses and statistics of its valid tokens."""
    config = moe_config(moe_router_load_balancing_type=scope, moe_aux_loss_coeff=0.02)
    router = build_moe_layer(config, real_fraction=0.5).router
    router.train()
    valid = _hidden(12, seed=8).reshape(6, 2, 16)
    padded = torch.cat([valid, _hidden(8, seed=9).reshape(4, 2, 16)])  # 4 padded positions
    padding_mask = torch.zeros(10, 2, dtype=torch.bool)
    padding_mask[6:] = True
    values = []
    for hidden, mask in ((valid, None), (padded, padding_mask)):
        get_moe_metrics_tracker().clear()
        router.reset_global_aux_loss_tracker()
        router(hidden, padding_mask=mask)
        metrics = get_moe_metrics_tracker().metrics
        values.append({name: entry.values[0].item() for name, entry in metrics.items()})
        values[-1]["tokens"] = pop_layer_statistics(router)[1].num_tokens
    assert values[0]["tokens"] == values[1]["tokens"] == 12
    loss_name = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                 "global_aux_loss": "global_load_balancing_loss"}[scope]
    assert set(values[0]) == set(values[1]) and values[0][loss_name] > 0 and values[0]["z_loss"] > 0
    for name, value in values[0].items():
        assert values[1][name] == pytest.approx(value, rel=1e-5), name


def test_input_jitter_is_applied_as_upstream(parallel_state):
    """moe_input_jitter_eps multiplies the router input by U(1-eps, 1+eps) (upstream applies
    it in every mode)."""
    plain = build_moe_layer(moe_config(), real_fraction=0.5, seed=3).router
    jittered = build_moe_layer(moe_config(moe_input_jitter_eps=0.5), real_fraction=0.5,
                               seed=3).router
    hidden = _hidden(64)
    with torch.no_grad():
        reference = plain(hidden)[0]
        assert torch.equal(plain(hidden)[0], reference)
        assert not torch.equal(jittered(hidden)[0], reference)
        torch.manual_seed(0)
        noisy = jittered(hidden)[0]
        torch.manual_seed(0)
        factor = torch.distributions.Uniform(0.5, 1.5).rsample(hidden.shape)
        assert torch.equal(plain(hidden * factor)[0], noisy)


def test_ordinary_moe_state_dict_loads_with_null_row_at_mean_real_row(parallel_state):
    """'Add nulls to a trained MoE': the null row starts as the mean of the real rows."""
    upstream = build_moe_layer(moe_config(), real_fraction=None, seed=7)
    null = build_moe_layer(moe_config(), real_fraction=0.5, seed=8)
    null.load_state_dict(upstream.state_dict(), strict=True)
    torch.testing.assert_close(null.router.weight, upstream.router.weight)
    torch.testing.assert_close(null.router.null_weight,
                               upstream.router.weight.mean(dim=0, keepdim=True))
    saved = null.state_dict()  # a null-expert checkpoint keeps its own null row
    saved["router.null_weight"] = torch.full((1, 16), 0.3)
    null.load_state_dict(saved)
    assert torch.all(null.router.null_weight == 0.3)


def test_statistics_per_token_type(parallel_state):
    from megatron_null_moe import set_token_types

    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    layer.train()
    hidden = _hidden(12).reshape(6, 2, 16)  # [S, B, H]
    types_BS = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 0, 0, 1, 0, 0]])
    set_token_types(layer, types_BS, num_types=2)
    _, routing_map = layer.router(hidden)
    per_type = pop_layer_statistics(layer, by_type=True)[1]
    real = routing_map.sum(-1)  # router order: sequence-major
    types = types_BS.t().reshape(-1)
    for token_type, stats in enumerate(per_type):
        expected = torch.bincount(real[types == token_type], minlength=5).tolist()
        assert list(stats.real_experts_histogram) == expected
    set_token_types(layer, torch.zeros(3, 3, dtype=torch.long), num_types=2)
    with pytest.raises(ValueError, match=r"\(9,\) token types for 12 routed tokens"):
        layer.router(hidden)
    set_token_types(layer, None, num_types=1)
    layer.router(hidden)
    assert pop_layer_statistics(layer)[1].num_tokens == 12


@pytest.mark.parametrize("router_dtype", [None, "fp32", "fp64"])
def test_router_selects_the_pool_top_k_of_its_own_logits(parallel_state, router_dtype):
    """bf16 model, router dtype unset (logits in bf16, Megatron's default), fp32 or fp64:
    the routing map is the materialised N+M pool's top-K on the logits gating produced."""
    from reference import reference_route

    config = moe_config(params_dtype=torch.bfloat16, bf16=True, moe_router_dtype=router_dtype)
    router = build_moe_layer(config, real_fraction=0.5).router.to(torch.bfloat16)
    with torch.no_grad():
        router.null_weight.mul_(0.25)  # the null logit near the real ones: many boundary tokens
    hidden = _hidden(4096, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = router.gating(hidden).reshape(-1, 9)
        probs, routing_map = router(hidden)
    assert logits.dtype == {None: torch.bfloat16, "fp32": torch.float32,
                            "fp64": torch.float64}[router_dtype]
    ref_probs, ref_map, _ = reference_route(logits[:, :8], logits[:, 8], 8, 4)
    assert torch.equal(routing_map, ref_map)
    assert len(set(routing_map.sum(-1).tolist())) > 2
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("option,value", [
    ("moe_pad_expert_input_to_capacity", True), ("moe_router_pre_softmax", True),
    ("moe_router_score_function", "sqrtsoftplus"), ("moe_router_enable_expert_bias", True),
])
def test_options_switched_on_after_construction_are_refused_at_the_next_forward(
        parallel_state, option, value):
    """Megatron's own tests switch options on the config of a built router."""
    config = moe_config(moe_expert_capacity_factor=2.0)
    layer = build_moe_layer(config, real_fraction=0.5)
    hidden = _hidden(8)
    layer(hidden)
    setattr(config, option, value)
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag}.*allowed"):
        layer.router(hidden)
    with pytest.raises(ValueError, match=f"{flag}.*allowed"):
        layer(hidden)


def test_non_finite_router_input_makes_that_token_nan_not_zero(parallel_state):
    """NaN or inf in a token's hidden state: its MoE output is NaN (so Megatron's NaN check
    on the loss stops training); the other tokens' outputs do not change."""
    layer = build_moe_layer(moe_config(), real_fraction=0.5)
    hidden = _hidden(12)
    with torch.no_grad():
        clean, _ = layer(hidden)
        for value in (float("nan"), float("inf")):
            broken = hidden.clone()
            broken[3, 0, 5] = value
            output, _ = layer(broken)
            assert torch.isnan(output[3]).all()
            others = [t for t in range(12) if t != 3]
            # Not bit-equal: token 3 now goes to other experts, so the experts' GEMMs get
            # other row counts, which MKL rounds differently on some CPUs (AMD EPYC: up to
            # 5e-10, 7.6e-6 relative on a small element). fp32 (eps 1.2e-7) over sums of 16
            # and 32 terms: a few ulps of the output's scale.
            scale = float(clean[others].abs().max())
            torch.testing.assert_close(output[others], clean[others], rtol=1e-5,
                                       atol=1e-5 * scale)


def test_dropped_assignments_are_counted_apart_from_null_choices(parallel_state):
    """With a capacity factor, the real fraction is the routing's choice; drops are counted
    on their own, and FLOPs use chosen minus dropped."""
    layer = build_moe_layer(moe_config(moe_expert_capacity_factor=0.5), real_fraction=0.5)
    layer.train()
    hidden = _hidden(64)
    with torch.no_grad():
        logits = layer.router.gating(hidden).reshape(-1, 9)
    _, routing_map = layer.router(hidden)
    stats = pop_layer_statistics(layer)[1]
    from megatron_null_moe.routing import route_with_null_experts

    _, chosen, _ = route_with_null_experts(logits[:, :8], logits[:, 8], 8, 4)
    assert stats.real_slots == int(chosen.sum())
    assert stats.dropped_real_slots == int(chosen.sum() - routing_map.sum()) > 0
    assert stats.mean_computed_experts == pytest.approx(int(routing_map.sum()) / 64)


def test_real_assignments_per_expert_are_counted_before_drops(parallel_state):
    """Per real expert: the tokens the routing chose it for (padding left out), before the
    capacity drops, in training only; reset with the other counters."""
    from reference import reference_route

    layer = build_moe_layer(moe_config(moe_expert_capacity_factor=0.5), real_fraction=0.5)
    router = layer.router
    hidden = _hidden(64).reshape(32, 2, 16)
    padding_mask = torch.zeros(32, 2, dtype=torch.bool)
    padding_mask[28:] = True
    with torch.no_grad():
        router.eval()
        logits = router.gating(hidden).reshape(-1, 9)
        router(hidden)
    assert int(router.real_assignments_per_expert.sum()) == 0  # evaluation counts nothing
    router.train()
    _, routed_map = router(hidden, padding_mask=padding_mask)
    _, chosen_map, _ = reference_route(logits[:, :8], logits[:, 8], 8, 4)
    expected = chosen_map[~padding_mask.reshape(-1)].sum(dim=0)
    assert torch.equal(router.real_assignments_per_expert, expected)
    assert int(expected.sum()) > int(routed_map[~padding_mask.reshape(-1)].sum())  # drops
    assert int(expected.sum()) == pop_layer_statistics(layer)[1].real_slots
    assert int(router.real_assignments_per_expert.sum()) == 0  # popped with the rest
