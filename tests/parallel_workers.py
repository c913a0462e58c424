"""Rank bodies for the multi-process tests (module level, so spawn can pickle them)."""

import re

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from builders import build_moe_layer, moe_config, moe_config_for
from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state


def _global_name(name: str, expert_offset: int) -> str:
    """Local expert j on this EP rank is global expert offset + j."""
    return re.sub(r"local_experts\.(\d+)\.",
                  lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", name)


def run_moe_layer(rank, world_size, parallel_sizes, config_overrides, real_fraction, weights,
                  inputs, targets):
    """Forward + backward of one null-expert MoE layer on this rank's tokens.

    inputs/targets: per-rank lists of [S_rank, B, H]. weights: global parameter name ->
    tensor (an EP=1 layer's state). Returns outputs, per-global-name grads and the rows the
    dispatcher permuted, sent and received.
    """
    init_cpu_parallel_state(**parallel_sizes)
    try:
        config = moe_config_for(parallel_sizes, **config_overrides)
        layer = build_moe_layer(config, real_fraction=real_fraction)
        expert_offset = layer.local_expert_indices[0]
        for name, param in layer.named_parameters():
            param.data.copy_(weights[_global_name(name, expert_offset)])

        rows = {}
        dispatch = layer.token_dispatcher.token_dispatch

        def counting_dispatch(tokens, probs):
            rows["sent"] = tokens.shape[0]
            received = dispatch(tokens, probs)
            rows["received"] = received[0].shape[0]
            return received

        layer.token_dispatcher.token_dispatch = counting_dispatch
        hidden = inputs[rank].clone().requires_grad_(True)
        output, _ = layer(hidden)
        rows["routed"] = int(layer.token_dispatcher.routing_map.sum())
        rows["slots"] = hidden.shape[0] * hidden.shape[1] * config.moe_router_topk
        (output * targets[rank]).sum().backward()
        grads = {_global_name(name, expert_offset): param.grad.clone()
                 for name, param in layer.named_parameters() if param.grad is not None}
        return {"output": output.detach(), "input_grad": hidden.grad, "grads": grads, "rows": rows}
    finally:
        destroy_cpu_parallel_state()


def global_balance_loss(rank, world_size, real_fraction, weights, inputs):
    """This rank's global-batch balance loss (as Megatron logs it, loss / coeff)."""
    init_cpu_parallel_state()
    try:
        config = moe_config(moe_router_load_balancing_type="global_aux_loss",
                            moe_aux_loss_coeff=0.02, moe_z_loss_coeff=None)
        layer = build_moe_layer(config, real_fraction=real_fraction)
        layer.load_state_dict(weights)
        layer.train()
        get_moe_metrics_tracker().clear()
        output, _ = layer(inputs[rank])
        output.sum().backward()
        loss = get_moe_metrics_tracker().metrics["global_load_balancing_loss"].values[0].item()
        counts = layer.router.global_tokens_per_expert.clone()
        layer.router.reset_global_aux_loss_tracker()
        return {"loss": loss, "counts": counts,
                "reset": float(layer.router.global_tokens_per_expert.abs().sum()),
                "dp_size": parallel_state.get_data_parallel_world_size()}
    finally:
        destroy_cpu_parallel_state()


def initial_weights(rank, world_size, config_overrides, real_fraction, seed=0):
    """Parameters of a freshly built EP=1 null-expert layer, by name."""
    init_cpu_parallel_state()
    try:
        layer = build_moe_layer(moe_config(**config_overrides), real_fraction=real_fraction,
                                seed=seed)
        return {name: param.detach().clone() for name, param in layer.named_parameters()}
    finally:
        destroy_cpu_parallel_state()
