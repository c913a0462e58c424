"""LeanTokenDispatcher: sends and computes only real assignments without waiting on the host.

Megatron's dispatcher phases (``MoETokenDispatcher``), paired with LeanGroupedExperts:

- EP = 1: a device-side stable sort puts the real assignments of the [T, K] slots first, in
  a buffer of the worst-case R = T*K rows (``permute.py``); tokens per expert stay on the
  device and become the grouped GEMMs' offsets. No step reads anything back to the host.
- EP > 1: the same sort; then, as upstream's alltoall dispatcher does in its preprocessing,
  the per-expert counts are all-gathered over the EP group and read back once: the
  all-to-all needs its split sizes on the host. That is the only host wait. Exactly the real
  rows are sent; received rows are sorted by local expert on the device.

Legend: T tokens, H hidden, N experts, L local experts, E expert-parallel ranks.
"""

from typing import List, Optional

import torch

from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_null_moe.lean.permute import (
    AssignmentOrder,
    gather_probs,
    gather_rows,
    inverse_order,
    local_expert_order,
    scatter_add_rows,
    slot_experts,
    sort_assignments,
)
from megatron_null_moe.traffic import AllToAllTraffic


class LeanTokenDispatcher(MoETokenDispatcher):
    """Sync-free (EP = 1) or one-sync (EP > 1) dispatch of real assignments only.

    Its experts must accept an input with unused rows after the real ones and tokens per
    expert on the device (LeanGroupedExperts). Expert tensor parallelism is refused at build.
    """

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config,
                 pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.num_experts = config.num_moe_experts
        self.first_local_expert = local_expert_indices[0]
        self.topk = config.moe_router_topk
        self.order: Optional[AssignmentOrder] = None
        self.routing_map = None
        self.hidden_shape = None
        self.tokens_per_expert = None  # [L] on the device
        # EP > 1 only: host split sizes and the device counts [E, L] of received rows.
        self.input_splits: Optional[List[int]] = None
        self.output_splits: Optional[List[int]] = None
        self.received_counts_EL: Optional[torch.Tensor] = None
        self.local_order: Optional[torch.Tensor] = None
        self.alltoall_traffic = AllToAllTraffic()  # bytes over the EP group, see traffic.py

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """Sort the real assignments by expert: ([rows, H] tokens, [rows] routing weights).

        hidden_states [S, B, H]; routing_map bool [T, N]; probs [T, N]. rows = T*K with
        EP = 1, the real assignments' count with EP > 1 (after the split-size exchange).
        """
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        tokens_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.order = sort_assignments(slot_experts(routing_map, self.topk), self.num_experts)
        num_rows = None
        if self.ep_size > 1:
            num_rows = self._exchange_split_sizes(self.order.tokens_per_expert_N)
        else:
            self.tokens_per_expert = self.order.tokens_per_expert_N
        return (gather_rows(tokens_TH, self.order, num_rows),
                gather_probs(probs, self.order, num_rows))

    def _exchange_split_sizes(self, tokens_per_expert_N: torch.Tensor) -> int:
        """All-gather every rank's per-expert counts; returns the number of rows to send."""
        counts_EN = tokens_per_expert_N.new_empty(self.ep_size * self.num_experts)
        torch.distributed.all_gather_into_tensor(counts_EN, tokens_per_expert_N,
                                                 group=self.ep_group)
        counts_EN = counts_EN.view(self.ep_size, self.num_experts)
        local = slice(self.first_local_expert, self.first_local_expert + self.num_local_experts)
        self.received_counts_EL = counts_EN[:, local]
        self.tokens_per_expert = self.received_counts_EL.sum(dim=0)
        # The one host wait: all_to_all needs the split sizes on the host.
        counts = counts_EN.tolist()
        per_rank = self.num_local_experts
        self.input_splits = [sum(counts[self.ep_rank][rank * per_rank:(rank + 1) * per_rank])
                             for rank in range(self.ep_size)]
        self.output_splits = [sum(row[local]) for row in counts]
        return sum(self.input_splits)

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """All-to-all of the real rows over the EP group (nothing to do with EP = 1)."""
        if self.ep_size == 1:
            return hidden_states, probs
        received = (all_to_all(self.ep_group, hidden_states, self.output_splits, self.input_splits),
                    all_to_all(self.ep_group, probs, self.output_splits, self.input_splits))
        self.alltoall_traffic.record("dispatch", self.input_splits, self.output_splits,
                                     self.ep_rank, received)
        return received

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """(tokens sorted by local expert, tokens per local expert [L] on the device, probs)."""
        if self.ep_size > 1:
            self.local_order = local_expert_order(self.received_counts_EL,
                                                  sum(self.output_splits))
            hidden_states = hidden_states.index_select(0, self.local_order)
            probs = probs.index_select(0, self.local_order)
        return hidden_states, self.tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Back to the received order (EP > 1)."""
        if self.ep_size == 1:
            return hidden_states
        return hidden_states.index_select(0, inverse_order(self.local_order))

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """All-to-all back to the ranks the rows came from (nothing to do with EP = 1)."""
        if self.ep_size == 1:
            return hidden_states
        output = all_to_all(self.ep_group, hidden_states, self.input_splits, self.output_splits)
        self.alltoall_traffic.record("combine", self.output_splits, self.input_splits,
                                     self.ep_rank, (output,))
        return output

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[S, B, H]: each token's sum of its real experts' (already weighted) outputs."""
        output = scatter_add_rows(hidden_states, self.order)
        self.order = self.local_order = None
        return output.view(self.hidden_shape)
