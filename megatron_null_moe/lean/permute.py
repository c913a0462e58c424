"""Sync-free permutation of the real (token, expert) assignments into expert order.

Legend: T tokens, N experts, K slots per token (top-K, at most N of them real), R = T*K rows
of the worst-case buffer, H hidden size, E expert-parallel ranks, L local experts.

``sort_assignments`` orders the [T, K] slots on the device: real assignments first, grouped by
expert and within an expert by token (Megatron's ``permute`` order), null and unrouted slots
after them ("spill rows"). The gathers then fill one of two buffers:

- the worst case, all R rows (the sorted order as it is): no shape depends on how many slots
  are real, so nothing waits for the host. Spill rows read zeros on the way in; on the way
  out they are added into padding rows that are dropped. Grouped GEMMs leave spill rows
  unwritten, so their contents are undefined: they are routed to padding, never multiplied by
  a zero mask (garbage * 0 can be NaN).
- the real rows only (``order.real_rows(count)``), when the host knows how many there are
  (the lean dispatcher says where it does): no spill rows, no padding.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AssignmentOrder:
    """Where every buffer row comes from (tensors on the device).

    token_row_R: int64 [R], the row of the tokens [T, H] that buffer row r reads from and
        adds into: its token for a real row; for a spill row T + (r mod T), a row of zero
        padding (spread so that no padding row collects more than K spill rows: no atomic
        hot spot).
    prob_index_R: int64 [R], the flat index t*N + e of a real row's routing weight in the
        probs [T, N]; T*N, a zero past the end, for a spill row.
    tokens_per_expert_N: int64 [N], real rows per expert; they fill the buffer's first rows.
    num_tokens: T.
    has_spill_rows: False once cut to the real rows (``real_rows``).
    """

    token_row_R: torch.Tensor
    prob_index_R: torch.Tensor
    tokens_per_expert_N: torch.Tensor
    num_tokens: int
    has_spill_rows: bool = True

    @property
    def num_rows(self) -> int:
        return self.token_row_R.shape[0]

    def real_rows(self, count: int) -> "AssignmentOrder":
        """This order cut to its first ``count`` rows: the real ones, count read on the host
        (tokens_per_expert_N.sum())."""
        return AssignmentOrder(self.token_row_R[:count], self.prob_index_R[:count],
                               self.tokens_per_expert_N, self.num_tokens, has_spill_rows=False)


def slot_experts(routing_map_TN: torch.Tensor, topk: int) -> torch.Tensor:
    """[T, min(K, N)] int64: each token's routed experts in ascending order, N for the rest.

    routing_map_TN: bool [T, N] with at most K True per row (the router's output).
    """
    num_experts = routing_map_TN.shape[1]
    expert_ids = torch.arange(num_experts, device=routing_map_TN.device)
    keys_TN = torch.where(routing_map_TN, expert_ids, num_experts)
    return torch.topk(keys_TN, min(topk, num_experts), dim=1, largest=False, sorted=True).values


def sort_assignments(expert_of_slot_TK: torch.Tensor, num_experts: int) -> AssignmentOrder:
    """Stable device-side sort of the slots by expert; slots without an expert go last.

    expert_of_slot_TK: int64 [T, K], each slot's expert, N for a slot without one.
    """
    num_tokens, slots = expert_of_slot_TK.shape
    flat_R = expert_of_slot_TK.reshape(-1)
    slot_of_row_R = torch.argsort(flat_R, stable=True)
    expert_of_row_R = flat_R.index_select(0, slot_of_row_R)
    real_row_R = expert_of_row_R < num_experts
    token_of_row_R = slot_of_row_R // slots
    rows_R = torch.arange(flat_R.numel(), device=flat_R.device)
    spill_row_R = num_tokens + rows_R % max(num_tokens, 1)
    token_row_R = torch.where(real_row_R, token_of_row_R, spill_row_R)
    prob_index_R = torch.where(real_row_R, token_of_row_R * num_experts + expert_of_row_R,
                               num_tokens * num_experts)
    # scatter_add, not bincount: CUDA's bincount reads the maximum back to the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_R.device)
    counts.scatter_add_(0, flat_R, torch.ones_like(flat_R))
    return AssignmentOrder(token_row_R, prob_index_R, counts[:num_experts], num_tokens)


def gather_rows(tokens_TH: torch.Tensor, order: AssignmentOrder) -> torch.Tensor:
    """[rows, H]: each buffer row's token; zeros for spill rows (which pass no gradient back)."""
    if order.has_spill_rows:
        tokens_TH = torch.cat([tokens_TH, tokens_TH.new_zeros(tokens_TH.shape)])
    return tokens_TH.index_select(0, order.token_row_R)


def gather_probs(probs_TN: torch.Tensor, order: AssignmentOrder) -> torch.Tensor:
    """[rows]: each buffer row's routing weight; 0 for spill rows (their gradient goes to the
    dropped zero past the end, whatever it holds)."""
    flat_probs = probs_TN.reshape(-1)
    if order.has_spill_rows:
        flat_probs = torch.cat([flat_probs, flat_probs.new_zeros(1)])
    return flat_probs.index_select(0, order.prob_index_R)


def scatter_add_rows(rows_MH: torch.Tensor, order: AssignmentOrder) -> torch.Tensor:
    """[T, H]: each token's sum over its real rows; rows_MH holds the order's rows.

    Spill rows go to padding rows that are dropped, whatever they hold; their gradient is
    exactly zero.
    """
    num_tokens = order.num_tokens
    padded_rows = 2 * num_tokens if order.has_spill_rows else num_tokens
    out_TH = rows_MH.new_zeros(padded_rows, rows_MH.shape[-1])
    out_TH.index_add_(0, order.token_row_R, rows_MH)
    return out_TH[:num_tokens]


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
