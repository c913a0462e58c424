"""Small Megatron MoE layers for tests (inside the CPU harness, process groups initialised)."""

import re

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


def moe_layer_partial(null_config=None, expert_path="megatron"):
    """functools.partial(MoELayer | NullExpertMoELayer | LeanNullExpertMoELayer, ...) from the
    local spec."""
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    if null_config is not None:
        spec = with_null_experts(spec, null_config, expert_path=expert_path)
    return spec.submodules.mlp


def build_moe_layer(config: TransformerConfig, real_fraction=None, seed=0, layer_number=1,
                    budget_control_rate=None, expert_path="megatron", lean_buffer="auto",
                    expert_bias_rate=None):
    """Upstream MoELayer when real_fraction is None, else the null-expert layer on the given
    expert path ("megatron": SequentialMLP experts, "lean", with lean_buffer)."""
    torch.manual_seed(seed)
    null_config = None if real_fraction is None else NullExpertConfig(
        real_fraction=real_fraction, budget_control_rate=budget_control_rate,
        lean_buffer=lean_buffer, expert_bias_rate=expert_bias_rate)
    layer = moe_layer_partial(null_config, expert_path)(config=config)
    layer.set_layer_number(layer_number)
    return layer


def named_expert_tensors(layer, tensors="parameters"):
    """Parameters (or their grads, tensors="grads") by SequentialMLP's global names, for
    either expert layout: ``experts.local_experts.{global expert}.linear_fc1.weight`` etc.

    Lean experts' stacked weights [L, out, in] are split into per-expert views.
    """
    offset = layer.local_expert_indices[0]
    named = {}
    for name, param in layer.named_parameters():
        value = param if tensors == "parameters" else param.grad
        stacked = re.fullmatch(r"experts\.(linear_fc[12])\.weight", name)
        sequential = re.fullmatch(r"experts\.local_experts\.(\d+)\.(.*)", name)
        if stacked:
            for local in range(layer.num_local_experts):
                named[f"experts.local_experts.{offset + local}.{stacked[1]}.weight"] = (
                    None if value is None else value[local])
        elif sequential:
            named[f"experts.local_experts.{offset + int(sequential[1])}.{sequential[2]}"] = value
        else:
            named[name] = value
    return named


def expert_outputs(layer, hidden_TH: torch.Tensor) -> torch.Tensor:
    """[T, N, H]: every local expert applied to every token (the obviously right reference)."""
    outputs = [expert(hidden_TH)[0] for expert in layer.experts.local_experts]
    return torch.stack(outputs, dim=1)

