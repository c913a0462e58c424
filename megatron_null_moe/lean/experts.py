"""LeanGroupedExperts: all local experts as two stacked weights, run by grouped GEMMs.

A drop-in for Megatron's SequentialMLP / TEGroupedMLP (``MoESubmodules.experts``): the same
forward contract (tokens sorted by expert, tokens per expert, routing weights) and the same
distributed-checkpoint layout, so a torch_dist checkpoint saved with either loads into the
other. Differences: tokens per expert may stay on the device (the grouped GEMMs take device
offsets), and the input may carry unused rows after the last expert's rows (the lean
dispatcher's worst-case buffer); their output rows are left undefined.

Legend: M rows, H hidden, F expert FFN size (2F for fc1 with a gated linear unit), L local
experts.
"""

import functools
from typing import Callable, Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_object_for_checkpoint,
)
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_null_moe.lean import grouped_gemm
from megatron_null_moe.lean.permute import grouped_offsets
from megatron_null_moe.lean.support import validate_lean_experts


def expert_activation(fc1_output: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """[M, F]: Megatron's expert activation of fc1's [M, 2F] (GLU) or [M, F] output.

    GLU: act(gate) * (linear + glu_linear_offset), gate and linear the two halves, both
    clamped by activation_func_clamp_value when set, as Megatron's MLP does.
    """
    if not config.gated_linear_unit:
        return config.activation_func(fc1_output)
    gate, linear = torch.chunk(fc1_output, 2, dim=-1)
    if config.activation_func_clamp_value is not None:
        limit = config.activation_func_clamp_value
        gate, linear = gate.clamp(max=limit), linear.clamp(min=-limit, max=limit)
    return config.activation_func(gate) * (linear + config.glu_linear_offset)


def weighted_activation(fc1_output: torch.Tensor, probs_M: torch.Tensor,
                        config: TransformerConfig) -> torch.Tensor:
    """[M, F]: fc2's input, the expert activation times each row's routing weight, in the
    activation's dtype (as Megatron's experts multiply it)."""
    activated = expert_activation(fc1_output, config)
    return (activated * probs_M.unsqueeze(-1)).to(activated.dtype)


def recomputes_moe_act(config: TransformerConfig) -> bool:
    """Whether ``--recompute-granularity selective --recompute-modules moe_act`` asks the
    experts to recompute their activation in backward (Megatron's test in TEGroupedMLP)."""
    return (config.recompute_granularity == "selective"
            and "moe_act" in (config.recompute_modules or []))


def fp8_active(config: TransformerConfig) -> bool:
    """Whether this forward runs in FP8: config.fp8 set and, with Transformer Engine, inside
    its FP8 autocast (Megatron keeps e.g. the first and last layers in BF16 that way)."""
    if not config.fp8:
        return False
    if not HAVE_TE:
        return True
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    return FP8GlobalStateManager.is_fp8_enabled()


class StackedExpertLinear(torch.nn.Module):
    """One linear layer of every local expert: ``weight`` [L, out, in], no bias.

    Its checkpoint entries are produced by LeanGroupedExperts.sharded_state_dict. The
    ``_extra_state`` (always None) mirrors Megatron's linear layers, whose checkpoints carry
    one per expert.
    """

    def __init__(self, num_local_experts: int, input_size: int, output_size: int,
                 config: TransformerConfig):
        super().__init__()
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(
            num_local_experts, output_size, input_size, dtype=config.params_dtype, device=device))

    def forward(self, input_MK: torch.Tensor, offsets_L: torch.Tensor, fp8: bool
                ) -> torch.Tensor:
        if fp8:
            return grouped_gemm.fp8_grouped_linear(input_MK, self.weight, offsets_L)
        return grouped_gemm.grouped_linear(input_MK, self.weight, offsets_L)

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state) -> None:
        """Extra state is ignored (as in Megatron's own linear layers)."""


