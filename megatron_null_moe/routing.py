"""Routing math over the expanded pool of N real experts and M null copies (paper Sec. 3).

Pure functions, no process groups looked up. The M null copies share one logit, so they are
never materialised: top-K needs at most C = min(K, M) null columns, and the softmax over the
pool groups the copies into one column whose logit is z_null + log M.

Shape legend: T tokens, N real experts, K slots per token (top-K), G = N + 1 grouped pool
columns (N real experts, then all null copies as one group).
"""

import math
from typing import Optional, Tuple

import torch

from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func


def grouped_pool_logits(real_logits_TN: torch.Tensor, null_logit_T: Optional[torch.Tensor],
                        num_null_copies: int) -> torch.Tensor:
    """[T, G] logits for the losses only: softmax over them gives each real expert's pool
    probability and the null copies' total, and logsumexp over them equals logsumexp over all
    N + M pool logits. With M > 0 in at least fp32 (the null column adds log M); with M = 0
    the real logits themselves, as upstream's losses see them."""
    if num_null_copies == 0:
        return real_logits_TN
    dtype = selection_dtype(real_logits_TN.dtype)
    null_group_T1 = null_logit_T.to(dtype).unsqueeze(-1) + math.log(num_null_copies)
    return torch.cat([real_logits_TN.to(dtype), null_group_T1], dim=-1)


def selection_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """fp32 or wider: bf16/fp16 logits convert to it exactly, so comparing there selects
    exactly what comparing the router's own logits selects, ties included."""
    return torch.promote_types(logits_dtype, torch.float32)


