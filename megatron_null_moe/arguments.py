"""Launch flags: the plugin's own argument group on Megatron's parser.

Pass ``add_null_expert_args`` as ``extra_args_provider`` to Megatron's
``parse_and_validate_args``: the parser then checks the plugin's flags right after argparse's
own checks (a refusal is one ``prog: error:`` line, before Megatron validates and prints its
arguments) and, with null experts on, makes alltoall the default dispatcher. Later
``null_expert_config_from_args(args)`` returns the ``NullExpertConfig`` (None when null
experts are off) and ``warn_where_the_flags_lose(args, config)`` says what the launch gives
away.
"""

import argparse
import logging
import re
from typing import Callable, Optional

from megatron_null_moe.budget import DEFAULT_RATE
from megatron_null_moe.config import (
    BUDGET_RATE_FLAG,
    LEAN_BUFFER_FLAG,
    LEAN_BUFFERS,
    NUM_NULL_FLAG,
    RHO_FLAG,
    NullExpertConfig,
)
from megatron_null_moe.dispatcher import warn_allgather_saves_no_communication
from megatron_null_moe.process_groups import is_rank_zero

logger = logging.getLogger(__name__)

BALANCE_SCOPE_FLAG = "--moe-null-balance-scope"
BUDGET_CONTROLLER_FLAG = "--moe-null-budget-controller"
EXPERT_PATH_FLAG = "--moe-null-expert-path"
EXPERT_PATH_CHOICES = ("megatron", "lean")  # megatron_null_moe.spec.EXPERT_PATHS
# Balance-loss scope -> Megatron's --moe-router-load-balancing-type.
BALANCE_SCOPES = {"micro-batch": "aux_loss", "sequence": "seq_aux_loss", "global": "global_aux_loss"}
# Null slots cross no all-to-all; Megatron's default (allgather) gathers every token anyway.
NULL_EXPERT_DISPATCHER = "alltoall"
# Set on the parsed arguments when the plugin chose the dispatcher (the start-up line says so).
DISPATCHER_CHOSEN = "moe_null_chose_token_dispatcher"


def add_null_expert_args(parser: argparse.ArgumentParser,
                         refuse: Optional[Callable[[argparse.Namespace], None]] = None
                         ) -> argparse.ArgumentParser:
    """The plugin's flags, checked right after parsing; also makes Megatron's --help printable.

    refuse: a further check of the parsed arguments (raises ValueError), e.g. the entry
    point's refusal of Megatron-LM features it does not carry.
    """
    _escape_bare_percent_signs(parser)
    # argparse prints the usage above each refusal: Megatron's is ~700 lines of flags.
    parser.usage = "%(prog)s [Megatron arguments] [null-expert flags] (--help lists them)"
    group = parser.add_argument_group(title="null experts (megatron-null-moe)")
    group.add_argument(
        RHO_FLAG, type=float, default=None, metavar="RHO",
        help="Turn on zero-compute null experts. RHO is the target fraction of each token's "
             "--moe-router-topk slots that go to real experts, in (0, 1]: RHO*K real "
             "experts per token on average (K8 with RHO 0.5 costs the expert FLOPs of K4), "
             "each token between max(0, K-M) and min(K, N). 1 means no null experts. The "
             "router pool gets M = N(1-RHO)/RHO null copies, N = --num-experts; M must be "
             "whole. Something must hold the budget: the balance loss (--moe-aux-loss-coeff, "
             f"paper 2e-2) or {BUDGET_CONTROLLER_FLAG}.",
    )
    group.add_argument(
        NUM_NULL_FLAG, type=int, default=None, metavar="M",
        help=f"Number of null copies M in the routing pool, when N(1-RHO)/RHO is not whole: "
             f"that number rounded down or up (other values contradict {RHO_FLAG} and are "
             f"refused); the target real fraction becomes N/(N+M).",
    )
    group.add_argument(
        BALANCE_SCOPE_FLAG, choices=sorted(BALANCE_SCOPES), default=None,
        help="Scope of the balance loss over real and null slots: micro-batch, sequence or "
             "global (the paper's choice: counts over the global batch, i.e. all data-"
             "parallel ranks and gradient-accumulation steps). Sets "
             "--moe-router-load-balancing-type; default: keep that flag's value.",
    )
    group.add_argument(
        BUDGET_CONTROLLER_FLAG, action="store_true",
        help="Hold every MoE layer's realised real fraction at the target: a selection-only "
             "bias on the null logit per layer (it changes which slots are chosen, never the "
             "weights or the losses), updated after each optimizer step from the global "
             "batch's real fraction of that layer by a proportional-integral rule. Works with "
             "the balance loss, which still spreads the load over the real experts. Off: the "
             "paper's routing.",
    )
    group.add_argument(
        BUDGET_RATE_FLAG, type=float, default=None, metavar="RATE",
        help=f"The budget controller's rate: null bias, in spreads of the router's real "
             f"logits, per unit of real-fraction error and step (default {DEFAULT_RATE:g}). "
             f"Needs {BUDGET_CONTROLLER_FLAG}.",
    )
    group.add_argument(
        EXPERT_PATH_FLAG, choices=EXPERT_PATH_CHOICES, default="megatron",
        help="How the MoE layers dispatch and compute experts. megatron (default): "
             "Megatron's experts (SequentialMLP/TEGroupedMLP from the spec) behind a "
             "null-aware version of its dispatcher. lean: a device-side sort of the real "
             "assignments and grouped GEMMs with device offsets (FP8: torch._scaled_grouped_mm);"
             " no host wait with EP=1, one (the all-to-all split sizes) with EP>1. Needs "
             "--moe-token-dispatcher-type alltoall, --disable-bias-linear, expert tensor "
             "parallel size 1. Checkpoints are interchangeable between the two.",
    )
    group.add_argument(
        LEAN_BUFFER_FLAG, choices=LEAN_BUFFERS, default="auto",
        help=f"With {EXPERT_PATH_FLAG} lean at expert parallel size 1: how many rows the "
             "buffers hold. real-rows: the real assignments only, their count read on the "
             "host (one sync per MoE layer and micro-batch on a GPU). worst-case: tokens*topk "
             "rows, the null slots' rows carried through gathers, activation and backward, "
             "and nothing read back to the host (CUDA-graph capturable). auto (default): "
             "real-rows on the CPU, worst-case on a GPU. With expert parallelism the count "
             "is on the host anyway (the all-to-all's split sizes): real rows always.",
    )
    megatron_default = _default_dispatcher_to_alltoall(parser)
    _check_after_parsing(parser, refuse, megatron_default)
    return parser


