"""Upcycle a dense GPTModel into a null-expert MoE GPTModel: the settings and the filling.

``UpcycleSettings`` is validated once against the dense architecture (``moe_shape``), every
refusal a ValueError naming the flag, its value and what is allowed. ``upcycle_into`` fills
every parameter of the MoE model from the dense one: attention, norms and embeddings are
copied, each MoE layer's FFN becomes experts (weights.py) and its router is initialised
(router_init.py); layers left dense keep their FFN.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.router import NullExpertRouter
from megatron_null_moe.upcycle.architecture import DenseArchitecture, MoEShape
from megatron_null_moe.upcycle.router_init import (
    calibrate_null_offset,
    grouped_router_weight,
    mean_null_row,
    proxy_router_inputs,
    real_fraction,
)
from megatron_null_moe.upcycle.weights import (
    drop_reinitialise,
    expert_weights,
    shared_expert_weights,
    weight_statistics,
)

# A shared expert carries this share of the dense FFN and the routed experts the rest.
SHARED_EXPERT_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class UpcycleSettings:
    """What the user asks of the upcycle (flags of ``python -m megatron_null_moe.upcycle``).

    num_experts: N (--num-experts). granularity: G (--granularity), each expert F/G wide.
    topk: K (--moe-router-topk). real_fraction: rho (--moe-null-expert-rho);
    num_null_copies: M (--moe-num-null-experts), else N(1-rho)/rho.
    shared_expert_ffn_hidden_size: S (--moe-shared-expert-intermediate-size), 0 for none.
    reinit_fraction: r (--reinit-fraction), drop-upcycling share of each expert's units.
    moe_layers: 1-based layers that become MoE (--moe-layers), None for all.
    grouped_router: the G experts of one FFN copy share a router row (--router-init
        grouped), so they tie and are chosen together. The layer starts as the dense FFN
        only if a token's top-K never cuts a group (``cut_group_counts``: K a multiple of
        G and M >= K or M a multiple of G); other settings are refused with grouped rows.
        It starts with 0, G, 2G, ... real experts; independent rows (--router-init
        independent) route expert by expert from the start, without that guarantee.
    calibrated_null_start: write the calibrated null selection offset into the router's
        budget state (--null-start calibrated, for runs with --moe-null-budget-controller),
        or leave it at 0 (--null-start mean-row: the paper's routing, starting near 1).
    """

    num_experts: int
    granularity: int = 1
    topk: int = 2
    real_fraction: float = 1.0
    num_null_copies: Optional[int] = None
    shared_expert_ffn_hidden_size: int = 0
    reinit_fraction: float = 0.0
    seed: int = 1234
    moe_layers: Optional[Tuple[int, ...]] = None
    grouped_router: bool = True
    calibrated_null_start: bool = True
    calibration_tokens: int = 4096

    def moe_shape(self, dense: DenseArchitecture) -> MoEShape:
        """The MoE this asks for on ``dense``; ValueError naming the flag if it cannot be."""
        n, g, width = self.num_experts, self.granularity, dense.ffn_hidden_size
        _whole("--num-experts", n, 1)
        _whole("--granularity", g, 1)
        if n % g:
            raise ValueError(f"--num-experts {n} is not a multiple of --granularity {g}; "
                             f"allowed: N = G x copies (e.g. {g * max(1, n // g)}).")
        if width % g:
            divisors = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
            raise ValueError(f"--granularity {g} does not divide the dense FFN width F={width}; "
                             f"allowed: a divisor of {width} ({', '.join(map(str, divisors))}"
                             f"{', ...' if width > 64 else ''}).")
        null_config = NullExpertConfig(real_fraction=self.real_fraction,
                                       num_null_copies=self.num_null_copies)
        copies = null_config.null_copies_for(n)
        _whole("--moe-router-topk", self.topk, 1, n + copies)
        if self.grouped_router:
            _refuse_cut_groups(n, g, self.topk, copies, self.real_fraction,
                               self.num_null_copies)
        shared = self.shared_expert_ffn_hidden_size
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0 or shared % width:
            raise ValueError(f"--moe-shared-expert-intermediate-size {shared!r}: allowed: 0 (no "
                             f"shared expert) or a positive multiple of the dense FFN width "
                             f"F={width} (the shared expert starts as copies of the dense FFN).")
        if not 0.0 <= self.reinit_fraction < 1.0:
            raise ValueError(f"--reinit-fraction {self.reinit_fraction!r}: allowed: a number in "
                             "[0, 1) (the paper uses 0.3).")
        layers = tuple(range(1, dense.num_layers + 1)) if self.moe_layers is None \
            else tuple(sorted(set(self.moe_layers)))
        if not layers or layers[0] < 1 or layers[-1] > dense.num_layers:
            raise ValueError(f"--moe-layers {layers_text(self.moe_layers)!r}: allowed: layer "
                             f"numbers in 1..{dense.num_layers} (the dense model's layers), at "
                             "least one.")
        return MoEShape(num_experts=n, expert_ffn_hidden_size=width // g, topk=self.topk,
                        shared_expert_ffn_hidden_size=shared, null_config=null_config,
                        moe_layers=layers)


def cut_group_counts(num_experts: int, granularity: int, topk: int,
                     num_null_copies: int) -> List[int]:
    """Real-expert counts a token's top-K can take with grouped router rows that are not
    whole groups (empty: every token's real experts are whole groups, the dense FFN).

    A group's G experts tie, and so do the M null copies; a token's top-K takes the groups
    ranked above the null logit (any number of them, depending on the token), then up to M
    null slots, then groups ranked below. A count that is not a multiple of G cuts a group.
    """
    counts = set()
    for above in range(0, num_experts + 1, granularity):
        real = min(topk, above)
        nulls = min(topk - real, num_null_copies)
        counts.add(real + min(topk - real - nulls, num_experts - above))
    return sorted(count for count in counts if count % granularity)


def _refuse_cut_groups(n: int, g: int, k: int, m: int, rho: float,
                       num_null_copies: Optional[int]) -> None:
    """ValueError when grouped router rows would let a token's top-K cut a group: such a
    token gets part of a copy of the FFN, so the layer would not start as the dense FFN."""
    cut = cut_group_counts(n, g, k, m)
    if not cut:
        return
    source = f"--moe-num-null-experts {m}" if num_null_copies is not None \
        else f"M={m} from --moe-null-expert-rho {rho:g}"
    if k % g:
        problem = f"--moe-router-topk {k} is not a multiple of --granularity {g}"
    else:
        problem = f"{source} is below --moe-router-topk {k} and not a multiple of " \
                  f"--granularity {g}"
    raise ValueError(
        f"{problem}: with --router-init grouped a token's top-K would take "
        f"{' or '.join(map(str, cut))} real experts, cutting a copy of the FFN, and the layer "
        f"would not start as the dense FFN; allowed: --moe-router-topk a multiple of "
        f"--granularity, with M (null copies: --moe-null-expert-rho, --moe-num-null-experts) "
        f">= K or a multiple of --granularity, or --router-init independent.")


def layers_text(layers: Optional[Tuple[int, ...]]) -> str:
    """--moe-layers as it is typed (parse_layers' inverse): None -> 'all', (2, 3, 4, 7) ->
    '2-4,7', so a refusal shows the user's text rather than a tuple."""
    if layers is None:
        return "all"
    runs: List[List[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


# One random stream per (seed, layer, purpose): re-initialisation, router rows and
# calibration inputs do not shift when another of them changes.
_REINIT, _ROUTER_ROWS, _CALIBRATION = range(3)


def _generator(seed: int, layer: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 3 + purpose)


def _whole(flag: str, value, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        allowed = f"a whole number >= {low}" if high is None else f"{low}..{high}"
        raise ValueError(f"{flag} {value!r}: allowed: {allowed}.")


@dataclasses.dataclass
class LayerRouterStart:
    """How one layer's router starts: the calibrated selection offset and the real fraction
    it gives on proxy inputs, with the offset and without it (null row alone)."""

    layer: int
    null_offset: float
    real_fraction_with_offset: float
    real_fraction_without_offset: float


def upcycle_into(dense_model: torch.nn.Module, moe_model: torch.nn.Module,
                 dense: DenseArchitecture, moe: MoEShape,
                 settings: UpcycleSettings) -> List[LayerRouterStart]:
    """Fill every parameter of ``moe_model`` from ``dense_model``; returns each MoE layer's
    router start. Raises RuntimeError if a parameter was left unfilled."""
    dense_params = {name: p.detach() for name, p in dense_model.named_parameters()}
    targets = dict(moe_model.named_parameters())
    filled = set()

    def put(name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            targets[name].copy_(value)
        filled.add(name)

    for name, value in dense_params.items():
        if name in targets and targets[name].shape == value.shape:
            put(name, value)
    starts = []
    for router in (m for m in moe_model.modules() if isinstance(m, NullExpertRouter)):
        prefix = f"decoder.layers.{router.layer_number - 1}."
        for name, value in _moe_layer_tensors(dense_params, prefix, dense, moe, settings,
                                              router.layer_number).items():
            put(prefix + name, value)
        starts.append(_start_router(router, dense_params[prefix + "pre_mlp_layernorm.weight"],
                                    moe, settings))
    unfilled = sorted(set(targets) - filled)
    if unfilled:
        raise RuntimeError(f"upcycle left parameters unfilled: {unfilled[:5]}")
    return starts


def _moe_layer_tensors(dense_params: Dict[str, torch.Tensor], prefix: str,
                       dense: DenseArchitecture, moe: MoEShape, settings: UpcycleSettings,
                       layer: int) -> Dict[str, torch.Tensor]:
    """Experts, shared expert and router rows of one MoE layer (names under ``mlp.``)."""
    fc1 = dense_params[prefix + "mlp.linear_fc1.weight"].float()
    fc2 = dense_params[prefix + "mlp.linear_fc2.weight"].float()
    gated, g = dense.gated_linear_unit, settings.granularity
    scale = g * (1 - SHARED_EXPERT_SHARE) if moe.shared_expert_ffn_hidden_size else g
    experts = expert_weights(fc1, fc2, moe.num_experts, g, gated, output_scale=scale)
    generator = _generator(settings.seed, layer, _REINIT)
    statistics = weight_statistics(fc1, fc2 * scale, gated)
    tensors = {}
    for index, (expert_fc1, expert_fc2) in enumerate(experts):
        if settings.reinit_fraction > 0:
            expert_fc1, expert_fc2 = drop_reinitialise(
                expert_fc1, expert_fc2, settings.reinit_fraction, statistics, gated, generator)
        tensors[f"mlp.experts.local_experts.{index}.linear_fc1.weight"] = expert_fc1
        tensors[f"mlp.experts.local_experts.{index}.linear_fc2.weight"] = expert_fc2
    if moe.shared_expert_ffn_hidden_size:
        shared_fc1, shared_fc2 = shared_expert_weights(
            fc1, fc2, moe.shared_expert_ffn_hidden_size, gated, SHARED_EXPERT_SHARE)
        tensors["mlp.shared_experts.linear_fc1.weight"] = shared_fc1
        tensors["mlp.shared_experts.linear_fc2.weight"] = shared_fc2
    real_rows = grouped_router_weight(moe.num_experts, g if settings.grouped_router else 1,
                                      dense.hidden_size, dense.init_method_std,
                                      _generator(settings.seed, layer, _ROUTER_ROWS))
    tensors["mlp.router.weight"] = real_rows
    if moe.null_config.null_copies_for(moe.num_experts) > 0:
        tensors["mlp.router.null_weight"] = mean_null_row(real_rows)
    return tensors


def _start_router(router: NullExpertRouter, norm_weight: torch.Tensor, moe: MoEShape,
                  settings: UpcycleSettings) -> LayerRouterStart:
    """Calibrate the null selection offset b on proxy inputs; with calibrated_null_start,
    start the router's budget state at it: ``null_selection_bias`` = b (the choice uses it
    from the first step) and ``null_bias_integral`` = b (the budget controller continues
    from b instead of replacing it by its first correction)."""
    layer = router.layer_number
    if router.null_weight is None:  # rho = 1: no null experts, every slot is real
        return LayerRouterStart(layer, 0.0, 1.0, 1.0)
    inputs = proxy_router_inputs(norm_weight.float(), settings.calibration_tokens,
                                 _generator(settings.seed, layer, _CALIBRATION))
    real_rows, null_row = router.weight.detach(), router.null_weight.detach()
    copies, target = router.num_null_copies, moe.null_config.pool_real_fraction(moe.num_experts)
    offset = calibrate_null_offset(inputs, real_rows, null_row, copies, moe.topk, target)
    if settings.calibrated_null_start:
        with torch.no_grad():
            router.null_selection_bias.fill_(offset)
            router.null_bias_integral.fill_(offset)
    return LayerRouterStart(
        layer=layer, null_offset=offset,
        real_fraction_with_offset=real_fraction(inputs, real_rows, null_row, copies, moe.topk,
                                                offset),
        real_fraction_without_offset=real_fraction(inputs, real_rows, null_row, copies,
                                                   moe.topk),
    )
