"""Launch flags: the plugin's own argument group on Megatron's parser.

Pass ``add_null_expert_args`` as ``extra_args_provider`` to Megatron's
``parse_and_validate_args``; then ``null_expert_config_from_args(args)`` checks the flag
combinations and returns the ``NullExpertConfig`` (None when null experts are off).
"""

import argparse
import logging
from typing import Optional

from megatron_null_moe.config import NUM_NULL_FLAG, RHO_FLAG, NullExpertConfig

logger = logging.getLogger(__name__)

BALANCE_SCOPE_FLAG = "--moe-null-balance-scope"
# Balance-loss scope -> Megatron's --moe-router-load-balancing-type.
BALANCE_SCOPES = {"micro-batch": "aux_loss", "sequence": "seq_aux_loss", "global": "global_aux_loss"}


def add_null_expert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="null experts (megatron-null-moe)")
    group.add_argument(
        RHO_FLAG, type=float, default=None, metavar="RHO",
        help="Turn on zero-compute null experts. RHO is the target fraction of each token's "
             "--moe-router-topk slots that go to real experts, in (0, 1]: a token uses "
             "between 0 and K real experts, RHO*K on average (K8 with RHO 0.5 costs the "
             "expert FLOPs of K4). 1 means no null experts. The router pool gets "
             "M = N(1-RHO)/RHO null copies, N = --num-experts; M must be whole.",
    )
    group.add_argument(
        NUM_NULL_FLAG, type=int, default=None, metavar="M",
        help=f"Number of null copies M in the routing pool, overriding the one derived from "
             f"{RHO_FLAG}; the balance loss then aims at a real fraction of N/(N+M).",
    )
    group.add_argument(
        BALANCE_SCOPE_FLAG, choices=sorted(BALANCE_SCOPES), default=None,
        help="Scope of the balance loss over real and null slots: micro-batch, sequence or "
             "global (the paper's choice: counts over the global batch, i.e. all data-"
             "parallel ranks and gradient-accumulation steps). Sets "
             "--moe-router-load-balancing-type; default: keep that flag's value.",
    )
    return parser


def null_expert_config_from_args(args: argparse.Namespace) -> Optional[NullExpertConfig]:
    """The NullExpertConfig the flags ask for, or None; applies the balance scope to ``args``.

    Raises ValueError naming the flags for combinations that cannot work.
    """
    rho = getattr(args, "moe_null_expert_rho", None)
    copies = getattr(args, "moe_num_null_experts", None)
    scope = getattr(args, "moe_null_balance_scope", None)
    if rho is None:
        if copies is not None or scope is not None:
            raise ValueError(
                f"{NUM_NULL_FLAG} and {BALANCE_SCOPE_FLAG} need {RHO_FLAG} (null experts are "
                f"off without it)."
            )
        return None
    if not args.num_experts:
        raise ValueError(f"{RHO_FLAG} needs an MoE model: set --num-experts.")
    null_config = NullExpertConfig(real_fraction=rho, num_null_copies=copies)
    null_config.null_copies_for(args.num_experts)  # fractional M fails here, at start-up
    if scope is not None:
        _apply_balance_scope(args, scope)
    if args.moe_token_dispatcher_type == "allgather":
        logger.warning(
            "%s with --moe-token-dispatcher-type allgather: expert FLOPs are saved but every "
            "token is still gathered, so null slots save no communication; use alltoall or "
            "flex.", RHO_FLAG,
        )
    return null_config


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