class LeanGroupedExperts(MegatronModule):
    """Local experts through grouped GEMMs with device-side offsets (``MoESubmodules.experts``).

    Parameters: ``linear_fc1.weight`` [L, 2F or F, H] and ``linear_fc2.weight`` [L, H, F],
    initialised expert by expert exactly as SequentialMLP initialises its experts. Routing
    weights multiply the activation before fc2, as in Megatron's experts; with
    ``--recompute-granularity selective --recompute-modules moe_act`` that weighted
    activation is recomputed in backward instead of kept.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig,
                 pg_collection=None, name: Optional[str] = None):
        validate_lean_experts(config)
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.activation_recompute = recomputes_moe_act(config)
        self.ep_group, self.tp_group = pg_collection.ep, pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        ffn = config.moe_ffn_hidden_size
        fc1_size = 2 * ffn if config.gated_linear_unit else ffn
        self.linear_fc1 = StackedExpertLinear(num_local_experts, config.hidden_size, fc1_size,
                                              config)
        self.linear_fc2 = StackedExpertLinear(num_local_experts, ffn, config.hidden_size,
                                              config)
        self._mark_parallel_attributes(config)
        if config.perform_initialization:
            self._initialise(config)

    def _mark_parallel_attributes(self, config: TransformerConfig) -> None:
        # As Megatron's expert linears: fc1 is column-parallel (GLU halves: stride 2), fc2
        # row-parallel; the stacked layout shifts each partition dim by the expert axis.
        uses_expert_groups = (
            config.expert_model_parallel_size > 1
            or config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        fc1_stride = 2 if config.gated_linear_unit else 1
        for linear, dim, stride in ((self.linear_fc1, 1, fc1_stride), (self.linear_fc2, 2, 1)):
            set_tensor_model_parallel_attributes(linear.weight, is_parallel=True, dim=dim,
                                                 stride=stride)
            setattr(linear.weight, "allreduce", not uses_expert_groups)

    @torch.no_grad()
    def _initialise(self, config: TransformerConfig) -> None:
        """Expert by expert, fc1 then fc2, drawing what SequentialMLP's linears draw."""
        methods = ((self.linear_fc1.weight, config.init_method),
                   (self.linear_fc2.weight, config.output_layer_init_method))
        for expert in range(self.num_local_experts):
            for weight, init_method in methods:
                if config.use_cpu_initialization:
                    master = torch.empty(weight.shape[1:], dtype=torch.float)
                    init_method(master)
                    weight[expert].copy_(master.to(config.params_dtype))
                else:
                    with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                        init_method(weight[expert])

    def forward(self, permuted_hidden_MH: torch.Tensor, tokens_per_expert_L: torch.Tensor,
                permuted_probs_M: torch.Tensor):
        """(output [M, H], None): rows of expert e are rows offsets[e-1]:offsets[e].

        tokens_per_expert_L: int [L], on the device or the host; rows past their sum are
        unused and their output rows undefined.
        """
        if permuted_hidden_MH.shape[0] == 0:
            # Grouped GEMM backward needs a row; it lies past every offset, so it is ignored
            # and the weights still get (zero) gradients. The routing weights stay in the
            # graph: the router's balance and z-losses reach the backward through them.
            padded = torch.cat([permuted_hidden_MH, permuted_hidden_MH.new_zeros(
                1, permuted_hidden_MH.shape[1])])
            padded_probs = torch.cat([permuted_probs_M, permuted_probs_M.new_zeros(1)])
            output, _ = self.forward(padded, tokens_per_expert_L, padded_probs)
            return output[:0], None
        offsets_L = grouped_offsets(tokens_per_expert_L, permuted_hidden_MH.device)
        fp8 = fp8_active(self.config)
        fc1_output = self.linear_fc1(permuted_hidden_MH, offsets_L, fp8)
        if self.activation_recompute:
            return self._recomputed_activation_and_fc2(fc1_output, permuted_probs_M, offsets_L,
                                                       fp8), None
        weighted = weighted_activation(fc1_output, permuted_probs_M, self.config)
        return self.linear_fc2(weighted, offsets_L, fp8), None

    def _recomputed_activation_and_fc2(self, fc1_output: torch.Tensor, probs_M: torch.Tensor,
                                       offsets_L: torch.Tensor, fp8: bool) -> torch.Tensor:
        """fc2 of the weighted activation, keeping only fc1's output and the routing weights.

        As TEGroupedMLP: the activation and routing-weight multiply run under Megatron's
        CheckpointWithoutOutput, whose output storage (the only [M, F] tensor fc2 saves for
        its weight gradient, in BF16/FP32 and in FP8 alike) is released once fc2 has run and
        refilled by recomputation when fc2's output gradient arrives. Its backward hands
        gradients to fc1's output and to the routing weights. fp8=None: the activation runs
        outside Transformer Engine, so no FP8 autocast state needs restoring for it.
        """
        checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
        weighted = checkpoint.checkpoint(
            functools.partial(weighted_activation, config=self.config), fc1_output, probs_M)
        output = self.linear_fc2(weighted, offsets_L, fp8)
        checkpoint.discard_output_and_register_recompute(output)
        return output

    def backward_dw(self) -> None:
        """Weight gradients are computed in backward (delayed wgrad is refused at build)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """SequentialMLP's checkpoint layout: per global expert, under ``{prefix}experts.``.

        Each stacked weight is one ShardedTensorFactory (its data is the parameter, so
        optimizer states map onto it) that splits into exactly the per-expert sharded
        tensors SequentialMLP saves (GLU fc1 in its two halves), and stacks them back on load.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards", False):
            raise ValueError(
                "LeanGroupedExperts: distributed checkpoints with singleton_local_shards=True "
                "are not supported; allowed: False (Megatron-LM's setting).")
        replica_id = (0, 0, self.dp_group.rank())
        expert_offsets = self._expert_offsets(sharded_offsets)
        sharded = {}
        for name, tp_axis, glu in (("linear_fc1", 0, self.config.gated_linear_unit),
                                   ("linear_fc2", 1, False)):
            linear = getattr(self, name)
            key = f"{prefix}experts.{name}"
            build = self._weight_builder(expert_offsets, tp_axis, glu,
                                         metadata["dp_cp_group"])
            sharded[f"{prefix}{name}.weight"] = ShardedTensorFactory(
                f"{key}.weight", linear.weight, build, _stack_experts, replica_id)
            sharded[f"{prefix}{name}._extra_state"] = [
                make_sharded_object_for_checkpoint(None, f"{key}._extra_state", offsets,
                                                   replica_id=replica_id)
                for offsets in expert_offsets]
        return sharded

    def _expert_offsets(self, sharded_offsets: tuple) -> list:
        """Per local expert: the sharded offsets with the global expert axis appended."""
        num_global = self.ep_group.size() * self.num_local_experts
        first = self.ep_group.rank() * self.num_local_experts
        axis = len(sharded_offsets)
        return [(*sharded_offsets, (axis, first + expert, num_global))
                for expert in range(self.num_local_experts)]

    def _weight_builder(self, expert_offsets: list, tp_axis: int, glu: bool,
                        dp_cp_group) -> Callable:
        tp_group = self.tp_group

        def build(key, stacked, replica_id, flattened_range):
            if flattened_range is not None:
                raise ValueError(
                    "LeanGroupedExperts: flattened optimizer states (distributed optimizer "
                    "'fully_sharded_model_space') are not supported; allowed: 'dp_reshardable' "
                    "(Megatron-LM's default) or --dist-ckpt-optim-fully-reshardable.")
            experts = []
            for expert, offsets in enumerate(expert_offsets):
                tensor = make_tp_sharded_tensor_for_checkpoint(
                    stacked[expert], key, tp_axis, replica_id=replica_id,
                    prepend_offsets=offsets, tp_group=tp_group, dp_cp_group=dp_cp_group)
                if glu:
                    tensor = apply_swiglu_sharded_factory(
                        tensor, offsets, tp_group=tp_group, dp_group=dp_cp_group).build()
                experts.append(tensor)
            return experts

        return build


def _stack_experts(loaded: list) -> torch.Tensor:
    """[L, out, in] from the per-expert tensors (GLU: the two halves of each) read back."""
    return torch.stack([torch.cat(expert) if isinstance(expert, (list, tuple)) else expert
                        for expert in loaded])
