"""Token-choice routing over the pool of N real experts and M null copies (paper Sec. 3).

Which slots each token takes and the weights of its real experts, as pure functions: the
M null copies share one logit, so they are never materialised (top-K needs at most
C = min(K, M) null columns). Imports torch alone: the Hugging Face export writes this file
beside its modeling code, so an exported model routes with this very code (routing.py adds
the losses, which need Megatron).

Shape legend: T tokens, N real experts, K slots per token (top-K), G groups (node-limited
routing), E experts per group.
"""

from typing import Optional, Tuple

import torch


def selection_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """fp32 or wider: bf16/fp16 logits convert to it exactly, so comparing there selects
    exactly what comparing the router's own logits selects, ties included."""
    return torch.promote_types(logits_dtype, torch.float32)


def selection_keys(real_logits_TN: torch.Tensor, null_logit_T: Optional[torch.Tensor],
                   score_function: str = "softmax",
                   expert_bias_N: Optional[torch.Tensor] = None,
                   null_selection_bias: Optional[torch.Tensor] = None):
    """What top-K compares, in selection_dtype: real [T, N] and null [T] (None without nulls).

    softmax: the logits (the pool's probabilities up to each token's common denominator);
    sigmoid: the scores sigmoid(z), as upstream selects. expert_bias_N is added to the real
    keys (to the logits with softmax, to the scores with sigmoid, as upstream adds it), and
    null_selection_bias to the null logit (before the sigmoid): both move the choice only.
    """
    dtype = selection_dtype(real_logits_TN.dtype)
    real_TN = real_logits_TN.to(dtype)
    null_T = None if null_logit_T is None else null_logit_T.to(dtype)
    if null_T is not None and null_selection_bias is not None:
        null_T = null_T + null_selection_bias.to(dtype)
    if score_function == "sigmoid":
        real_TN = torch.sigmoid(real_TN)
        null_T = None if null_T is None else torch.sigmoid(null_T)
    elif score_function != "softmax":
        raise ValueError(f"score_function must be 'softmax' or 'sigmoid'; got {score_function!r}")
    if expert_bias_N is not None:
        real_TN = real_TN + expert_bias_N.to(dtype)
    return real_TN, null_T


def limit_to_groups(real_keys_TN: torch.Tensor, topk: int, num_groups: int, group_topk: int
                    ) -> torch.Tensor:
    """Real keys outside each token's group_topk best groups set to -inf (node-limited
    routing). Groups are consecutive blocks of N / num_groups experts, scored as upstream
    scores them: the sum of their topk // group_topk best keys. Null copies belong to no
    group: their key is untouched, so they stay eligible."""
    num_tokens, num_experts = real_keys_TN.shape
    grouped_TGE = real_keys_TN.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores_TG = grouped_TGE.topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    chosen_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter(
        1, group_scores_TG.topk(group_topk, dim=-1, sorted=False)[1], True)
    outside_TGE = ~chosen_TG.unsqueeze(-1).expand_as(grouped_TGE)
    return real_keys_TN.masked_fill(outside_TGE.reshape(num_tokens, num_experts), float("-inf"))


def select_pool_slots(real_keys_TN: torch.Tensor, null_key_T: Optional[torch.Tensor],
                      num_null_copies: int, topk: int) -> torch.Tensor:
    """Top-K over the N + M pool without materialising the M copies: [T, K] int64, the
    selected real expert index, or N for a null slot, best first.

    The inputs are the keys compared (selection_keys: biases already added). Ties break
    deterministically towards the lower pool index: real experts before null copies, lower
    expert index first (a stable sort, not torch.topk's unspecified order).
    """
    num_tokens, num_experts = real_keys_TN.shape
    candidates = real_keys_TN.to(selection_dtype(real_keys_TN.dtype))
    null_columns = min(topk, num_null_copies)
    if null_columns > 0:
        null_T = null_key_T.to(candidates.dtype)
        candidates = torch.cat(
            [candidates, null_T.unsqueeze(-1).expand(num_tokens, null_columns)], dim=-1
        )
    sorted_index = torch.sort(candidates, dim=-1, descending=True, stable=True).indices
    return sorted_index[:, :topk].clamp(max=num_experts)


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


