"""Qwen3-MoE with zero-compute null experts (megatron_null_moe.export), for inference.

Each MoE layer's router holds N real rows and one null row; the null logit stands for M
copies. The routing is the training plugin's own code (``pool_routing``): top-K over the
N + M pool on softmax logits or sigmoid scores (``router_score_function``), the layer's
``null_selection_bias`` added to the null logit and its per-expert ``expert_bias`` (when
``router_expert_bias``) to the real experts' keys for the choice only, within each token's
best groups of real experts when ``router_num_groups`` is set; weights renormalised over the
selected real experts from the router's unbiased logits. Null slots are dropped before any
expert work: each expert runs on its real tokens only, and a token with no real expert gets
0 from the routed experts (the shared expert, if any, runs on every token).
``output_real_experts_per_token=True`` (a forward argument or the config's) adds each MoE
layer's real experts per token, [batch, sequence], to the output.

Weight names are Qwen3-MoE's (``mlp.gate.weight``, ``mlp.experts.E.{gate,up,down}_proj``),
plus ``mlp.gate.null_weight``, ``mlp.gate.null_selection_bias`` and ``mlp.gate.expert_bias``
(both fp32 in any model dtype) and ``mlp.shared_expert.{gate,up,down}_proj``. Shape legend:
T tokens, H hidden, N real experts.
"""

from dataclasses import dataclass

import torch
from torch import nn

from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeMLP,
    Qwen3MoeModel,
    Qwen3MoePreTrainedModel,
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder

from .configuration_qwen3_null_moe import Qwen3NullMoeConfig
from .pool_routing import real_experts_per_token, route_with_null_experts

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Selection biases added to fp32 (or wider) logits or scores: kept in fp32 in any model dtype.
FP32_BUFFERS = ("null_selection_bias", "expert_bias")


