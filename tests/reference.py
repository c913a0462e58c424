"""Slow, materialised, obviously right references: the N + M pool written out in full."""

import torch


def materialise_pool(real_logits_TN, null_logit_T, num_null_copies):
    """[T, N + M] pool logits: the null logit copied M times."""
    copies = null_logit_T.unsqueeze(-1).expand(-1, num_null_copies)
    return torch.cat([real_logits_TN, copies], dim=-1)


def reference_route(real_logits_TN, null_logit_T, num_null_copies, topk):
    """Paper steps 2-4 on the materialised pool; ties to the lower pool index."""
    num_tokens, num_experts = real_logits_TN.shape
    pool = materialise_pool(real_logits_TN, null_logit_T, num_null_copies).double()
    order = torch.sort(pool, dim=-1, descending=True, stable=True).indices[:, :topk]
    pool_probs = torch.softmax(pool, dim=-1)
    probs = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for t in range(num_tokens):
        real = [int(i) for i in order[t] if i < num_experts]
        total = sum(pool_probs[t, i] for i in real)
        for i in real:
            probs[t, i] = pool_probs[t, i] / total
            routing_map[t, i] = True
    return probs, routing_map, order


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