def renormalised_real_sigmoid_weights(slot_logits_TK: torch.Tensor,
                                      slot_is_real_TK: torch.Tensor) -> torch.Tensor:
    """sigmoid(z_i) over the sum of the selected real experts' sigmoids, as upstream
    normalises over its K (with its 1e-20 guard: a token with no real slot gets 0)."""
    scores_TK = torch.sigmoid(slot_logits_TK.to(selection_dtype(slot_logits_TK.dtype)))
    scores_TK = scores_TK * slot_is_real_TK
    return scores_TK / (scores_TK.sum(dim=-1, keepdim=True) + 1e-20)


def real_slot_weights(real_logits_TN: torch.Tensor, null_logit_T: Optional[torch.Tensor],
                      slot_experts_TK: torch.Tensor, score_function: str = "softmax"
                      ) -> torch.Tensor:
    """[T, K] weights of the selected slots from their unbiased logits: renormalised over
    the selected real experts (paper step 4); null slots 0, with a zero gradient to the null
    logit. With sigmoid and K = 1 the score itself, unnormalised, as upstream."""
    num_experts = real_logits_TN.shape[1]
    pool_TG = real_logits_TN.to(selection_dtype(real_logits_TN.dtype))
    if null_logit_T is not None:
        pool_TG = torch.cat([pool_TG, null_logit_T.to(pool_TG.dtype).unsqueeze(-1)], dim=-1)
    slot_is_real_TK = slot_experts_TK < num_experts
    slot_logits_TK = pool_TG.gather(1, slot_experts_TK.clamp(max=pool_TG.shape[1] - 1))
    if score_function == "softmax":
        return renormalised_real_weights(slot_logits_TK, slot_is_real_TK)
    if slot_experts_TK.shape[1] == 1:
        return torch.sigmoid(slot_logits_TK) * slot_is_real_TK
    return renormalised_real_sigmoid_weights(slot_logits_TK, slot_is_real_TK)


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
                            null_selection_bias: Optional[torch.Tensor] = None, *,
                            score_function: str = "softmax",
                            expert_bias: Optional[torch.Tensor] = None,
                            num_groups: Optional[int] = None,
                            group_topk: Optional[int] = None):
    """Token-choice top-K over the N + M pool, null slots dropped, real weights renormalised.

    Selection compares selection_keys (score + biases), within each token's group_topk best
    groups when num_groups is set (null copies always eligible); the weights come from the
    unbiased logits (real_slot_weights), times scaling_factor.

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
    real_keys_TN, null_key_T = selection_keys(real_logits_TN, null_logit_T, score_function,
                                              expert_bias, null_selection_bias)
    if num_groups:
        real_keys_TN = limit_to_groups(real_keys_TN, topk, num_groups, group_topk)
    # Non-finite tokens: real keys 0 (first experts win the stable sort), null at -inf.
    real_keys_TN = real_keys_TN.masked_fill(~finite_T.unsqueeze(-1), 0.0)
    if null_key_T is not None:
        null_key_T = null_key_T.masked_fill(~finite_T, float("-inf"))
    slot_experts_TK = select_pool_slots(real_keys_TN, null_key_T, num_null_copies, topk)
    weights_TK = real_slot_weights(real_logits_TN, null_logit_T, slot_experts_TK,
                                   score_function)
    weights_TK = weights_TK.masked_fill(~finite_T.unsqueeze(-1), float("nan"))
    if scaling_factor:
        weights_TK = weights_TK * scaling_factor
    probs_TN, routing_map_TN = slots_to_expert_map(
        weights_TK.to(real_logits_TN.dtype), slot_experts_TK, num_experts
    )
    return probs_TN, routing_map_TN, slot_experts_TK


def real_experts_per_token(routing_map_TN: torch.Tensor) -> torch.Tensor:
    """[T] int64: how many real experts each token uses (0..K)."""
    return routing_map_TN.sum(dim=-1)