# The args attribute that keeps the per-expert bias's rate once the plugin took the flag over.
EXPERT_BIAS_RATE_ATTRIBUTE = "moe_null_expert_bias_rate"


def _default_dispatcher_to_alltoall(parser: argparse.ArgumentParser) -> str:
    """Megatron's default dispatcher, taken off the parser: with no default there, a
    dispatcher left at the default is told from a given one (resolve_token_dispatcher)."""
    action = next(a for a in parser._actions if a.dest == "moe_token_dispatcher_type")
    megatron_default, action.default = action.default, None
    action.help = (f"{action.help.rstrip()} With {RHO_FLAG} the default is "
                   f"{NULL_EXPERT_DISPATCHER}: only real assignments cross the all-to-all.")
    return megatron_default


def resolve_token_dispatcher(args: argparse.Namespace, megatron_default: str) -> None:
    """Fill in a dispatcher left at the default: alltoall with null experts, else Megatron's."""
    chosen = (args.moe_token_dispatcher_type is None and bool(args.num_experts)
              and getattr(args, "moe_null_expert_rho", None) is not None)
    setattr(args, DISPATCHER_CHOSEN, chosen)
    if args.moe_token_dispatcher_type is None:
        args.moe_token_dispatcher_type = NULL_EXPERT_DISPATCHER if chosen else megatron_default


def _check_after_parsing(parser: argparse.ArgumentParser,
                         refuse: Optional[Callable[[argparse.Namespace], None]],
                         megatron_default: str) -> None:
    # Megatron validates, then prints ~800 lines of arguments, before any model exists; the
    # plugin's flags are checked where argparse checks its own, so a refusal comes first. The
    # parser is Megatron's, so its parse_known_args (which parse_args calls) is wrapped.
    parse_known_args = parser.parse_known_args

    def parse_known_and_check(args=None, namespace=None):
        parsed, unknown = parse_known_args(args, namespace)
        resolve_token_dispatcher(parsed, megatron_default)
        try:
            if refuse is not None:
                refuse(parsed)
            null_expert_config_from_args(parsed)
        except ValueError as error:  # under torchrun every rank exits, rank 0 says why
            parser.exit(2, f"{parser.prog}: error: {error}\n" if is_rank_zero() else None)
        return parsed, unknown

    parser.parse_known_args = parse_known_and_check


def _escape_bare_percent_signs(parser: argparse.ArgumentParser) -> None:
    # megatron-core 0.19.2 has a help text with a bare '%' ("= 10%)") that makes argparse's
    # --help crash, in the entry point and in Megatron-LM's own pretrain_gpt.py alike.
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%%|%\(|%", lambda m: m[0] if len(m[0]) == 2 else "%%",
                                 action.help)


def expert_path_of(args) -> str:
    """The expert path ``args`` name ('megatron' unless given; also for the args of a
    checkpoint saved without the plugin)."""
    return getattr(args, "moe_null_expert_path", None) or "megatron"


def null_expert_path_from_args(args: argparse.Namespace) -> str:
    """The expert path ``--moe-null-expert-path`` asks for, checked against the other flags."""
    path = expert_path_of(args)
    if path != "megatron" and getattr(args, "moe_null_expert_rho", None) is None:
        raise ValueError(
            f"{EXPERT_PATH_FLAG} {path} needs {RHO_FLAG} (give {RHO_FLAG} 1 for the {path} "
            f"path without null experts); allowed without it: megatron.")
    return path


