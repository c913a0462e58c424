"""Slow, materialised, obviously right references: the N + M pool written out in full."""

import torch


def materialise_pool(real_logits_TN, null_logit_T, num_null_copies):
    """[T, N + M] pool logits: the null logit copied M times."""
    copies = null_logit_T.unsqueeze(-1).expand(-1, num_null_copies)
    return torch.cat([real_logits_TN, copies], dim=-1)


def reference_route(real_logits_TN, null_logit_T, num_null_copies, topk):
    """Paper steps 2-4 on the materialised pool (softmax, no biases, no groups); ties to the
    lower pool index."""
    return reference_route_with_options(real_logits_TN, null_logit_T, num_null_copies, topk)


def reference_balance_loss(real_logits_TN, null_logit_T, num_null_copies, topk, coeff):
    """coeff * (N+M) * sum_i f_i P_i over every one of the N + M slots."""
    pool = materialise_pool(real_logits_TN, null_logit_T, num_null_copies)
    num_tokens, pool_size = pool.shape
    order = torch.sort(pool.detach(), dim=-1, descending=True, stable=True).indices[:, :topk]
    counts = torch.zeros(pool_size, dtype=pool.dtype).index_add_(
        0, order.reshape(-1), torch.ones(order.numel(), dtype=pool.dtype)
    )
    fraction_routed = counts / (topk * num_tokens)
    mean_prob = torch.softmax(pool, dim=-1).mean(dim=0)
    return coeff * pool_size * (fraction_routed * mean_prob).sum()


def reference_z_loss(real_logits_TN, null_logit_T, num_null_copies, coeff):
    pool = materialise_pool(real_logits_TN, null_logit_T, num_null_copies)
    return coeff * torch.logsumexp(pool, dim=-1).square().mean()


def reference_keys(real_logits_TN, null_logit_T, num_null_copies, score_function="softmax",
                   expert_bias_N=None, null_bias=0.0):
    """[T, N + M] what each slot of the materialised pool competes with: softmax, the logit;
    sigmoid, sigmoid(logit); + the expert's bias on real slots; the null bias inside."""
    num_tokens, num_experts = real_logits_TN.shape
    real = real_logits_TN.double()
    null = null_logit_T.double() + null_bias
    if score_function == "sigmoid":
        real, null = torch.sigmoid(real), torch.sigmoid(null)
    if expert_bias_N is not None:
        real = real + expert_bias_N.double()
    return materialise_pool(real, null, num_null_copies)


def reference_group_limit(keys_TP, num_experts, topk, num_groups, group_topk):
    """Real slots of groups outside each token's best group_topk set to -inf, token by token:
    a group's score is the sum of its topk // group_topk best real keys."""
    keys = keys_TP.clone()
    size = num_experts // num_groups
    for t in range(keys.shape[0]):
        scores = [sorted(keys[t, g * size:(g + 1) * size].tolist(), reverse=True)
                  [:topk // group_topk] for g in range(num_groups)]
        ranked = sorted(range(num_groups), key=lambda g: -sum(scores[g]))[:group_topk]
        for g in range(num_groups):
            if g not in ranked:
                keys[t, g * size:(g + 1) * size] = float("-inf")
    return keys


def reference_route_with_options(real_logits_TN, null_logit_T, num_null_copies, topk,
                                 score_function="softmax", expert_bias_N=None, null_bias=0.0,
                                 num_groups=None, group_topk=None, scaling_factor=None):
    """Top-K of the materialised pool's keys (ties to the lower index); weights from the
    unbiased scores of the selected real slots, renormalised over them (sigmoid with K = 1:
    the score), times the scaling factor."""
    num_tokens, num_experts = real_logits_TN.shape
    keys = reference_keys(real_logits_TN, null_logit_T, num_null_copies, score_function,
                          expert_bias_N, null_bias)
    if num_groups:
        keys = reference_group_limit(keys, num_experts, topk, num_groups, group_topk)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :topk]
    pool = materialise_pool(real_logits_TN.double(), null_logit_T.double(), num_null_copies)
    scores = torch.softmax(pool, dim=-1) if score_function == "softmax" else torch.sigmoid(pool)
    probs = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for t in range(num_tokens):
        real = [int(i) for i in order[t] if i < num_experts]
        total = sum(scores[t, i] for i in real)
        for i in real:
            unnormalised = score_function == "sigmoid" and topk == 1
            probs[t, i] = scores[t, i] if unnormalised else scores[t, i] / total
            routing_map[t, i] = True
    return probs * (scaling_factor or 1.0), routing_map, order


def reference_sigmoid_balance_loss(real_logits_TN, null_logit_T, num_null_copies, topk, coeff):
    """coeff * (N+M) * sum_i f_i P_i over the pool with P from sigmoid scores normalised over
    every one of the N + M slots; f from the top-K of the unbiased scores."""
    pool = materialise_pool(real_logits_TN, null_logit_T, num_null_copies)
    num_tokens, pool_size = pool.shape
    scores = torch.sigmoid(pool)
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :topk]
    counts = torch.zeros(pool_size, dtype=pool.dtype).index_add_(
        0, order.reshape(-1), torch.ones(order.numel(), dtype=pool.dtype))
    mean_prob = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
    return coeff * pool_size * (counts / (topk * num_tokens) * mean_prob).sum()
