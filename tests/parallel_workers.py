"""Rank bodies for the multi-process tests (module level, so spawn can pickle them)."""

import functools
import os

import torch

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from builders import build_moe_layer, moe_config, moe_config_for, named_expert_tensors
from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state
from megatron_null_moe.host_syncs import count_sync_ops


def run_moe_layer(rank, world_size, parallel_sizes, config_overrides, real_fraction, weights,
                  inputs, targets, expert_path="megatron"):
    """Forward + backward of one null-expert MoE layer on this rank's tokens.

    inputs/targets: per-rank lists of [S_rank, B, H]. weights: global parameter name ->
    tensor (an EP=1 layer's state, SequentialMLP names). Returns outputs, per-global-name
    grads, the rows the dispatcher permuted, sent and received, and (lean path) the calls
    after the router that would wait on the host.
    """
    init_cpu_parallel_state(**parallel_sizes)
    try:
        config = moe_config_for(parallel_sizes, **config_overrides)
        layer = build_moe_layer(config, real_fraction=real_fraction, expert_path=expert_path)
        with torch.no_grad():
            for name, tensor in named_expert_tensors(layer).items():
                tensor.copy_(weights[name])

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
        grads = {name: grad.clone() for name, grad in
                 named_expert_tensors(layer, "grads").items() if grad is not None}
        result = {"output": output.detach(), "input_grad": hidden.grad, "grads": grads,
                  "rows": rows}
        if expert_path == "lean":
            result["host_reads"] = _host_reads_after_router(layer, inputs[rank], targets[rank])
        return result
    finally:
        destroy_cpu_parallel_state()


def _host_reads_after_router(layer, hidden, target):
    """Would-be syncs of dispatch, experts and combine, forward and backward."""
    probs, routing_map = layer.router(hidden)

    def step():
        tokens, weights = layer.preprocess(hidden, probs, routing_map)
        tokens, weights = layer.dispatch(tokens, weights)
        output, _ = layer.routed_experts_compute(tokens, weights)
        (layer.postprocess(layer.combine(output), None) * target).sum().backward()

    return count_sync_ops(step)


def checkpoint_interchange(rank, world_size, directory):
    """Save an EP=world SequentialMLP layer and a lean one, then load each into the other
    layout. Returns the saved and loaded expert tensors by global name, per direction."""
    init_cpu_parallel_state(expert_model_parallel_size=world_size)
    try:
        config = moe_config(gated_linear_unit=True)
        build = functools.partial(build_moe_layer, config, real_fraction=0.5)
        sources = {"megatron": build(seed=1), "lean": build(seed=2, expert_path="lean")}
        targets = {"megatron": build(seed=3, expert_path="lean"), "lean": build(seed=4)}
        result = {}
        for name, source in sources.items():
            path = os.path.join(directory, name)
            if rank == 0:
                os.makedirs(path)
            torch.distributed.barrier()
            dist_checkpointing.save(source.sharded_state_dict(prefix="mlp."), path)
            target = targets[name]
            state = dist_checkpointing.load(target.sharded_state_dict(prefix="mlp."), path)
            target.load_state_dict({key[len("mlp."):]: value for key, value in state.items()})
            result[name] = {"saved": _cloned(named_expert_tensors(source)),
                            "loaded": _cloned(named_expert_tensors(target))}
        return result
    finally:
        destroy_cpu_parallel_state()


def load_into_single_rank(rank, world_size, directory):
    """A SequentialMLP null-expert layer on one rank, loaded from ``directory``."""
    init_cpu_parallel_state()
    try:
        layer = build_moe_layer(moe_config(gated_linear_unit=True), real_fraction=0.5, seed=5)
        state = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."), directory)
        layer.load_state_dict({key[len("mlp."):]: value for key, value in state.items()})
        return _cloned(named_expert_tensors(layer))
    finally:
        destroy_cpu_parallel_state()


def _cloned(tensors):
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


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
