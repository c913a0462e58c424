"""Pure tensor math of upcycling a dense FFN into fine-grained experts and a shared expert.

Legend: h = hidden size, F = dense FFN width, G = granularity, N = number of experts,
S = shared-expert width. Megatron's layouts (TP=1): ``fc1`` is [F, h], or [2F, h] for a
gated linear unit with the gate half first (FFN(x) = fc2 (act(gate x) * (up x))); ``fc2`` is
[h, F]. The dense FFN is a sum over its hidden units, so over any partition of them:

    FFN(x) = sum_{g < G} fc2_g act(fc1_g x),   slice g = hidden units [g F/G, (g+1) F/G)

Expert e is slice e mod G (the slices repeated N/G times; experts g*G .. g*G+G-1 form one
whole copy of the FFN, "group" g) with its fc2 multiplied by ``output_scale``. The router's
weights over the selected real experts sum to 1, so when a token's real experts are whole
groups, each expert of a group with the same weight w (the router initialisation gives the
G experts of a group one shared row), the MoE output is output_scale / G times FFN(x):
output_scale = G reproduces the dense FFN exactly. With a shared expert that carries half of
FFN(x), output_scale = G / 2.
"""

from typing import List, Tuple

import torch


def unit_rows(fc1_FH: torch.Tensor, units: torch.Tensor, gated: bool) -> torch.Tensor:
    """Row indices of fc1 belonging to hidden units ``units`` (gate and up rows for a GLU)."""
    if not gated:
        return units
    width = fc1_FH.shape[0] // 2
    return torch.cat([units, units + width])


def ffn_slices(fc1_FH: torch.Tensor, fc2_HF: torch.Tensor, granularity: int,
               gated: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The G slices of a dense FFN: (fc1 [F/G or 2F/G, h], fc2 [h, F/G]) each.

    Slice g holds hidden units [g F/G, (g+1) F/G); for a GLU its gate rows and its up rows
    are the same units, so sum_g fc2_g act(fc1_g x) = FFN(x).
    """
    width = fc2_HF.shape[1]
    if width % granularity:
        raise ValueError(f"FFN width {width} is not divisible by granularity {granularity}")
    step = width // granularity
    slices = []
    for g in range(granularity):
        units = torch.arange(g * step, (g + 1) * step)
        slices.append((fc1_FH[unit_rows(fc1_FH, units, gated)], fc2_HF[:, units]))
    return slices


def expert_weights(fc1_FH: torch.Tensor, fc2_HF: torch.Tensor, num_experts: int,
                   granularity: int, gated: bool,
                   output_scale: float) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """N experts: expert e = slice (e mod G) of the dense FFN, its fc2 times output_scale."""
    slices = ffn_slices(fc1_FH, fc2_HF, granularity, gated)
    return [(slices[e % granularity][0].clone(), slices[e % granularity][1] * output_scale)
            for e in range(num_experts)]


def drop_reinitialise(fc1_FH: torch.Tensor, fc2_HF: torch.Tensor, fraction: float,
                      statistics: List[Tuple[float, float]], gated: bool,
                      generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop-upcycling (Nakamura et al. 2025) of one expert: copies of fc1 and fc2 with
    round(fraction * width) of its hidden units, drawn at random, re-initialised.

    A re-initialised unit gets new gate and up rows (fc1) and a new fc2 column, drawn from
    N(mean, std) of the dense matrix each came from. statistics: (mean, std) of the dense
    gate, up (GLU only) and fc2 matrices, in that order.
    """
    width = fc2_HF.shape[1]
    units = torch.randperm(width, generator=generator)[: round(fraction * width)]
    fc1_FH, fc2_HF = fc1_FH.clone(), fc2_HF.clone()
    halves = [units, units + width] if gated else [units]
    for rows, (mean, std) in zip(halves, statistics):
        fresh = torch.empty(len(rows), fc1_FH.shape[1], dtype=torch.float32)
        fc1_FH[rows] = fresh.normal_(mean, std, generator=generator).to(fc1_FH.dtype)
    mean, std = statistics[-1]
    fresh = torch.empty(fc2_HF.shape[0], len(units), dtype=torch.float32)
    fc2_HF[:, units] = fresh.normal_(mean, std, generator=generator).to(fc2_HF.dtype)
    return fc1_FH, fc2_HF


def weight_statistics(fc1_FH: torch.Tensor, fc2_HF: torch.Tensor,
                      gated: bool) -> List[Tuple[float, float]]:
    """(mean, std) of the dense gate, up (GLU only) and fc2 matrices, as drop_reinitialise
    takes them."""
    matrices = list(torch.chunk(fc1_FH, 2, dim=0)) if gated else [fc1_FH]
    return [(float(m.float().mean()), float(m.float().std())) for m in [*matrices, fc2_HF]]


def shared_expert_weights(fc1_FH: torch.Tensor, fc2_HF: torch.Tensor, width: int,
                          gated: bool, share: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """A shared expert of width S = c F (c whole) carrying ``share`` of the dense FFN.

    Its hidden units are c copies of the dense units and its fc2 is scaled by share / c, so
    shared(x) = c * (share / c) * FFN(x) = share * FFN(x) exactly.
    """
    dense_width = fc2_HF.shape[1]
    if width % dense_width:
        raise ValueError(f"shared expert width {width} is not a multiple of the FFN width "
                         f"{dense_width}")
    copies = width // dense_width
    if gated:
        gate, up = torch.chunk(fc1_FH, 2, dim=0)
        fc1 = torch.cat([gate.repeat(copies, 1), up.repeat(copies, 1)])
    else:
        fc1 = fc1_FH.repeat(copies, 1)
    return fc1, fc2_HF.repeat(1, copies) * (share / copies)
