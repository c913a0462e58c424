"""Rank bodies for the all-to-all traffic tests (module level, so spawn can pickle them)."""

import torch

from builders import build_moe_layer, moe_config_for
from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state
from megatron_null_moe.traffic import (
    PHASES,
    alltoall_traffic,
    collect_alltoall_traffic,
    wire_log,
)


def _rows_to_each_rank(routing_map_TN, ep_size):
    """Real assignments of this rank's tokens per destination EP rank (the reference)."""
    return routing_map_TN.reshape(routing_map_TN.shape[0], ep_size, -1).sum(dim=(0, 2))


def layer_traffic(rank, world_size, cases, tokens_per_rank=24, hidden=16):
    """Forward + backward of one MoE layer per case (expert path, rho, dtype) under
    EP = world_size; returns per case the dispatcher's counts, the wire log, the reference
    rows (real assignments to and from each rank), row sizes, and the collected maxima/sums."""
    parallel_sizes = {"expert_model_parallel_size": world_size}
    init_cpu_parallel_state(**parallel_sizes)
    try:
        results = []
        for index, (expert_path, real_fraction, dtype) in enumerate(cases):
            settings = dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
            if dtype == torch.bfloat16:
                settings.update(params_dtype=torch.bfloat16, bf16=True, moe_router_dtype="fp32")
            config = moe_config_for(parallel_sizes, **settings)
            layer = build_moe_layer(config, real_fraction=real_fraction,
                                    expert_path=expert_path).to(dtype)
            generator = torch.Generator().manual_seed(100 * index + rank)
            hidden_states = torch.randn(tokens_per_rank // 2, 2, hidden, generator=generator)
            hidden_states = hidden_states.to(dtype).requires_grad_(True)
            with wire_log() as calls:
                output, _ = layer(hidden_states)
                output.float().sum().backward()
            counters = alltoall_traffic(layer)
            traffic = counters[1]
            rows_to = _rows_to_each_rank(layer.token_dispatcher.routing_map, world_size)
            rows_from = rows_to.new_empty(world_size * world_size)
            torch.distributed.all_gather_into_tensor(rows_from, rows_to)
            rows_from = rows_from.view(world_size, world_size)
            result = {
                "by_phase": {phase: list(traffic.bytes_by_phase[phase]) for phase in PHASES},
                "sent": traffic.sent, "received": traffic.received, "kept": traffic.kept,
                "wire": calls, "rows_to": rows_to.tolist(),
                "rows_from": rows_from[:, rank].tolist(),
                "hidden_bytes": hidden * torch.finfo(dtype).bits // 8,
                "slots": tokens_per_rank * config.moe_router_topk,
            }
            result["collected"] = collect_alltoall_traffic(counters, num_layers=1)[0].tolist()
            results.append(result)
        return results
    finally:
        destroy_cpu_parallel_state()
