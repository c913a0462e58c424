"""Small Megatron MoE layers for tests (inside the CPU harness, process groups initialised)."""

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_null_moe import NullExpertConfig, with_null_experts


def moe_config(**overrides) -> TransformerConfig:
    settings = dict(
        num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
        num_moe_experts=8, moe_router_topk=4, moe_token_dispatcher_type="alltoall",
        add_bias_linear=False, params_dtype=torch.float32,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=1e-3, use_cpu_initialization=True, moe_ffn_hidden_size=32,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def moe_config_for(parallel_sizes: dict, **overrides) -> TransformerConfig:
    """moe_config with the parallel sizes init_cpu_parallel_state was given."""
    return moe_config(
        tensor_model_parallel_size=parallel_sizes.get("tensor_model_parallel_size", 1),
        expert_model_parallel_size=parallel_sizes.get("expert_model_parallel_size", 1),
        expert_tensor_parallel_size=parallel_sizes.get("expert_tensor_parallel_size"),
        **overrides,
    )


def moe_layer_partial(null_config=None):
    """functools.partial(MoELayer | NullExpertMoELayer, submodules=...) from the local spec."""
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    if null_config is not None:
        spec = with_null_experts(spec, null_config)
    return spec.submodules.mlp


def build_moe_layer(config: TransformerConfig, real_fraction=None, seed=0, layer_number=1,
                    budget_control_rate=None):
    """Upstream MoELayer when real_fraction is None, else the null-expert layer."""
    torch.manual_seed(seed)
    null_config = None if real_fraction is None else NullExpertConfig(
        real_fraction=real_fraction, budget_control_rate=budget_control_rate)
    layer = moe_layer_partial(null_config)(config=config)
    layer.set_layer_number(layer_number)
    return layer


def expert_outputs(layer, hidden_TH: torch.Tensor) -> torch.Tensor:
    """[T, N, H]: every local expert applied to every token (the obviously right reference)."""
    outputs = [expert(hidden_TH)[0] for expert in layer.experts.local_experts]
    return torch.stack(outputs, dim=1)