def null_expert_config_from_args(args: argparse.Namespace) -> Optional[NullExpertConfig]:
    """The NullExpertConfig the flags ask for, or None; applies the balance scope to ``args``.

    Raises ValueError naming the flags for combinations that cannot work.
    """
    rho = getattr(args, "moe_null_expert_rho", None)
    copies = getattr(args, "moe_num_null_experts", None)
    scope = getattr(args, "moe_null_balance_scope", None)
    controller = getattr(args, "moe_null_budget_controller", False)
    rate = getattr(args, "moe_null_budget_rate", None)
    lean_buffer = getattr(args, "moe_null_lean_buffer", None) or "auto"
    if rate is not None and not controller:
        raise ValueError(f"{BUDGET_RATE_FLAG} needs {BUDGET_CONTROLLER_FLAG}.")
    if null_expert_path_from_args(args) != "lean" and lean_buffer != "auto":
        raise ValueError(f"{LEAN_BUFFER_FLAG} {lean_buffer} needs {EXPERT_PATH_FLAG} lean; "
                         "allowed on the megatron path: auto.")
    if rho is None:
        if copies is not None or scope is not None or controller:
            raise ValueError(
                f"{NUM_NULL_FLAG}, {BALANCE_SCOPE_FLAG} and {BUDGET_CONTROLLER_FLAG} need "
                f"{RHO_FLAG} (null experts are off without it)."
            )
        return None
    if not args.num_experts:
        raise ValueError(f"{RHO_FLAG} needs an MoE model: set --num-experts.")
    null_config = NullExpertConfig(
        real_fraction=rho, num_null_copies=copies,
        budget_control_rate=(rate if rate is not None else DEFAULT_RATE) if controller else None,
        lean_buffer=lean_buffer, expert_bias_rate=expert_bias_rate_from_args(args),
    )
    null_config.null_copies_for(args.num_experts)  # fractional or contradicting M fails here
    if scope is not None:
        _apply_balance_scope(args, scope)
    return null_config


def expert_bias_rate_from_args(args: argparse.Namespace) -> Optional[float]:
    """The per-expert bias's rate that Megatron's flags ask for, or None (see
    take_over_expert_bias)."""
    rate = getattr(args, EXPERT_BIAS_RATE_ATTRIBUTE, None)
    if rate is None and getattr(args, "moe_router_enable_expert_bias", False):
        rate = args.moe_router_bias_update_rate
    return rate


def take_over_expert_bias(args: argparse.Namespace) -> None:
    """With null experts the plugin, not Megatron, runs --moe-router-enable-expert-bias.

    Megatron's config accepts it only with sigmoid scores, and its finalize_model_grads
    would update the bias from counts after capacity drops without re-centring
    (expert_bias.py says why null experts need it): the flag leaves Megatron's args, and its
    rate stays on them under a name of the plugin's own, so a checkpoint's args still say
    that the routers carry the bias."""
    rate = expert_bias_rate_from_args(args)
    if rate is not None:
        setattr(args, EXPERT_BIAS_RATE_ATTRIBUTE, rate)
        args.moe_router_enable_expert_bias = False


def warn_where_the_flags_lose(args: argparse.Namespace,
                              null_config: Optional[NullExpertConfig]) -> None:
    """Warn (rank 0) where a launch that works gives away what null experts are for: nothing
    holds the budget, or the dispatcher sends null slots anyway."""
    if null_config is None:
        return
    holds_budget = (null_config.null_copies_for(args.num_experts) == 0
                    or null_config.budget_control_rate is not None)
    if not holds_budget and not _balance_loss_on(args):
        _warn_on_rank_0(
            f"{RHO_FLAG} {null_config.real_fraction} with no balance loss (--moe-aux-loss-coeff "
            f"{args.moe_aux_loss_coeff}, --moe-router-load-balancing-type "
            f"{args.moe_router_load_balancing_type}) and no {BUDGET_CONTROLLER_FLAG}: nothing "
            f"pulls the real fraction towards the target, so the expert FLOPs are not held. "
            f"Set --moe-aux-loss-coeff (paper: 2e-2) or add {BUDGET_CONTROLLER_FLAG}.")
    if args.moe_token_dispatcher_type == "allgather":
        warn_allgather_saves_no_communication()


def _balance_loss_on(args: argparse.Namespace) -> bool:
    coefficients, types = args.moe_aux_loss_coeff, args.moe_router_load_balancing_type
    coefficients = coefficients if isinstance(coefficients, list) else [coefficients]
    types = types if isinstance(types, list) else [types]
    return any(t != "none" for t in types) and any((c or 0) > 0 for c in coefficients)


def _warn_on_rank_0(message: str) -> None:
    if is_rank_zero():
        logger.warning(message)


def _apply_balance_scope(args: argparse.Namespace, scope: str) -> None:
    wanted = BALANCE_SCOPES[scope]
    current = args.moe_router_load_balancing_type
    current = current if isinstance(current, list) else [current]
    if current not in ([wanted], ["aux_loss"]):  # aux_loss is Megatron's default
        raise ValueError(
            f"{BALANCE_SCOPE_FLAG}={scope} asks for {wanted!r} but "
            f"--moe-router-load-balancing-type is {' '.join(current)}; give one of the two."
        )
    args.moe_router_load_balancing_type = wanted
