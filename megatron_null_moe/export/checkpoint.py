"""Read a null-expert MoE Megatron checkpoint a few tensors at a time.

A torch_dist checkpoint stores global tensors, so one saved at any TP/PP/EP and on either
expert path (the lean path saves Megatron's keys) loads into a TP=PP=EP=1 GPTModel built
from its args. The export builds that model without filling it (its parameters are
allocated but untouched, so they take no host memory) and loads the checkpoint's tensors a
few keys at a time, releasing each batch once written: the host holds at most the largest
key (with stacked layers: one weight of every layer) beside the shard being written.
"""

import dataclasses
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.upcycle.architecture import DenseArchitecture, MoEShape
from megatron_null_moe.upcycle.checkpoint import (
    LOAD_ERRORS,
    gpt_architecture,
    refuse_unsupported,
    sharded_state_dict,
    te_moe_norm_key,
)

CHECKPOINT_FLAG = "--checkpoint"

# (Megatron flag, args name, the one value allowed): MoE settings that change the model's
# function and that the exported model does not compute.
UNSUPPORTED_MOE_SETTINGS = (
    ("--moe-router-score-function", "moe_router_score_function", "softmax"),
    ("--moe-router-pre-softmax", "moe_router_pre_softmax", False),
    ("--moe-router-num-groups", "moe_router_num_groups", None),
    ("--moe-router-group-topk", "moe_router_group_topk", None),
    ("--moe-router-enable-expert-bias", "moe_router_enable_expert_bias", False),
    ("--moe-expert-capacity-factor", "moe_expert_capacity_factor", None),
    ("--moe-shared-expert-gate", "moe_shared_expert_gate", False),
    ("--moe-apply-probs-on-input", "moe_apply_probs_on_input", False),
    ("--moe-latent-size", "moe_latent_size", None),
)
# Controller state in the checkpoint that does not change the model's function.
NOT_EXPORTED = ("mlp.router.null_bias_integral",)


def _refuse(directory: Path, what: str) -> None:
    raise ValueError(f"{CHECKPOINT_FLAG} {directory}: {what}")


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """What a null-expert MoE checkpoint holds: the GPT around its MoE layers (``dense``;
    its FFN width is the dense layers'), the MoE layers (``moe``), and the router settings
    that change its function (Megatron's --moe-router-dtype, --moe-router-topk-scaling-factor).

    per_layer_keys: the checkpoint keys each layer apart (Megatron does so for a
    --moe-layer-freq list or above 1), rather than stacking the layers under one key.
    """

    dense: DenseArchitecture
    moe: MoEShape
    router_dtype: Optional[str] = None
    topk_scaling_factor: Optional[float] = None
    per_layer_keys: bool = False

    @property
    def num_null_copies(self) -> int:
        return self.moe.null_config.null_copies_for(self.moe.num_experts)


def moe_model(directory: Path, args) -> MoEModel:
    """MoEModel of a checkpoint's args; what a Qwen3-MoE with null experts cannot express is
    refused, naming Megatron's flag and the allowed value."""
    if not getattr(args, "num_experts", None):
        _refuse(directory, "not a mixture of experts (no --num-experts); allowed: a GPT MoE "
                           "checkpoint (null experts or not).")
    dense = gpt_architecture(directory, args, CHECKPOINT_FLAG)
    for flag, value, allowed in (("--normalization", dense.normalization, "RMSNorm"),
                                 ("--qk-layernorm", dense.qk_layernorm, True),
                                 ("--swiglu", dense.gated_linear_unit, True),
                                 ("--add-qkv-bias", dense.add_qkv_bias, False)):
        if value != allowed:
            _refuse(directory, f"{flag}={value!r}: the export writes Qwen3-MoE layers, which "
                               f"need {allowed!r}; allowed: {allowed!r}.")
    refuse_unsupported(directory, args, UNSUPPORTED_MOE_SETTINGS, CHECKPOINT_FLAG)
    if getattr(args, "moe_router_load_balancing_type", None) == "sinkhorn":
        _refuse(directory, "--moe-router-load-balancing-type='sinkhorn' routes by sigmoid "
                           "scores at inference; allowed: 'aux_loss', 'seq_aux_loss', "
                           "'global_aux_loss', 'none'.")
    frequency = getattr(args, "moe_layer_freq", 1)
    pattern = [1 if layer % frequency == 0 else 0 for layer in range(dense.num_layers)] \
        if isinstance(frequency, int) else list(frequency)
    if len(pattern) != dense.num_layers or not any(pattern):
        _refuse(directory, f"--moe-layer-freq={frequency!r} does not describe "
                           f"{dense.num_layers} layers with at least one MoE layer.")
    moe = MoEShape(
        num_experts=args.num_experts,
        expert_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None) or dense.ffn_hidden_size,
        topk=args.moe_router_topk,
        shared_expert_ffn_hidden_size=getattr(args, "moe_shared_expert_intermediate_size", 0) or 0,
        null_config=NullExpertConfig(
            real_fraction=getattr(args, "moe_null_expert_rho", None) or 1.0,
            num_null_copies=getattr(args, "moe_num_null_experts", None)),
        moe_layers=tuple(layer + 1 for layer, is_moe in enumerate(pattern) if is_moe))
    return MoEModel(dense=dense, moe=moe, router_dtype=getattr(args, "moe_router_dtype", None),
                    topk_scaling_factor=getattr(args, "moe_router_topk_scaling_factor", None),
                    per_layer_keys=not isinstance(frequency, int) or frequency > 1)


