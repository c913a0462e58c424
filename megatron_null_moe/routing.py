"""Routing math over the expanded pool of N real experts and M null copies (paper Sec. 3).

Pure functions, no process groups looked up. The choice itself (top-K over the pool, weights
renormalised over the selected real experts) is in ``pool_routing``, which imports torch
alone so that exported models ship it; it is re-exported here. This module adds the losses:
the softmax over the pool groups the M null copies into one column whose logit is
z_null + log M.

Shape legend: T tokens, N real experts, K slots per token (top-K), G = N + 1 grouped pool
columns (N real experts, then all null copies as one group).
"""

import math
from typing import Optional

import torch

from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

from megatron_null_moe.pool_routing import (  # noqa: F401 (re-exported)
    route_with_null_experts,
    select_pool_slots,
    selection_dtype,
    selection_keys,
)


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


def grouped_pool_probs(pool_logits_TG: torch.Tensor, num_null_copies: int) -> torch.Tensor:
    """[T, G] fp32 pool probabilities: p_i for each real expert and, in the last column
    (when M > 0), the probability of ONE null copy, p_null = exp(z_null) / sum over pool."""
    probs_TG = torch.softmax(pool_logits_TG, dim=-1, dtype=torch.float32)
    if num_null_copies == 0:
        return probs_TG
    return torch.cat([probs_TG[:, :-1], probs_TG[:, -1:] / num_null_copies], dim=-1)


def grouped_pool_sigmoid_probs(real_logits_TN: torch.Tensor,
                                null_logit_T: Optional[torch.Tensor],
                                num_null_copies: int) -> torch.Tensor:
    """[T, G] fp32 pool probabilities for sigmoid scores, as upstream normalises them for its
    balance loss but over the N + M pool: s_i / (sum of real s + M s_null), s = sigmoid(z),
    and in the last column (when M > 0) ONE null copy's s_null over the same sum."""
    scores_TG = torch.sigmoid(real_logits_TN.float())
    if num_null_copies > 0:
        null_T1 = torch.sigmoid(null_logit_T.float()).unsqueeze(-1)
        total_T1 = scores_TG.sum(dim=-1, keepdim=True) + num_null_copies * null_T1
        return torch.cat([scores_TG, null_T1], dim=-1) / (total_T1 + 1e-20)
    return scores_TG / (scores_TG.sum(dim=-1, keepdim=True) + 1e-20)


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