def select_pool_slots(real_logits_TN: torch.Tensor, null_logit_T: Optional[torch.Tensor],
                      num_null_copies: int, topk: int,
                      null_selection_bias: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-K over the N + M pool without materialising the M copies.

    Ties break deterministically towards the lower pool index: real experts before null
    copies, lower expert index first (a stable sort, not torch.topk's unspecified order).
    null_selection_bias (scalar) is added to the null logit for the choice only.

    Returns:
        slot_logits_TK: logits of the selected slots, best first, in selection_dtype.
        slot_experts_TK (int64): selected real expert index, or N for a null slot.
    """
    num_tokens, num_experts = real_logits_TN.shape
    candidates = real_logits_TN.to(selection_dtype(real_logits_TN.dtype))
    null_columns = min(topk, num_null_copies)
    if null_columns > 0:
        null_T = null_logit_T.to(candidates.dtype)
        if null_selection_bias is not None:
            null_T = null_T + null_selection_bias.to(candidates.dtype)
        candidates = torch.cat(
            [candidates, null_T.unsqueeze(-1).expand(num_tokens, null_columns)], dim=-1
        )
    sorted_logits, sorted_index = torch.sort(candidates, dim=-1, descending=True, stable=True)
    slot_experts_TK = sorted_index[:, :topk].clamp(max=num_experts)
    return sorted_logits[:, :topk], slot_experts_TK


def renormalised_real_weights(slot_logits_TK: torch.Tensor, slot_is_real_TK: torch.Tensor
                              ) -> torch.Tensor:
    """Softmax over each token's selected real slots only (paper step 4), in fp32 or wider.

    w_i = p_i / sum of selected real p = exp(z_i) / sum over selected real exp(z_j). Null
    slots get 0; a token with no real slot gets 0 everywhere, with a finite zero gradient.
    """
    has_real_T1 = slot_is_real_TK.any(dim=-1, keepdim=True)
    masked = slot_logits_TK.to(selection_dtype(slot_logits_TK.dtype))
    masked = masked.masked_fill(~slot_is_real_TK, float("-inf"))
    # An all-null row would be softmax(-inf, ...) = NaN; give it finite logits, then zero it.
    masked = masked.masked_fill(~has_real_T1, 0.0)
    return torch.softmax(masked, dim=-1) * slot_is_real_TK


def slots_to_expert_map(slot_weights_TK: torch.Tensor, slot_experts_TK: torch.Tensor,
                        num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense [T, N] routing probs and bool routing map; null slots land in a dropped column."""
    num_tokens = slot_weights_TK.shape[0]
    probs_TG = slot_weights_TK.new_zeros(num_tokens, num_experts + 1)
    probs_TG = probs_TG.scatter(1, slot_experts_TK, slot_weights_TK)
    routed_TG = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool,
                            device=slot_experts_TK.device)
    routed_TG = routed_TG.scatter(1, slot_experts_TK, True)
    return probs_TG[:, :num_experts], routed_TG[:, :num_experts]


def finite_tokens(real_logits_TN: torch.Tensor, null_logit_T: Optional[torch.Tensor]
                  ) -> torch.Tensor:
    """[T] bool: every pool logit of the token is finite."""
    finite_T = torch.isfinite(real_logits_TN).all(dim=-1)
    if null_logit_T is not None:
        finite_T = finite_T & torch.isfinite(null_logit_T)
    return finite_T


def route_with_null_experts(real_logits_TN: torch.Tensor, null_logit_T: Optional[torch.Tensor],
                            num_null_copies: int, topk: int,
                            scaling_factor: Optional[float] = None,
                            null_selection_bias: Optional[torch.Tensor] = None):
    """Token-choice top-K over the N + M pool, null slots dropped, real weights renormalised.

    A token with a NaN or infinite logit is routed to its first min(K, N) real experts with
    NaN weights: its MoE output is NaN, so Megatron's NaN check on the loss stops training,
    where selecting on NaN would have made the token silently all-null (output 0). No host
    sync: the check is elementwise.

    Returns:
        probs_TN: routing weights in the logits' dtype, 0 where not routed.
        routing_map_TN (bool): token -> real expert assignments, between max(0, K - M) and
            min(K, N) per token.
        slot_experts_TK (int64): the selection, N marking a null slot (for losses and stats).
    """
    num_experts = real_logits_TN.shape[1]
    finite_T = finite_tokens(real_logits_TN, null_logit_T)
    # Non-finite tokens: real logits 0 (first experts win the stable sort), null at -inf.
    real_TN = real_logits_TN.masked_fill(~finite_T.unsqueeze(-1), 0.0)
    null_T = None if null_logit_T is None else null_logit_T.masked_fill(~finite_T, float("-inf"))
    slot_logits_TK, slot_experts_TK = select_pool_slots(
        real_TN, null_T, num_null_copies, topk, null_selection_bias
    )
    weights_TK = renormalised_real_weights(slot_logits_TK, slot_experts_TK < num_experts)
    weights_TK = weights_TK.masked_fill(~finite_T.unsqueeze(-1), float("nan"))
    if scaling_factor:
        weights_TK = weights_TK * scaling_factor
    probs_TN, routing_map_TN = slots_to_expert_map(
        weights_TK.to(real_logits_TN.dtype), slot_experts_TK, num_experts
    )
    return probs_TN, routing_map_TN, slot_experts_TK


def grouped_pool_probs(pool_logits_TG: torch.Tensor, num_null_copies: int) -> torch.Tensor:
    """[T, G] fp32 pool probabilities: p_i for each real expert and, in the last column
    (when M > 0), the probability of ONE null copy, p_null = exp(z_null) / sum over pool."""
    probs_TG = torch.softmax(pool_logits_TG, dim=-1, dtype=torch.float32)
    if num_null_copies == 0:
        return probs_TG
    return torch.cat([probs_TG[:, :-1], probs_TG[:, -1:] / num_null_copies], dim=-1)


def grouped_slot_counts(slot_experts_TK: torch.Tensor, num_experts: int,
                        num_null_copies: int) -> torch.Tensor:
    """[T, G] int: 1 for each selected real expert, and the number of null slots taken."""
    columns = num_experts + (1 if num_null_copies > 0 else 0)
    counts = torch.zeros(slot_experts_TK.shape[0], num_experts + 1, dtype=torch.int64,
                         device=slot_experts_TK.device)
    counts.scatter_add_(1, slot_experts_TK, torch.ones_like(slot_experts_TK))
    return counts[:, :columns]


def pool_load_balancing_loss(pool_probs_TG: torch.Tensor, slot_counts_G: torch.Tensor,
                             total_num_tokens, topk: int, pool_size: int,
                             coeff: float) -> torch.Tensor:
    """Switch balance loss over all N + M slots, the null copies handled as a group.

        L = coeff * (N+M) * sum_{i in pool} f_i P_i,
        f_i = count_i / (K T),  P_i = sum_t p_ti / T.

    The M copies share p_null, so their terms sum to P_null * (total null count): the grouped
    column (one copy's probability, total null count) gives the materialised pool's value.
    slot_counts_G are counted at the scope of the loss (micro-batch, sequence or global
    batch); pool_probs_TG are this rank's tokens.
    """
    return switch_load_balancing_loss_func(
        probs=pool_probs_TG,
        tokens_per_expert=slot_counts_G,
        total_num_tokens=total_num_tokens,
        topk=topk,
        num_experts=pool_size,
        moe_aux_loss_coeff=coeff,
    )


def real_experts_per_token(routing_map_TN: torch.Tensor) -> torch.Tensor:
    """[T] int64: how many real experts each token uses (0..K)."""
    return routing_map_TN.sum(dim=-1)
