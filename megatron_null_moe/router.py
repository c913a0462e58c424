"""NullExpertRouter: Megatron's TopKRouter over a pool of N real experts and M null copies.

Usable as ``MoESubmodules.router``. It returns what every Megatron dispatcher expects, probs
and routing_map over the N real experts, but a token may now have fewer than K real experts.
"""

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    get_tokens_per_expert_and_token_count,
    router_gating_linear,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_null_moe.config import (
    NullExpertConfig,
    validate_for_transformer_config,
    validated_settings,
)
from megatron_null_moe.metrics import RoutingStatistics
from megatron_null_moe.routing import (
    grouped_pool_logits,
    grouped_pool_probs,
    grouped_pool_sigmoid_probs,
    grouped_slot_counts,
    pool_load_balancing_loss,
    route_with_null_experts,
    select_pool_slots,
    selection_keys,
)

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Budget-controller state (budget.py) and the logit-spread counter: kept in fp32 whatever
# the model's dtype.
_BUDGET_BUFFERS = ("null_selection_bias", "null_bias_integral")
_FP32_BUFFERS = (*_BUDGET_BUFFERS, "real_logit_spread_sum", "expert_bias")


class NullExpertRouter(TopKRouter):
    """Top-K router with zero-compute null experts (one extra logit row, M virtual copies).

    The null row is a separate parameter ``null_weight`` [1, hidden] (and ``null_bias`` with
    ``add_bias_linear``) beside Megatron's ``weight`` [N, hidden], so an ordinary MoE
    checkpoint's router loads unchanged. With M = 0 (rho = 1) there is no null row and the
    router computes exactly what TopKRouter computes. With M > 0 the buffers
    ``null_selection_bias`` and ``null_bias_integral`` hold the budget controller's state
    (0 and unchanged unless the controller runs). With a per-expert bias (expert_bias.py)
    Megatron's ``expert_bias`` buffer holds it, N entries.
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, is_mtp_layer: bool = False,
                 null_config: Optional[NullExpertConfig] = None):
        self.null_config = null_config if null_config is not None else NullExpertConfig()
        # Validate before the parent allocates anything, so a bad config fails first and clearly.
        self.num_null_copies = validate_for_transformer_config(self.null_config, config)
        self._validated_settings = validated_settings(config)
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.pool_size = self.num_experts + self.num_null_copies
        self._register_expert_bias()
        self.null_weight = self.null_bias = None
        if self.num_null_copies > 0:
            self.null_weight = torch.nn.Parameter(torch.empty(1, config.hidden_size))
            if config.add_bias_linear:
                self.null_bias = torch.nn.Parameter(torch.empty(1))
            self._reset_null_parameters()
            for name in _BUDGET_BUFFERS:
                self.register_buffer(
                    name, torch.zeros(1, dtype=torch.float32, device=self.weight.device))
        # Host-side: whether null_selection_bias may be non-zero (set by the controller and by
        # loading), so the paper's path needs no second selection and no device read.
        self.null_bias_in_use = False
        if self.global_tokens_per_expert is not None:
            # Global-batch counts cover the grouped pool: N real experts and the null group.
            self.register_buffer(
                "global_tokens_per_expert",
                self.global_tokens_per_expert.new_zeros(self._grouped_columns()),
                persistent=False,
            )
        # [token types, K+1]: tokens of each type whose routing chose r real experts,
        # [token types]: real assignments dropped over capacity, and [N]: the real
        # assignments each expert was chosen for (before drops). Integer counts: Float16Module
        # casts floating buffers to bf16, which would round them.
        self.register_buffer(
            "real_experts_histogram", torch.zeros(1, self.topk + 1, dtype=torch.int64),
            persistent=False,
        )
        self.register_buffer("dropped_assignments", torch.zeros(1, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("real_assignments_per_expert",
                             torch.zeros(self.num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("real_logit_spread_sum", torch.zeros(1, dtype=torch.float32),
                             persistent=False)
        self.token_types: Optional[torch.Tensor] = None

    @property
    def expert_bias_rate(self) -> Optional[float]:
        """The per-expert selection bias's update rate, or None when it is off: the plugin's
        (null_config.expert_bias_rate) or, set in Megatron's config, Megatron's."""
        if self.null_config.expert_bias_rate is not None:
            return self.null_config.expert_bias_rate
        if self.config.moe_router_enable_expert_bias:
            return self.config.moe_router_bias_update_rate
        return None

    def _register_expert_bias(self):
        """Megatron's ``expert_bias`` buffer (fp32, N entries, saved in checkpoints), updated
        by the plugin once per global batch (expert_bias.py), never by Megatron."""
        if self.expert_bias_rate is None:
            return
        if self.expert_bias is None:  # TopKRouter registers it only for Megatron's own flag
            del self.expert_bias
            self.register_buffer("expert_bias", torch.zeros(
                self.num_experts, dtype=torch.float32, device=self.weight.device))
        # Megatron's finalize_model_grads would update it from counts after capacity drops,
        # with an all-reduce of its own and no re-centring: it skips frozen biases.
        self.frozen_expert_bias = True

    def _grouped_columns(self) -> int:
        return self.num_experts + (1 if self.num_null_copies > 0 else 0)

    def _apply(self, fn, recurse=True):
        # Module.half()/bfloat16() and Float16Module cast every floating buffer; the budget
        # state keeps its fp32 values (it only follows the device).
        kept = {name: self._buffers[name] for name in _FP32_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self

    def reset_parameters(self):
        super().reset_parameters()
        if getattr(self, "null_weight", None) is not None:
            self._reset_null_parameters()

    def _reset_null_parameters(self):
        for param in (self.null_weight, self.null_bias):
            if param is None:
                continue
            if self.config.perform_initialization:
                self.config.init_method(param.data)
            param.data = param.data.to(dtype=self.config.params_dtype, device=self.weight.device)
            setattr(param, "sequence_parallel", self.config.sequence_parallel)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An ordinary MoE checkpoint has no null row. Start the null logit at the mean real
        # logit (null row = mean of the real rows): routing begins close to the trained
        # top-K, and the balance loss (or the budget controller) then moves the real
        # fraction towards rho. A checkpoint without budget state starts the controller at 0.
        if self.null_weight is not None and prefix + "weight" in state_dict:
            for null_name, real_name in (("null_weight", "weight"), ("null_bias", "bias")):
                if getattr(self, null_name) is not None and prefix + null_name not in state_dict:
                    real = state_dict[prefix + real_name]
                    state_dict[prefix + null_name] = (
                        real.float().mean(dim=0, keepdim=True).to(real.dtype))
            for name in _BUDGET_BUFFERS:
                state_dict.setdefault(prefix + name, torch.zeros_like(self._buffers[name]))
        if self.expert_bias is not None and prefix + "weight" in state_dict:
            # A checkpoint trained without the per-expert bias starts it at 0.
            state_dict.setdefault(prefix + "expert_bias", torch.zeros_like(self.expert_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.num_null_copies > 0:
            self.null_bias_in_use = bool(self.null_selection_bias.abs().sum() > 0)

    @property
    def target_real_fraction(self) -> float:
        """rho in the paper: N / (N + M), the fraction of slots meant for real experts."""
        return self.null_config.pool_real_fraction(self.num_experts)

    @property
    def expected_real_slots(self) -> float:
        """rho * K: the expected number of real experts per token."""
        return self.target_real_fraction * self.topk

    @property
    def global_layer_number(self) -> int:
        """1-based over the decoder's layers, then the MTP layers (as Megatron logs them)."""
        return self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if validated_settings(self.config) != self._validated_settings:
            # Options switched on in the config after the router was built get the refusal
            # they would have got at construction; host-side only, no device work.
            self.num_null_copies = validate_for_transformer_config(self.null_config, self.config)
            if self.expert_bias_rate is not None and self.expert_bias is None:
                raise ValueError(
                    "moe_router_enable_expert_bias (--moe-router-enable-expert-bias) was "
                    "switched on after the router was built, which has no expert_bias buffer; "
                    "allowed: set it before the model is built.")
            self._validated_settings = validated_settings(self.config)
        return super().forward(input, padding_mask=padding_mask)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """[S, B, G] logits: N real logits, then the null logit when M > 0."""
        if self.weight.device != input.device:
            # Upstream moves router weights to CUDA here; follow the input instead (CPU too).
            self._move_parameters_to(input.device)
        weight, bias = self.weight, self.bias
        if self.null_weight is not None:
            weight = torch.cat([weight, self.null_weight], dim=0)
            if bias is not None:
                bias = torch.cat([bias, self.null_bias], dim=0)
        router_dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        return router_gating_linear(input, weight, bias, router_dtype)

    def _move_parameters_to(self, device: torch.device):
        for param in (self.weight, self.bias, self.null_weight, self.null_bias):
            if param is not None:
                param.data = param.data.to(device=device)

    @property
    def selection_options(self) -> dict:
        """route_with_null_experts' options this router selects with besides the null bias:
        score function, per-expert bias, group limit."""
        return dict(score_function=self.score_function, expert_bias=self.expert_bias,
                    num_groups=self.config.moe_router_num_groups,
                    group_topk=self.config.moe_router_group_topk)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route [S, B, G] logits; returns probs and routing_map over the N real experts.

        padding_mask follows the router's upstream convention: [S, B], True marks padding.
        """
        seq_length, bsz = logits.shape[:2]
        pool_logits = logits.reshape(-1, logits.shape[-1])
        real_logits = pool_logits[:, : self.num_experts]
        null_logit = pool_logits[:, self.num_experts] if self.num_null_copies > 0 else None
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)

        # z-loss over all N + M logits (logsumexp of the grouped pool equals the pool's). The
        # grouped logits serve the losses only; their real columns are the router's logits
        # converted exactly, so routing from them selects exactly what the router's logits
        # select, in any dtype, and carries the z-loss gradient.
        grouped = self.apply_z_loss(
            grouped_pool_logits(real_logits, null_logit, self.num_null_copies), padding_mask
        )
        probs, routing_map, slot_experts = route_with_null_experts(
            grouped[:, : self.num_experts], null_logit, self.num_null_copies, self.topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            null_selection_bias=getattr(self, "null_selection_bias", None),
            **self.selection_options,
        )
        probs = probs.to(logits.dtype)
        chosen_map = routing_map
        if self.config.moe_expert_capacity_factor is not None:
            # Capacity counts the expected real slots rho*K, not K.
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map,
                router_topk=self.expected_real_slots,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
            )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            if self.null_bias_in_use or self.expert_bias is not None \
                    or self.config.moe_router_group_topk:
                # The selection biases and the group limit move the choice only: the balance
                # loss counts the slots the router's own scores choose over the whole pool, as
                # in the paper and as upstream counts for its loss, so loss and biases do not
                # pull against each other.
                slot_experts = select_pool_slots(
                    *selection_keys(grouped[:, : self.num_experts], null_logit,
                                    self.score_function),
                    self.num_null_copies, self.topk)
            probs = self._apply_pool_balance_losses(
                probs, grouped, null_logit, slot_experts, seq_length, bsz, padding_mask
            )
        if self.training and torch.is_grad_enabled():
            self._record_statistics(chosen_map, routing_map, grouped[:, : self.num_experts],
                                    padding_mask)
        return probs, routing_map

    def _apply_pool_balance_losses(self, probs, grouped_logits, null_logit, slot_experts,
                                   seq_length, bsz, padding_mask):
        """Attach the balance losses over the N + M pool at each configured scope."""
        if self.score_function == "sigmoid":
            pool_probs = grouped_pool_sigmoid_probs(
                grouped_logits[:, : self.num_experts], null_logit, self.num_null_copies)
        else:
            pool_probs = grouped_pool_probs(grouped_logits, self.num_null_copies)
        slot_counts = grouped_slot_counts(slot_experts, self.num_experts, self.num_null_copies)
        with_padding = padding_mask is not None
        if with_padding:
            valid = (~padding_mask).unsqueeze(-1)
            pool_probs, slot_counts = pool_probs * valid, slot_counts * valid

        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff > 0:
            counts, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
                slot_counts, self.tp_cp_group, topk=self.topk, with_padding_mask=with_padding
            )
            loss = pool_load_balancing_loss(
                pool_probs, counts, total_tokens, self.topk, self.pool_size, coeff
            )
            probs = self.attach_and_log_load_balancing_loss(
                probs, coeff, loss, "load_balancing_loss", self.tp_cp_group,
                valid_token_count=local_tokens,
            )

        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if coeff > 0:
            # Sequences side by side as columns: one loss per sequence, summed, then averaged.
            counts, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
                slot_counts.reshape(seq_length, -1), self.tp_cp_group,
                topk=self.topk * bsz, with_padding_mask=with_padding,
            )
            loss = pool_load_balancing_loss(
                pool_probs.reshape(seq_length, -1), counts, total_tokens, self.topk,
                self.pool_size, coeff,
            ) / bsz
            probs = self.attach_and_log_load_balancing_loss(
                probs, coeff, loss, "seq_load_balancing_loss", self.tp_cp_group,
                valid_token_count=local_tokens * bsz,
            )

        coeff = self.get_aux_loss_coeff("global_aux_loss")
        if coeff > 0:
            # Counts accumulate over the micro-batches of the global batch; Megatron's
            # finalize_model_grads calls reset_global_aux_loss_tracker after each step.
            counts, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
                slot_counts, self.tp_dp_cp_group, topk=self.topk, with_padding_mask=with_padding
            )
            self.global_tokens_per_expert += counts
            self.ga_steps += 1
            loss = pool_load_balancing_loss(
                pool_probs, self.global_tokens_per_expert / self.ga_steps, total_tokens,
                self.topk, self.pool_size, coeff,
            )
            probs = self.attach_and_log_load_balancing_loss(
                probs, coeff, loss, "global_load_balancing_loss", self.tp_dp_cp_group,
                needs_dp_avg=False, valid_token_count=local_tokens,
            )
        return probs

    def set_token_types(self, token_types: Optional[torch.Tensor], num_types: int = 1):
        """Count the statistics per token type (e.g. image vs text) from the next forward on.

        token_types: int [num_tokens] in this router's token order (sequence-major, as the
        router sees them), values in [0, num_types); None counts all tokens as type 0.
        """
        if num_types != self.real_experts_histogram.shape[0]:
            self.real_experts_histogram = self.real_experts_histogram.new_zeros(
                num_types, self.topk + 1)
            self.dropped_assignments = self.dropped_assignments.new_zeros(num_types)
        self.token_types = token_types

    @torch.no_grad()
    def _record_statistics(self, chosen_map: torch.Tensor, routed_map: torch.Tensor,
                           real_logits: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """Add this micro-batch to the counters, on the device and without a host sync.

        chosen_map: the routing decision [T, N]; routed_map: what is computed after drops
        over capacity (the same tensor without a capacity factor); real_logits [T, N]. The
        per-expert counts are the chosen map's column sums over the counted tokens.
        """
        real_per_token = chosen_map.sum(dim=-1)
        num_types, width = self.real_experts_histogram.shape
        types = self.token_types
        if types is None:
            types = torch.zeros_like(real_per_token)
        elif types.shape != real_per_token.shape:
            raise ValueError(f"set_token_types: {tuple(types.shape)} token types for "
                             f"{real_per_token.numel()} routed tokens")
        types = types.to(real_per_token.device)
        counted = torch.ones_like(real_per_token)
        if padding_mask is not None:
            counted = counted.masked_fill(padding_mask, 0)
        if self.real_experts_histogram.device != real_per_token.device:
            for name in ("real_experts_histogram", "dropped_assignments",
                         "real_assignments_per_expert", "real_logit_spread_sum"):
                setattr(self, name, getattr(self, name).to(real_per_token.device))
        # scatter_add_ into fixed-size counters: bincount would size its output on the host.
        self.real_experts_histogram.view(-1).scatter_add_(
            0, types * width + real_per_token, counted)
        counted_map = chosen_map if padding_mask is None else \
            chosen_map.masked_fill(padding_mask.unsqueeze(-1), False)
        self.real_assignments_per_expert += counted_map.sum(dim=0)
        if routed_map is not chosen_map:
            dropped = (real_per_token - routed_map.sum(dim=-1)) * counted
            self.dropped_assignments.scatter_add_(0, types, dropped)
        if self.num_experts > 1:
            spread_T = real_logits.detach().float().std(dim=-1).nan_to_num(0.0, 0.0, 0.0)
            self.real_logit_spread_sum += (spread_T * counted).sum()

    def pop_routing_statistics(self, by_type: bool = False):
        """Statistics since the last call (this rank's tokens), then reset. Syncs the host.

        Returns one RoutingStatistics, or with by_type a list of them, one per token type.
        """
        histogram = self.real_experts_histogram.to("cpu", copy=True)
        dropped = self.dropped_assignments.to("cpu", copy=True)
        spread = float(self.real_logit_spread_sum)
        self.reset_routing_counters()
        rho = self.target_real_fraction
        if by_type:
            # The logit spread is not kept per type: each type's share is by token count.
            total = max(int(histogram.sum()), 1)
            return [RoutingStatistics.from_histogram(row, rho, int(drops),
                                                     spread * int(row.sum()) / total)
                    for row, drops in zip(histogram, dropped)]
        return RoutingStatistics.from_histogram(histogram.sum(dim=0), rho, int(dropped.sum()),
                                                spread)

    def reset_routing_counters(self) -> None:
        for counter in (self.real_experts_histogram, self.dropped_assignments,
                        self.real_assignments_per_expert, self.real_logit_spread_sum):
            counter.zero_()

    def extra_repr(self) -> str:
        rho = self.target_real_fraction
        return (f"num_experts={self.num_experts}, num_null_copies={self.num_null_copies}, "
                f"topk={self.topk}, real_fraction={rho:.4g}, "
                f"expected_real_slots={rho * self.topk:.4g}")

