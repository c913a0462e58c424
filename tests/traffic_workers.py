"""Rank bodies for the all-to-all traffic tests (module level, so spawn can pickle them)."""

import contextlib

import torch

from builders import build_moe_layer, moe_config_for
from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state
from megatron_null_moe.pool_routing import route_with_null_experts
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


@contextlib.contextmanager
def _sent_chunks():
    """Every all_to_all_single run inside, as (input rows, rows to each rank): what really
    leaves for each destination, whatever the dispatcher counted."""
    calls = []
    original = torch.distributed.all_to_all_single

    def logged(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
               **kwargs):
        calls.append((input.detach().clone(), [int(rows) for rows in input_split_sizes]))
        return original(output, input, output_split_sizes=output_split_sizes,
                        input_split_sizes=input_split_sizes, group=group, **kwargs)

    torch.distributed.all_to_all_single = logged
    try:
        yield calls
    finally:
        torch.distributed.all_to_all_single = original


def _rows_of_each_token_to_each_rank(tokens_TH, sent_RH, split_sizes):
    """[T, EP] rows of each token in each destination's chunk, matched by value (the
    tokens are random, so each row equals exactly one token)."""
    rows_TE = torch.zeros(tokens_TH.shape[0], len(split_sizes), dtype=torch.int64)
    for destination, chunk in enumerate(sent_RH.split(split_sizes)):
        match_RT = (chunk.unsqueeze(1) == tokens_TH.unsqueeze(0)).all(dim=-1)
        assert bool((match_RT.sum(dim=-1) == 1).all()), "a sent row is no single token"
        rows_TE[:, destination] = match_RT.sum(dim=0)
    return rows_TE


GROUPED_EXPERTS, GROUPED_TOPK = 16, 4


def group_limited_traffic(rank, world_size, cases, tokens_per_rank=32, hidden=16):
    """Forward of one null-expert MoE layer (rho 0.5, N = 16, K = 4, M = 16) per case
    (expert path, dtype, group_topk or None for no group limit) under EP = world_size, with
    moe_router_num_groups = EP: one group per EP rank. Every case of a path has the same
    weights and each rank the same tokens in every case.

    Returns per case: the reference [T, EP] real assignments of each token to each rank
    (routing map x expert-to-rank layout), the rows of each token the dispatch all-to-all
    really sent to each rank, the dispatcher's split sizes and counters, and the rows each
    rank receives from every rank."""
    parallel_sizes = {"expert_model_parallel_size": world_size}
    init_cpu_parallel_state(**parallel_sizes)
    try:
        results, weights = [], {}
        for expert_path, dtype, group_topk in cases:
            settings = dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
                            num_moe_experts=GROUPED_EXPERTS, moe_router_topk=GROUPED_TOPK)
            if group_topk is not None:
                settings.update(moe_router_num_groups=world_size, moe_router_group_topk=group_topk)
            if dtype == torch.bfloat16:
                settings.update(params_dtype=torch.bfloat16, bf16=True, moe_router_dtype="fp32")
            config = moe_config_for(parallel_sizes, **settings)
            layer = build_moe_layer(config, real_fraction=0.5, expert_path=expert_path).to(dtype)
            if expert_path in weights:
                layer.load_state_dict(weights[expert_path])
            else:
                weights[expert_path] = layer.state_dict()
            router = layer.router
            generator = torch.Generator().manual_seed(1000 + rank)
            hidden_states = torch.randn(tokens_per_rank // 2, 2, hidden, generator=generator)
            hidden_states = hidden_states.to(dtype)
            tokens_TH = hidden_states.reshape(-1, hidden)
            with torch.no_grad():
                with _sent_chunks() as calls:
                    layer(hidden_states)
                # The pure routing from the router's own logits, for the real slots' count.
                logits_TP = router.gating(tokens_TH).float()
                _, reference_map_TN, slot_experts_TK = route_with_null_experts(
                    logits_TP[:, :GROUPED_EXPERTS], logits_TP[:, GROUPED_EXPERTS],
                    router.num_null_copies, GROUPED_TOPK,
                    num_groups=config.moe_router_num_groups,
                    group_topk=config.moe_router_group_topk)
            dispatcher = layer.token_dispatcher
            routing_map_TN = dispatcher.routing_map
            # Expert -> EP rank, from every rank's own local experts.
            local_experts = [None] * world_size
            torch.distributed.all_gather_object(local_experts, list(layer.local_expert_indices))
            expert_rank_N = torch.empty(GROUPED_EXPERTS, dtype=torch.int64)
            for owner, experts in enumerate(local_experts):
                expert_rank_N[experts] = owner
            to_rank_NE = torch.nn.functional.one_hot(expert_rank_N, world_size)
            expected_TE = routing_map_TN.long() @ to_rank_NE
            sent_RH, wire_splits = calls[0]  # the dispatch's token rows go first
            assert sent_RH.shape[-1] == hidden and sent_RH.dtype == dtype
            rows_to = expected_TE.sum(dim=0)
            rows_from = rows_to.new_empty(world_size * world_size)
            torch.distributed.all_gather_into_tensor(rows_from, rows_to)
            traffic = alltoall_traffic(layer)[1]
            results.append({
                "expected_TE": expected_TE.tolist(),
                "wire_TE": _rows_of_each_token_to_each_rank(tokens_TH, sent_RH,
                                                            wire_splits).tolist(),
                "wire_splits": wire_splits,
                "input_splits": [int(rows) for rows in dispatcher.input_splits],
                "rows_from": rows_from.view(world_size, world_size)[:, rank].tolist(),
                "by_phase": {phase: list(traffic.bytes_by_phase[phase]) for phase in PHASES},
                "hidden_bytes": hidden * torch.finfo(dtype).bits // 8,
                "same_routing": bool(torch.equal(routing_map_TN.cpu(), reference_map_TN)),
                "real_slots": int((slot_experts_TK < GROUPED_EXPERTS).sum()),
                "slots": tokens_per_rank * GROUPED_TOPK,
            })
        return results
    finally:
        destroy_cpu_parallel_state()