def checkpoint_tensors(model: torch.nn.Module, directory: Path, per_layer_keys: bool,
                       batch_bytes: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Megatron GPTModel name, tensor) of every tensor the export needs, from the checkpoint
    in ``directory``, loaded a few checkpoint keys at a time (about ``batch_bytes``, or one
    key). ``model`` (TP=PP=EP=1, built from the checkpoint's args) gives the keys; its
    parameters of a batch are released once the caller has taken their tensors.

    A batch holds whole keys: Megatron's loader in one process reads a key's other layers
    (other ranks' shards, where it is one of several) as its own, so a stacked key (all
    layers under one name) is loaded whole.
    """
    metadata = dict(dist_checkpointing.load_content_metadata(str(directory)) or {})
    if per_layer_keys:  # also for a --moe-layer-freq list of ones, which the model reads as 1
        metadata["non_homogeneous_layers"] = True
    try:
        available = dist_checkpointing.load_tensors_metadata(str(directory))
    except LOAD_ERRORS as error:
        _refuse(directory, f"its tensor metadata cannot be read ({type(error).__name__}: "
                           f"{str(error)[:300]}).")
    by_key: Dict[str, Dict] = {}
    for name, entry in sharded_state_dict(model, metadata).items():
        if isinstance(entry, ShardedObject) or name.endswith(NOT_EXPORTED):
            continue  # _extra_state of Transformer Engine layers, controller state
        entry = _checkpoint_entry(directory, entry, available)
        by_key.setdefault(entry.key, {})[name] = entry
    releasable = dict(model.named_parameters())
    for batch in _batches(list(by_key.values()), batch_bytes):
        try:
            loaded = dist_checkpointing.load(batch, str(directory))
        except LOAD_ERRORS as error:
            _refuse(directory, f"its tensors cannot be loaded into the model its args describe "
                               f"({type(error).__name__}: {str(error)[:300]}).")
        yield from ((name, loaded[name]) for name in batch)  # loaded has the common state too
        del loaded
        for name in batch:
            if name in releasable:
                releasable.pop(name).data = torch.empty(0)


def _batches(keys: List[Dict], batch_bytes: int) -> Iterator[Dict]:
    """The entries of consecutive keys merged while they stay within ``batch_bytes``."""
    batch, size = {}, 0
    for entries in keys:
        key_bytes = sum(entry.data.numel() * entry.data.element_size()
                        for entry in entries.values())
        if batch and size + key_bytes > batch_bytes:
            yield batch
            batch, size = {}, 0
        batch.update(entries)
        size += key_bytes
    if batch:
        yield batch


def _checkpoint_entry(directory: Path, entry, available: Dict):
    """``entry`` under the key the checkpoint has it: its own, or the MoE pre-MLP norm's
    key under Transformer Engine's spec (te_moe_norm_key); refused when neither is there."""
    if entry.key in available:
        return entry
    alias = te_moe_norm_key(entry.key)
    if alias in available:
        return dataclasses.replace(entry, key=alias)
    _refuse(directory, f"tensor {entry.key!r} is missing; the model its args describe needs "
                       "it (allowed: a complete checkpoint of that model).")
