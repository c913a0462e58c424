"""Read a null-expert MoE Megatron checkpoint one layer at a time.

A torch_dist checkpoint stores global tensors, so one saved at any TP/PP/EP and on either
expert path (the lean path saves Megatron's keys) reads as a TP=PP=EP=1 GPTModel built from
its args. The export builds that model without filling it (its parameters are allocated but
never touched, so they take no host memory): its sharded state dict names each tensor's
checkpoint key and region, and the tensors are read one layer at a time, so the host holds
one layer beside the shard being written.
"""

import dataclasses
import math
import re
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed.checkpoint as torch_checkpoint
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
)

from megatron_null_moe.arguments import expert_bias_rate_from_args
from megatron_null_moe.config import SCORE_FUNCTIONS, NullExpertConfig
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
    ("--moe-router-pre-softmax", "moe_router_pre_softmax", False),
    ("--moe-expert-capacity-factor", "moe_expert_capacity_factor", None),
    ("--moe-shared-expert-gate", "moe_shared_expert_gate", False),
    ("--moe-apply-probs-on-input", "moe_apply_probs_on_input", False),
    ("--moe-latent-size", "moe_latent_size", None),
)
# Controller state in the checkpoint that does not change the model's function (the
# per-expert bias, expert_bias, does: it is exported).
NOT_EXPORTED = ("mlp.router.null_bias_integral",)


def _refuse(directory: Path, what: str) -> None:
    raise ValueError(f"{CHECKPOINT_FLAG} {directory}: {what}")


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """What a null-expert MoE checkpoint holds: the GPT around its MoE layers (``dense``;
    its FFN width is the dense layers'), the MoE layers (``moe``; its null_config's
    expert_bias_rate is set when the routers carry a per-expert bias), and the router
    settings that change its function (Megatron's --moe-router-dtype,
    --moe-router-topk-scaling-factor, --moe-router-score-function, and
    --moe-router-num-groups with --moe-router-group-topk, None without groups).

    per_layer_keys: the checkpoint keys each layer apart (Megatron does so for a
    --moe-layer-freq list or above 1), rather than stacking the layers under one key.
    """

    dense: DenseArchitecture
    moe: MoEShape
    router_dtype: Optional[str] = None
    topk_scaling_factor: Optional[float] = None
    per_layer_keys: bool = False
    score_function: str = "softmax"
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None

    @property
    def num_null_copies(self) -> int:
        return self.moe.null_config.null_copies_for(self.moe.num_experts)

    @property
    def router_settings(self) -> dict:
        """TransformerConfig fields of its routers beyond the upcycler's softmax without
        groups (upcycle.architecture.build_gpt_model's router_settings)."""
        return dict(moe_router_score_function=self.score_function,
                    moe_router_num_groups=self.num_groups, moe_router_group_topk=self.group_topk)

    @property
    def expert_bias(self) -> bool:
        """Whether each router selects with a per-expert bias (Megatron's ``expert_bias``)."""
        return self.moe.null_config.expert_bias_rate is not None


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
            _refuse(directory, f"{flag}={value!r}: the export writes Qwen3-MoE layers; "
                               f"allowed: {allowed!r}.")
    refuse_unsupported(directory, args, UNSUPPORTED_MOE_SETTINGS, CHECKPOINT_FLAG)
    score_function = getattr(args, "moe_router_score_function", "softmax")
    if score_function not in SCORE_FUNCTIONS:
        _refuse(directory, f"--moe-router-score-function={score_function!r} is not "
                           f"supported; allowed: {', '.join(map(repr, SCORE_FUNCTIONS))}.")
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
    # Megatron limits the routing to groups only with --moe-router-group-topk (and checked
    # both at training); --moe-router-num-groups alone changes nothing.
    group_topk = getattr(args, "moe_router_group_topk", None) or None
    num_groups = getattr(args, "moe_router_num_groups", None) if group_topk else None
    # The plugin's rate (moe_null_expert_bias_rate) or Megatron's own flag: either way the
    # routers carry expert_bias, read from the checkpoint like the other tensors.
    expert_bias_rate = expert_bias_rate_from_args(args)
    if expert_bias_rate is not None and not 0 < expert_bias_rate < math.inf:
        _refuse(directory, f"--moe-router-bias-update-rate={expert_bias_rate!r} with "
                           "--moe-router-enable-expert-bias; allowed: a positive rate.")
    moe = MoEShape(
        num_experts=args.num_experts,
        expert_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None) or dense.ffn_hidden_size,
        topk=args.moe_router_topk,
        shared_expert_ffn_hidden_size=getattr(args, "moe_shared_expert_intermediate_size", 0) or 0,
        null_config=NullExpertConfig(
            real_fraction=getattr(args, "moe_null_expert_rho", None) or 1.0,
            num_null_copies=getattr(args, "moe_num_null_experts", None),
            expert_bias_rate=expert_bias_rate),
        moe_layers=tuple(layer + 1 for layer, is_moe in enumerate(pattern) if is_moe))
    return MoEModel(dense=dense, moe=moe, router_dtype=getattr(args, "moe_router_dtype", None),
                    topk_scaling_factor=getattr(args, "moe_router_topk_scaling_factor", None),
                    per_layer_keys=not isinstance(frequency, int) or frequency > 1,
                    score_function=score_function, num_groups=num_groups,
                    group_topk=group_topk)


