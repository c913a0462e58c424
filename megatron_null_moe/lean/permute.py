"""Sync-free permutation of the real (token, expert) assignments into expert order.

Legend: T tokens, N experts, K slots per token (top-K, at most N of them real), R = T*K rows
of the worst-case buffer, H hidden size, E expert-parallel ranks, L local experts.

The expert-sorted buffer always has R rows, so no shape depends on how many slots are real
and nothing waits for the host: real assignments come first, grouped by expert and within an
expert by token (Megatron's ``permute`` order), null and unrouted slots after them ("spill
rows"). Spill rows read zeros on the way in; on the way out they are added into padding rows
that are dropped. Grouped GEMMs leave spill rows unwritten, so their contents are undefined:
they are routed to padding, never multiplied by a zero mask (garbage * 0 can be NaN).
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AssignmentOrder:
    """Where every slot sits in the expert-sorted buffer (all tensors on the device).

    expert_of_slot_TK: int64 [T, K], the expert of each slot in ascending order, N for a
        slot without a real expert.
    slot_of_row_R: int64 [R], the flat slot t*K+k that buffer row r holds.
    token_row_R: int64 [R], row of the padded token tensor [2T, H] that buffer row r reads
        from and adds into: its token t for a real row, T + (r mod T) for a spill row (spread
        so that no padding row collects more than K spill rows: no atomic hot spot).
    tokens_per_expert_N: int64 [N], real rows per expert; they fill the buffer's first rows.
    """

    expert_of_slot_TK: torch.Tensor
    slot_of_row_R: torch.Tensor
    token_row_R: torch.Tensor
    tokens_per_expert_N: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.expert_of_slot_TK.shape[0]


def slot_experts(routing_map_TN: torch.Tensor, topk: int) -> torch.Tensor:
    """[T, min(K, N)] int64: each token's routed experts in ascending order, N for the rest.

    routing_map_TN: bool [T, N] with at most K True per row (the router's output).
    """
    num_experts = routing_map_TN.shape[1]
    expert_ids = torch.arange(num_experts, device=routing_map_TN.device)
    keys_TN = torch.where(routing_map_TN, expert_ids, num_experts)
    return torch.topk(keys_TN, min(topk, num_experts), dim=1, largest=False, sorted=True).values


def sort_assignments(expert_of_slot_TK: torch.Tensor, num_experts: int) -> AssignmentOrder:
    """Stable device-side sort of the slots by expert; slots without an expert go last."""
    num_tokens, slots = expert_of_slot_TK.shape
    flat_R = expert_of_slot_TK.reshape(-1)
    slot_of_row_R = torch.argsort(flat_R, stable=True)
    real_row_R = flat_R.index_select(0, slot_of_row_R) < num_experts
    rows_R = torch.arange(flat_R.numel(), device=flat_R.device)
    spill_row_R = num_tokens + rows_R % max(num_tokens, 1)
    token_row_R = torch.where(real_row_R, slot_of_row_R // slots, spill_row_R)
    # scatter_add, not bincount: CUDA's bincount reads the maximum back to the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_R.device)
    counts.scatter_add_(0, flat_R, torch.ones_like(flat_R))
    return AssignmentOrder(expert_of_slot_TK, slot_of_row_R, token_row_R, counts[:num_experts])


def gather_rows(tokens_TH: torch.Tensor, order: AssignmentOrder,
                num_rows: Optional[int] = None) -> torch.Tensor:
    """[num_rows or R, H]: the first buffer rows' tokens, zeros for spill rows (which pass
    no gradient back)."""
    padded_2TH = torch.cat([tokens_TH, tokens_TH.new_zeros(tokens_TH.shape)])
    return padded_2TH.index_select(0, order.token_row_R[:num_rows])


def gather_probs(probs_TN: torch.Tensor, order: AssignmentOrder,
                 num_rows: Optional[int] = None) -> torch.Tensor:
    """[num_rows or R]: the first buffer rows' routing weights, 0 for spill rows (which pass
    no gradient back)."""
    num_experts = probs_TN.shape[1]
    expert_TK = order.expert_of_slot_TK
    probs_TK = probs_TN.gather(1, expert_TK.clamp(max=num_experts - 1))
    probs_TK = torch.where(expert_TK < num_experts, probs_TK, 0)
    return probs_TK.reshape(-1).index_select(0, order.slot_of_row_R[:num_rows])


def scatter_add_rows(rows_MH: torch.Tensor, order: AssignmentOrder) -> torch.Tensor:
    """[T, H]: each token's sum over its real rows; the first M rows of the buffer are given.

    Rows past the real count go to padding rows that are dropped, whatever they hold; their
    gradient is exactly zero.
    """
    num_tokens = order.num_tokens
    out_2TH = rows_MH.new_zeros(2 * num_tokens, rows_MH.shape[-1])
    out_2TH.index_add_(0, order.token_row_R[: rows_MH.shape[0]], rows_MH)
    return out_2TH[:num_tokens]


def grouped_offsets(tokens_per_group: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 [G]: end row of each group, as grouped GEMMs take them (``offs``)."""
    if tokens_per_group.device != device:  # counts from Megatron's dispatchers are on the host
        tokens_per_group = tokens_per_group.to(device=device, non_blocking=True)
    return torch.cumsum(tokens_per_group, dim=0).to(torch.int32)


def local_expert_order(counts_EL: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int64 [num_rows]: the order that sorts rows received by all-to-all by local expert.

    Rows arrive grouped by source rank, within it by local expert: counts_EL [E, L] rows.
    The result is stable (source rank order within an expert), like Megatron's chunk sort.
    num_rows must equal counts_EL.sum(); it is known on the host from the split sizes, so
    the expansion needs no device-to-host read.
    """
    num_local = counts_EL.shape[1]
    local_ids = torch.arange(num_local, device=counts_EL.device).repeat(counts_EL.shape[0])
    expert_of_row = torch.repeat_interleave(local_ids, counts_EL.reshape(-1),
                                            output_size=num_rows)
    return torch.argsort(expert_of_row, stable=True)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: x[order][inverse_order(order)] == x."""
    positions = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).scatter_(0, order, positions)
