"""LeanTokenDispatcher: sends and computes only real assignments, waiting on the host only
where the count is there anyway.

Megatron's dispatcher phases (``MoETokenDispatcher``), paired with LeanGroupedExperts:

- A device-side stable sort puts the real assignments of the [T, K] slots first, in
  Megatron's order (``permute.py``); tokens per expert stay on the device and become the
  grouped GEMMs' offsets.
- EP = 1, buffers (``--moe-null-lean-buffer``, NullExpertConfig.lean_buffer):
  "worst-case" holds all R = T*K rows, and no step reads anything back to the host (a GPU
  can capture the layer in a CUDA graph); the null slots' rows are carried through the
  gathers, the activation, the routing-weight multiply and their backward. "real-rows"
  reads the real count on the host and holds only the real rows: one sync per layer and
  micro-batch on a GPU, free for CPU tensors. "auto" (default): real-rows for CPU tensors,
  worst-case on a GPU.
- EP > 1: as upstream's alltoall dispatcher does in its preprocessing, the per-expert counts
  are all-gathered over the EP group and read back once: the all-to-all needs its split
  sizes on the host. That is the only host wait, and it gives the real count: only real rows
  are gathered, sent and computed, whatever the buffer setting. Received rows are sorted by
  local expert on the device.

Legend: T tokens, H hidden, N experts, L local experts, E expert-parallel ranks.
"""

from typing import List, Optional

import torch

from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_null_moe.config import LEAN_BUFFER_FLAG, LEAN_BUFFERS
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
    """Dispatch of real assignments with at most one host wait (none: EP = 1, worst-case).

    Its experts must accept an input with unused rows after the real ones and tokens per
    expert on the device (LeanGroupedExperts). Expert tensor parallelism is refused at build.
    lean_buffer: one of config.LEAN_BUFFERS (see the module docstring).
    """

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config,
                 pg_collection=None, lean_buffer: str = "auto"):
        super().__init__(config=config, pg_collection=pg_collection)
        if lean_buffer not in LEAN_BUFFERS:
            raise ValueError(f"lean_buffer ({LEAN_BUFFER_FLAG})={lean_buffer!r}; allowed: "
                             f"{', '.join(LEAN_BUFFERS)}.")
        self.lean_buffer = lean_buffer
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

        hidden_states [S, B, H]; routing_map bool [T, N]; probs [T, N]. rows = T*K for the
        worst-case buffer, else the real assignments' count.
        """
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        tokens_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        order = sort_assignments(slot_experts(routing_map, self.topk), self.num_experts)
        if self.ep_size > 1:
            order = order.real_rows(self._exchange_split_sizes(order.tokens_per_expert_N))
        else:
            self.tokens_per_expert = order.tokens_per_expert_N
            if self.holds_real_rows_only(tokens_TH.device):
                # The one host read of this mode: the buffers' size (free for CPU tensors).
                order = order.real_rows(int(order.tokens_per_expert_N.sum()))
        self.order = order
        return gather_rows(tokens_TH, order), gather_probs(probs, order)

    def holds_real_rows_only(self, device: torch.device) -> bool:
        """Whether the buffers at EP = 1 hold the real rows only (the count read on the host)
        rather than the worst case of T*K rows (no host read)."""
        if self.lean_buffer == "auto":
            return device.type == "cpu"
        return self.lean_buffer == "real-rows"

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