class Qwen3NullMoeRouter(Qwen3MoeTopKRouter):
    """Qwen3-MoE's router with a null row ``null_weight`` [1, H] and the budget controller's
    ``null_selection_bias`` [1] (when M > 0), and the per-expert selection bias
    ``expert_bias`` [N] (when ``router_expert_bias``), routing as the plugin's
    NullExpertRouter.

    Returns pool logits [T, N (+1)], routing weights [T, N] (0 where not routed), routing
    map [T, N] (bool, real experts only) and real experts per token (input's leading shape).
    """

    def __init__(self, config: Qwen3NullMoeConfig):
        super().__init__(config)
        self.num_null_experts = config.num_null_experts
        self.router_dtype = ROUTER_DTYPES.get(config.router_dtype)
        self.scaling_factor = config.router_topk_scaling_factor
        self.score_function = config.router_score_function
        self.num_groups = config.router_num_groups
        self.group_topk = config.router_group_topk
        self.null_weight = None
        if self.num_null_experts > 0:
            self.null_weight = nn.Parameter(torch.zeros(1, self.hidden_dim))
            self.register_buffer("null_selection_bias", torch.zeros(1, dtype=torch.float32))
        if config.router_expert_bias:
            self.register_buffer("expert_bias",
                                 torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Module.bfloat16()/half() cast every floating buffer; the selection biases, added to
        # fp32 logits or scores, keep their fp32 values (they only follow the device).
        kept = {name: self._buffers[name] for name in FP32_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self

    def forward(self, hidden_states: torch.Tensor):
        hidden_TH = hidden_states.reshape(-1, self.hidden_dim)
        weight = self.weight
        if self.null_weight is not None:
            weight = torch.cat([weight, self.null_weight])
        dtype = self.router_dtype or hidden_TH.dtype  # as Megatron's router_gating_linear
        logits_TG = nn.functional.linear(hidden_TH.to(dtype), weight.to(dtype))
        null_T = logits_TG[:, self.num_experts] if self.null_weight is not None else None
        probs_TN, routing_map_TN, _ = route_with_null_experts(
            logits_TG[:, : self.num_experts], null_T, self.num_null_experts, self.top_k,
            scaling_factor=self.scaling_factor,
            null_selection_bias=getattr(self, "null_selection_bias", None),
            score_function=self.score_function, expert_bias=getattr(self, "expert_bias", None),
            num_groups=self.num_groups, group_topk=self.group_topk)
        real = real_experts_per_token(routing_map_TN).view(hidden_states.shape[:-1])
        return logits_TG, probs_TN, routing_map_TN, real


class Qwen3NullMoeExpert(Qwen3MoeMLP):
    """Qwen3-MoE's MLP; given routing weights, it scales the activation before down_proj, as
    Megatron's experts do (the same product, rounded as in training)."""

    def forward(self, hidden_TH: torch.Tensor, weights_T: torch.Tensor | None = None):
        if weights_T is None:
            return super().forward(hidden_TH)
        activation = self.act_fn(self.gate_proj(hidden_TH)) * self.up_proj(hidden_TH)
        return self.down_proj((activation * weights_T.unsqueeze(-1)).to(activation.dtype))


class Qwen3NullMoeSparseBlock(nn.Module):
    """Router, N experts that run on their real tokens only, and an optional shared expert."""

    def __init__(self, config: Qwen3NullMoeConfig):
        super().__init__()
        self.gate = Qwen3NullMoeRouter(config)
        self.experts = nn.ModuleList(
            Qwen3NullMoeExpert(config, intermediate_size=config.moe_intermediate_size)
            for _ in range(config.num_experts))
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = Qwen3MoeMLP(
                config, intermediate_size=config.shared_expert_intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, probs_TN, routing_map_TN, _ = self.gate(hidden_states)
        output_TH = torch.zeros_like(hidden_TH)
        # Which experts have real tokens is needed on the host to run only those.
        for expert in routing_map_TN.any(dim=0).nonzero().flatten().tolist():
            tokens = routing_map_TN[:, expert].nonzero().flatten()
            expert_output = self.experts[expert](hidden_TH[tokens], probs_TN[tokens, expert])
            output_TH.index_add_(0, tokens, expert_output.to(output_TH.dtype))
        if self.shared_expert is not None:
            output_TH = output_TH + self.shared_expert(hidden_TH)
        return output_TH.view_as(hidden_states)


class Qwen3NullMoePreTrainedModel(Qwen3MoePreTrainedModel):
    config: Qwen3NullMoeConfig
    config_class = Qwen3NullMoeConfig
    # The selection biases are added to fp32 logits or scores: rounding them to bf16 would
    # move them.
    _keep_in_fp32_modules_strict = list(FP32_BUFFERS)
    _can_record_outputs = {
        **Qwen3MoePreTrainedModel._can_record_outputs,
        "real_experts_per_token": OutputRecorder(Qwen3NullMoeRouter, index=3),
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Qwen3NullMoeRouter) and module.null_weight is not None:
            init.normal_(module.null_weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.null_selection_bias)
        if isinstance(module, Qwen3NullMoeRouter) and "expert_bias" in module._buffers:
            init.zeros_(module.expert_bias)


class Qwen3NullMoeModel(Qwen3NullMoePreTrainedModel, Qwen3MoeModel):
    """Qwen3-MoE's decoder with the null-expert block in its MoE layers."""

    def __init__(self, config: Qwen3NullMoeConfig):
        # Qwen3-MoE builds its own MoE blocks first; from_pretrained builds on the meta
        # device, where the replaced blocks allocate nothing.
        super().__init__(config)
        for layer in self.layers:
            if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock):
                layer.mlp = Qwen3NullMoeSparseBlock(config)
        self.post_init()


@dataclass
class Qwen3NullMoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """real_experts_per_token: one [batch, sequence] tensor per MoE layer, on request."""

    real_experts_per_token: tuple[torch.Tensor, ...] | None = None


class Qwen3NullMoeForCausalLM(Qwen3NullMoePreTrainedModel, GenerationMixin):
    """Language-model head over Qwen3NullMoeModel. Its own forward: Qwen3-MoE's adds a
    balance loss over N experts and top-K that does not describe the N + M pool."""

    _tied_weights_keys = Qwen3MoeForCausalLM._tied_weights_keys
    _tp_plan = Qwen3MoeForCausalLM._tp_plan
    _pp_plan = Qwen3MoeForCausalLM._pp_plan

    def __init__(self, config: Qwen3NullMoeConfig):
        super().__init__(config)
        self.model = Qwen3NullMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                **kwargs) -> Qwen3NullMoeCausalLMOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return Qwen3NullMoeCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            real_experts_per_token=outputs.get("real_experts_per_token"))


__all__ = ["Qwen3NullMoeForCausalLM", "Qwen3NullMoeModel", "Qwen3NullMoePreTrainedModel"]
