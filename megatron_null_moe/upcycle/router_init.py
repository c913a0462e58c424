"""Router initialisation for an upcycled layer: grouped real rows, the null row, and the
null selection offset that starts the realised real fraction near rho.

- Real rows: one random row per group of G experts (the G slices of one FFN copy), so a
  group's experts always have equal logits: they are selected together, with equal
  weights, which is what makes the upcycled layer reproduce the dense FFN (see weights.py)
  as long as a token's top-K never cuts a group (K a multiple of G, and M >= K or M a
  multiple of G: the M null copies tie too; convert.py refuses other settings). The
  price: routing starts in whole groups (0, G, 2G, ... real experts per token) until
  training separates the rows; one row per expert (group size 1) avoids that and gives up
  the guarantee.
- Null row: the mean of the real rows, the null logit at the token's mean real logit (the
  plugin's convention when nulls are added to a trained router).
- With the null row alone, about half of the groups beat the null logit, so with N/G >= 2K/G
  every token fills its K slots with real experts: the real fraction starts near 1, not rho.
  A bias-free linear router cannot place the null logit at a fixed quantile of the real
  logits for every token (the spread of the real logits grows with |x|, the null logit is
  linear in x), so the start near rho comes from a selection-only offset b added to the
  null logit when the slots are chosen: ``calibrate_null_offset`` finds b on proxy router
  inputs x = gamma * xi, xi ~ N(0, I) (gamma: the layer's pre-MLP norm weight), the
  distribution of an RMS-normalised hidden state of random direction. The offset is the
  router's ``null_selection_bias``, which the budget controller then owns: the balance loss
  counts the router's own choice (without the offset), so a fixed offset without the
  controller would end below rho once the loss has trained the router to rho.
"""

import torch

from megatron_null_moe.routing import route_with_null_experts


def grouped_router_weight(num_experts: int, granularity: int, hidden_size: int, std: float,
                          generator: torch.Generator) -> torch.Tensor:
    """[N, h] fp32 real router rows ~ N(0, std^2), row e equal to row g*G for e in group g."""
    groups = torch.empty(num_experts // granularity, hidden_size).normal_(
        0.0, std, generator=generator)
    return groups.repeat_interleave(granularity, dim=0)


def mean_null_row(real_weight_NH: torch.Tensor) -> torch.Tensor:
    """[1, h] null row: the mean real row (null logit = the token's mean real logit)."""
    return real_weight_NH.float().mean(dim=0, keepdim=True).to(real_weight_NH.dtype)


def proxy_router_inputs(norm_weight_H: torch.Tensor, num_tokens: int,
                        generator: torch.Generator) -> torch.Tensor:
    """[T, h] x = gamma * xi, xi ~ N(0, I): RMS-normalised states of random direction."""
    noise = torch.empty(num_tokens, norm_weight_H.shape[0]).normal_(generator=generator)
    return noise * norm_weight_H.float()


def _router_logits(inputs_TH: torch.Tensor, real_weight_NH: torch.Tensor,
                   null_weight_1H: torch.Tensor):
    """[T, N] real logits and [T] null logit, in fp32 as the router computes them."""
    inputs = inputs_TH.float()
    return inputs @ real_weight_NH.float().t(), (inputs @ null_weight_1H.float().t()).squeeze(-1)


def _routed_real_fraction(real_logits_TN: torch.Tensor, null_logit_T: torch.Tensor,
                          num_null_copies: int, topk: int, null_offset: float,
                          **selection_options) -> float:
    _, routing_map, _ = route_with_null_experts(
        real_logits_TN, null_logit_T, num_null_copies, topk,
        null_selection_bias=torch.tensor(null_offset), **selection_options)
    return float(routing_map.sum(dim=-1).float().mean()) / topk


def real_fraction(inputs_TH: torch.Tensor, real_weight_NH: torch.Tensor,
                  null_weight_1H: torch.Tensor, num_null_copies: int, topk: int,
                  null_offset: float = 0.0, **selection_options) -> float:
    """Realised real fraction: mean over tokens of (real experts chosen) / K, with the
    null logit raised by ``null_offset`` for the choice (fp32, as the router computes).
    selection_options: route_with_null_experts' score function, per-expert bias and group
    limit (a router's ``selection_options``); default softmax, neither."""
    return _routed_real_fraction(*_router_logits(inputs_TH, real_weight_NH, null_weight_1H),
                                 num_null_copies, topk, null_offset, **selection_options)


def calibrate_null_offset(inputs_TH: torch.Tensor, real_weight_NH: torch.Tensor,
                          null_weight_1H: torch.Tensor, num_null_copies: int, topk: int,
                          target: float, iterations: int = 60, **selection_options) -> float:
    """Offset b with real_fraction(..., b) closest to ``target`` (bisection; the fraction
    falls as b grows, in steps, so the result is within one step of the target). The
    bracket starts at the spread of real logits minus null logit and widens until it holds
    the target (a per-expert bias moves the keys beyond that spread). The logits are
    computed once; each trial offset only routes them."""
    real_logits, null_logit = _router_logits(inputs_TH, real_weight_NH, null_weight_1H)

    def fraction(offset):
        return _routed_real_fraction(real_logits, null_logit, num_null_copies, topk, offset,
                                     **selection_options)

    gaps = real_logits - null_logit.unsqueeze(-1)
    low, high = float(gaps.min()) - 1.0, float(gaps.max()) + 1.0  # fraction max, fraction min
    for _ in range(16):
        if fraction(low) >= target and fraction(high) <= target:
            break
        width = high - low
        low, high = low - width, high + width
    for _ in range(iterations):
        middle = (low + high) / 2
        if fraction(middle) > target:
            low = middle
        else:
            high = middle
    candidates = (low, high)
    errors = [abs(fraction(b) - target) for b in candidates]
    return candidates[errors.index(min(errors))]