_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.")


def checkpoint_tensors(model: torch.nn.Module, directory: Path, per_layer_keys: bool
                       ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Megatron GPTModel name, tensor) of every tensor the export needs, from the checkpoint
    in ``directory``, one layer at a time (the tensors outside the layers first). ``model``
    (TP=PP=EP=1, built from the checkpoint's args, never filled) gives the names, keys and
    regions; the tensors are read into memory of their own, a layer's released as the caller
    moves on to the next."""
    metadata = dict(dist_checkpointing.load_content_metadata(str(directory)) or {})
    if per_layer_keys:  # also for a --moe-layer-freq list of ones, which the model reads as 1
        metadata["non_homogeneous_layers"] = True
    try:
        stored = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except LOAD_ERRORS as error:
        _refuse(directory, f"its tensor metadata cannot be read ({type(error).__name__}: "
                           f"{str(error)[:300]}).")
    layers: Dict[Optional[int], Dict] = {}
    for name, entry in sharded_state_dict(model, metadata).items():
        if isinstance(entry, ShardedObject) or name.endswith(NOT_EXPORTED):
            continue  # _extra_state of Transformer Engine layers, controller state
        match = _LAYER_NAME.match(name)
        layers.setdefault(int(match.group(1)) if match else None, {})[name] = \
            _checkpoint_entry(directory, entry, stored)
    for layer in sorted(layers, key=lambda layer: -1 if layer is None else layer):
        yield from read_regions(directory, layers.pop(layer), stored).items()


def read_regions(directory: Path, entries: Dict, stored: Dict) -> Dict[str, torch.Tensor]:
    """{name: tensor} of Megatron's ShardedTensors (and factories) ``entries``, each read from
    its region of its checkpoint key (all TP/PP/EP shards that overlap it).

    Megatron's loader cannot read part of a key in one process: it describes the key's other
    regions as other ranks' shards, which in a world of one are its own. So the regions go
    to torch's checkpoint reader, with a planner that reads each one.
    """
    factories = {name: entry for name, entry in entries.items()
                 if isinstance(entry, ShardedTensorFactory)}
    built = dict(entries)
    apply_factories(built)
    targets, regions = {}, {}

    def target(sharded: ShardedTensor) -> torch.Tensor:
        if tuple(stored[sharded.key].size) != tuple(sharded.global_shape):
            _refuse(directory, f"tensor {sharded.key!r} has shape "
                               f"{tuple(stored[sharded.key].size)}; the model its args "
                               f"describe needs {tuple(sharded.global_shape)}.")
        name = f"{sharded.key}/{len(targets)}"
        targets[name] = torch.empty((1,) * sharded.prepend_axis_num + tuple(sharded.local_shape),
                                    dtype=sharded.dtype)
        regions[name] = (sharded.key, tuple(sharded.global_offset))
        return targets[name].view(sharded.local_shape)

    loaded = dict_list_map_inplace(target, built)
    try:
        torch_checkpoint.load(targets, storage_reader=FileSystemReader(str(directory)),
                              planner=_RegionLoadPlanner(regions), no_dist=True)
    except LOAD_ERRORS as error:
        _refuse(directory, f"its tensors cannot be read ({type(error).__name__}: "
                           f"{str(error)[:300]}).")
    return apply_factory_merges(loaded, factories)


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads each target tensor from the region of a checkpoint key, regions[name] = (key,
    offsets); DCP's default planner reads a plain tensor as a whole key."""

    def __init__(self, regions: Dict[str, Tuple[str, Tuple[int, ...]]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, tensor in self.state_dict.items():
            key, offsets = self.regions[name]
            region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.size())
            items += [dataclasses.replace(item, dest_index=dataclasses.replace(
                item.dest_index, fqn=name)) for item in create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [region])]
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


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
