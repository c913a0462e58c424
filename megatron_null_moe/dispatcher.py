"""Null-aware token dispatchers: only real assignments are permuted, sent and computed.

Upstream's dispatchers assume every token has exactly K experts. With null experts a token
has between 0 and K, so each subclass overrides the one place that assumption lives.
"""

import logging

import torch

from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
    MoEFlexTokenDispatcher,
)

from megatron_null_moe.process_groups import is_rank_zero
from megatron_null_moe.traffic import AllToAllTraffic

logger = logging.getLogger(__name__)


def mask_unrouted_slots(token_indices_TK: torch.Tensor, routing_map_TE: torch.Tensor
                        ) -> torch.Tensor:
    """-1 for every top-K slot whose expert the token is not routed to.

    DeepEP-style managers rebuild [T, K] indices from the probs with torch.topk; with fewer
    than K real experts the extra ("phantom") slots point at arbitrary experts with weight 0
    and would still be sent. Upstream masks them only when a capacity factor is set.
    """
    routed = routing_map_TE.gather(1, token_indices_TK.clamp(min=0))
    return token_indices_TK.masked_fill(~routed | (token_indices_TK < 0), -1)


class NullAwareAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Alltoall dispatcher whose dropless output size is the number of real assignments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alltoall_traffic = AllToAllTraffic()  # bytes over the EP group, see traffic.py

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        if self.config.moe_router_padding_for_quantization:
            # Upstream pads the routing map in place; the router's map must stay untouched.
            routing_map = routing_map.clone()
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_expert = super().preprocess(routing_map)
        if not self.drop_and_pad:
            # Upstream's dropless size is tokens * K; with nulls it is the routed count, known
            # only on the device: the permutation allocates it, so the host must wait for it.
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_expert

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        tokens, probs = super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        if self.ep_size > 1:  # the split sizes are on the host from here on
            self.alltoall_traffic.record("dispatch", self.input_splits, self.output_splits,
                                         self.ep_rank, (tokens, probs))
        return tokens, probs

    def token_combine(self, hidden_states, *args, **kwargs):
        output = super().token_combine(hidden_states, *args, **kwargs)
        if self.ep_size > 1:
            self.alltoall_traffic.record("combine", self.output_splits, self.input_splits,
                                         self.ep_rank, (output,))
        return output


class NullAwareFlexTokenDispatcher(MoEFlexTokenDispatcher):
    """Flex (DeepEP / NCCL EP / HybridEP) dispatcher that never sends null slots."""

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        hidden_states, token_probs = super().dispatch_preprocess(hidden_states, routing_map, probs)
        manager = self._comm_manager
        if getattr(manager, "token_indices", None) is not None:
            # Same [T, world * local experts] layout the manager took its top-K indices from.
            expanded_map, _ = self._initialize_metadata(routing_map, probs)
            manager.token_indices = mask_unrouted_slots(
                manager.token_indices, expanded_map.reshape(expanded_map.shape[0], -1)
            )
        return hidden_states, token_probs


_allgather_warned = False


def warn_allgather_saves_no_communication() -> None:
    """Say once per process (printed by rank 0) that allgather sends every token."""
    global _allgather_warned
    if _allgather_warned:
        return
    _allgather_warned = True
    if is_rank_zero():
        logger.warning(
            "Null experts with --moe-token-dispatcher-type allgather: results are correct and "
            "expert FLOPs are saved, but allgather gathers every token regardless of routing, "
            "so null slots save no communication; use alltoall or flex."
        )


class NullAwareAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """Allgather dispatcher: correct with null experts, but it gathers every token anyway."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        warn_allgather_saves_no_communication()


NULL_AWARE_DISPATCHERS = {
    "alltoall": NullAwareAlltoAllTokenDispatcher,
    "flex": NullAwareFlexTokenDispatcher,
    "allgather": NullAwareAllGatherTokenDispatcher,
}
