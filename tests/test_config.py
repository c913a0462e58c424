"""Every refused configuration raises a ValueError naming the setting, flag and allowed values."""

import re

import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_null_moe.config import NullExpertConfig, validate_for_transformer_config


def moe_config(**overrides) -> TransformerConfig:
    settings = dict(
        num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=8,
        moe_router_topk=4, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
        params_dtype=torch.float32, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


@pytest.mark.parametrize("rho,num_experts,expected", [
    (1.0, 8, 0), (0.5, 64, 64), (0.25, 64, 192), (0.5, 8, 8), (0.2, 8, 32), (0.8, 8, 2),
])
def test_null_copies_derived_from_rho(rho, num_experts, expected):
    assert NullExpertConfig(real_fraction=rho).null_copies_for(num_experts) == expected


@pytest.mark.parametrize("copies", [18, 19])
def test_explicit_copies_round_rho_and_set_the_target(copies):
    """rho = 0.3 with 8 experts needs M = 18.67: M = 18 or 19 is taken, the target
    becomes N / (N + M)."""
    config = NullExpertConfig(real_fraction=0.3, num_null_copies=copies)
    assert config.null_copies_for(8) == copies
    assert config.pool_real_fraction(8) == pytest.approx(8 / (8 + copies))


@pytest.mark.parametrize("rho,copies,allowed", [(0.5, 0, "8"), (0.3, 20, "18 or 19"),
                                                (1.0, 4, "0"), (0.5, 9, "8")])
def test_copies_contradicting_rho_refused(rho, copies, allowed):
    config = NullExpertConfig(real_fraction=rho, num_null_copies=copies)
    with pytest.raises(ValueError, match=rf"--moe-num-null-experts={copies} contradicts "
                                         rf"--moe-null-expert-rho={rho}.*allowed: {allowed} "):
        config.null_copies_for(8)


@pytest.mark.parametrize("num_experts,topk,rho,expected", [
    (4, 6, 0.5, (2, 4)), (8, 4, 0.5, (0, 4)), (64, 8, 0.5, (0, 8)), (8, 2, 1.0, (2, 2)),
    (4, 2, 0.8, (1, 2)),
])
def test_real_experts_range(num_experts, topk, rho, expected):
    """A token uses between max(0, K - M) and min(K, N) real experts."""
    assert NullExpertConfig(rho).real_experts_range(num_experts, topk) == expected


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_budget_rate_refused(rate):
    with pytest.raises(ValueError, match="--moe-null-budget-rate"):
        NullExpertConfig(real_fraction=0.5, budget_control_rate=rate)


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_rho_outside_range_refused(rho):
    with pytest.raises(ValueError, match=r"--moe-null-expert-rho.*\(0, 1\]"):
        NullExpertConfig(real_fraction=rho)


@pytest.mark.parametrize("copies", [-1, 2.5, True])
def test_bad_explicit_copies_refused(copies):
    with pytest.raises(ValueError, match="--moe-num-null-experts"):
        NullExpertConfig(real_fraction=0.5, num_null_copies=copies)


def test_fractional_copies_refused_with_alternatives():
    with pytest.raises(ValueError, match=r"M = N\(1-rho\)/rho = 18\.67.*M=18.*M=19"):
        NullExpertConfig(real_fraction=0.3).null_copies_for(8)


def test_topk_larger_than_pool_refused():
    with pytest.raises(ValueError, match=r"--moe-router-topk.*N\+M = 8\+0 = 8 slots; allowed: 1\.\.8"):
        validate_for_transformer_config(NullExpertConfig(1.0), moe_config(moe_router_topk=9))
    assert validate_for_transformer_config(NullExpertConfig(0.5), moe_config(moe_router_topk=9)) == 8


REFUSED = [
    (dict(moe_router_score_function="sqrtsoftplus"), "--moe-router-score-function"),
    (dict(moe_router_pre_softmax=True), "--moe-router-pre-softmax"),
    (dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
     "--moe-router-load-balancing-type"),
    (dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
     "--moe-pad-expert-input-to-capacity"),
    (dict(moe_enable_routing_replay=True), "--moe-enable-routing-replay"),
    (dict(moe_router_force_biased=1.0), "--moe-router-force-biased"),
]


@pytest.mark.parametrize("overrides,flag", REFUSED)
def test_unsupported_megatron_options_refused(overrides, flag):
    try:
        config = moe_config(**overrides)
    except (ValueError, AssertionError) as error:  # Megatron itself refused the combination
        pytest.skip(f"Megatron refuses this config on its own: {error}")
    with pytest.raises(ValueError, match=flag) as raised:
        validate_for_transformer_config(NullExpertConfig(real_fraction=0.5), config)
    assert "allowed" in str(raised.value)


def test_sigmoid_scores_groups_and_expert_bias_accepted():
    config = moe_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_num_groups=4, moe_router_group_topk=2)
    assert validate_for_transformer_config(NullExpertConfig(real_fraction=0.5), config) == 8
    assert NullExpertConfig(0.5, expert_bias_rate=1e-3).expert_bias_rate == 1e-3


@pytest.mark.parametrize("groups,chosen,allowed", [
    (3, 1, "num_groups dividing --num-experts=8"),
    (4, 5, "1 <= group_topk <= num_groups"),
    (4, 3, "a divisor of --moe-router-topk=4"),
    (8, 1, "topk/group_topk <= 1 experts per group"),
])
def test_bad_groups_refused(groups, chosen, allowed):
    config = moe_config()
    object.__setattr__(config, "moe_router_num_groups", groups)
    object.__setattr__(config, "moe_router_group_topk", chosen)
    with pytest.raises(ValueError, match=f"--moe-router-(num-groups|group-topk).*allowed: "
                                         f".*{re.escape(allowed)}"):
        validate_for_transformer_config(NullExpertConfig(real_fraction=0.5), config)


@pytest.mark.parametrize("rate", [0.0, -1e-3, float("inf"), True])
def test_bad_expert_bias_rate_refused(rate):
    with pytest.raises(ValueError, match="--moe-router-bias-update-rate"):
        NullExpertConfig(0.5, expert_bias_rate=rate)


def test_no_experts_refused():
    config = moe_config()
    object.__setattr__(config, "num_moe_experts", None)
    with pytest.raises(ValueError, match="--num-experts"):
        validate_for_transformer_config(NullExpertConfig(real_fraction=0.5), config)


def test_router_fusion_refused():
    config = moe_config()
    object.__setattr__(config, "moe_router_fusion", True)
    with pytest.raises(ValueError, match="--moe-router-fusion"):
        validate_for_transformer_config(NullExpertConfig(real_fraction=0.5), config)
