"""One demo run: a small Megatron GPTModel with null experts trained on the digit task.

The model is Megatron-Core's GPTModel with the plugin's layers (local spec); the loop is a
plain AdamW loop so that several configurations and seeds fit in minutes on a CPU.
"""

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from megatron_null_moe.budget import DEFAULT_RATE, update_null_budgets
from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.demo import data
from megatron_null_moe.metrics import (
    RoutingStatistics,
    null_expert_routers,
    pop_layer_statistics,
    set_token_types,
)
from megatron_null_moe.spec import with_null_experts

BUDGET_SUFFIX = "+budget"
_CONFIG_NAME = re.compile(r"^K(\d+)_(\d+(?:\.\d+)?)(\+budget)?$")


@dataclass(frozen=True)
class RoutingSetup:
    """A configuration as the paper names it, e.g. K8_0.5: top-8 at real fraction 0.5;
    K8_0.5+budget: the same with the budget controller holding rho."""

    topk: int
    real_fraction: float
    budget_control: bool = False

    @classmethod
    def parse(cls, name: str, num_experts: int) -> "RoutingSetup":
        match = _CONFIG_NAME.match(name)
        if not match:
            raise ValueError(f"--configs: {name!r} is not K<topk>_<rho>[+budget] (e.g. K2_1.0, "
                             "K4_0.5, K4_0.5+budget)")
        setup = cls(int(match[1]), float(match[2]), budget_control=match[3] is not None)
        if setup.budget_control and setup.real_fraction == 1:
            raise ValueError(f"--configs: {name}: rho = 1 has no null experts to control")
        if setup.topk < 1:
            raise ValueError(f"--configs: {name}: top-K must be at least 1")
        null_copies = NullExpertConfig(real_fraction=setup.real_fraction).null_copies_for(
            num_experts)
        if setup.topk > num_experts + null_copies:
            raise ValueError(f"--configs: {name}: top-{setup.topk} exceeds the pool of "
                             f"{num_experts}+{null_copies} slots")
        return setup

    @property
    def name(self) -> str:
        return f"K{self.topk}_{self.real_fraction}" + (BUDGET_SUFFIX if self.budget_control else "")

    @property
    def null_config(self) -> NullExpertConfig:
        return NullExpertConfig(real_fraction=self.real_fraction,
                                budget_control_rate=DEFAULT_RATE if self.budget_control else None)

    @property
    def expected_real_experts(self) -> float:
        return self.topk * self.real_fraction


@dataclass(frozen=True)
class DemoModel:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_experts: int = 8
    expert_hidden_size: int = 64
    balance_coeff: float = 2e-2  # the paper's alpha
    z_loss_coeff: float = 1e-3
    learning_rate: float = 3e-3
    batch_size: int = 32

    @property
    def expert_flops_per_token(self) -> float:
        """Forward + backward FLOPs of one token through one expert (fc1 and fc2)."""
        return 3 * 2 * 2 * self.hidden_size * self.expert_hidden_size


@dataclass
class RunResult:
    setup: str
    seed: int
    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    expert_flops: List[float] = field(default_factory=list)  # cumulative, measured
    expected_expert_flops: List[float] = field(default_factory=list)  # cumulative, rho*K
    # real fraction of slots by step, layer and token type: [step][layer][type]
    real_fraction: List[List[List[float]]] = field(default_factory=list)
    layer_real_fraction: List[List[float]] = field(default_factory=list)  # [step][layer], all
    selection_bias: List[List[float]] = field(default_factory=list)  # [step][layer] used
    eval_loss: float = float("nan")
    eval_real_experts_histogram: Dict[str, List[List[int]]] = field(default_factory=dict)
    example_patch_compute: List[float] = field(default_factory=list)  # [P] mean real experts
    example_image: List[List[float]] = field(default_factory=list)
    example_caption: str = ""


def build_model(model: DemoModel, setup: RoutingSetup):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads, num_moe_experts=model.num_experts,
        moe_router_topk=setup.topk, moe_ffn_hidden_size=model.expert_hidden_size,
        ffn_hidden_size=4 * model.hidden_size, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=model.balance_coeff,
        moe_z_loss_coeff=model.z_loss_coeff, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True,
    )
    spec = with_null_experts(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                             setup.null_config)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=data.VOCAB_SIZE,
                    max_sequence_length=data.SEQUENCE_LENGTH)


def _forward_loss(gpt, batch: data.Batch, device):
    position_ids = torch.arange(data.SEQUENCE_LENGTH, device=device).expand_as(batch.tokens)
    causal = torch.ones(1, 1, data.SEQUENCE_LENGTH, data.SEQUENCE_LENGTH, dtype=torch.bool,
                        device=device).tril().logical_not()
    losses = gpt(batch.tokens.to(device), position_ids, causal, labels=batch.labels.to(device))
    mask = batch.loss_mask.to(device)
    return (losses.float() * mask).sum() / mask.sum()


def train_run(setup: RoutingSetup, seed: int, steps: int, model_shape: DemoModel,
              device: torch.device, on_step: Optional[Callable[[], None]] = None,
              eval_samples: int = 256, log_writer=None) -> RunResult:
    """Train one configuration from one seed; everything measured, nothing tuned per result.

    A pure function of (setup, seed): the host generator and Megatron's RNG tracker are
    seeded here, so the result does not depend on which runs came before in the process.
    """
    gpt, result = train_model(setup, seed, steps, model_shape, device, on_step, log_writer)
    _evaluate(gpt, result, model_shape, device, eval_samples, seed)
    set_token_types(gpt, None, num_types=1)
    return result


def train_model(setup: RoutingSetup, seed: int, steps: int, model_shape: DemoModel,
                device: torch.device, on_step: Optional[Callable[[], None]] = None,
                log_writer=None):
    """train_run's training alone: (the trained GPTModel, its RunResult without evaluation)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    gpt = build_model(model_shape, setup).to(device)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=model_shape.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=0.1)
    data_generator = torch.Generator().manual_seed(10_000 + seed)
    result = RunResult(setup=setup.name, seed=seed)
    routers = [router for _, router in sorted(null_expert_routers(gpt), key=lambda lr: lr[0])]
    flops = expected = 0.0
    gpt.train()
    for step in range(1, steps + 1):
        batch = data.make_batch(model_shape.batch_size, data_generator)
        set_token_types(gpt, batch.token_types.to(device), num_types=len(data.TOKEN_TYPE_NAMES))
        for group in optimizer.param_groups:  # linear warm-up over the first 10% of steps
            group["lr"] = model_shape.learning_rate * min(1.0, step / max(1, steps // 10))
        optimizer.zero_grad(set_to_none=True)
        loss = _forward_loss(gpt, batch, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        for module in gpt.modules():  # Megatron's finalize_model_grads does this per step
            if hasattr(module, "reset_global_aux_loss_tracker"):
                module.reset_global_aux_loss_tracker()
        by_layer = pop_layer_statistics(gpt, by_type=True)  # layer -> [per token type]
        layers = [by_layer[layer] for layer in sorted(by_layer)]
        merged = {layer: functools.reduce(RoutingStatistics.merged, by_layer[layer])
                  for layer in by_layer}
        result.selection_bias.append([_selection_bias(router) for router in routers])
        update_null_budgets(routers, merged)  # after the optimizer step, as in Megatron's loop
        computed_slots = sum(s.computed_real_slots for s in merged.values())
        tokens = sum(s.num_tokens for s in merged.values())
        flops += computed_slots * model_shape.expert_flops_per_token
        expected += tokens * setup.expected_real_experts * model_shape.expert_flops_per_token
        result.steps.append(step)
        result.train_loss.append(float(loss))
        result.expert_flops.append(flops)
        result.expected_expert_flops.append(expected)
        result.real_fraction.append([[s.real_fraction if s.num_tokens else float("nan")
                                      for s in layer] for layer in layers])
        result.layer_real_fraction.append([merged[layer].real_fraction for layer in sorted(merged)])
        if log_writer is not None:
            log_writer.add_scalar(f"{setup.name}/seed{seed}/train_loss", float(loss), step)
            for layer, fractions in enumerate(result.real_fraction[-1], start=1):
                for name, value in zip(data.TOKEN_TYPE_NAMES, fractions):
                    log_writer.add_scalar(
                        f"{setup.name}/seed{seed}/real_fraction_layer{layer}_{name}", value, step)
            for layer, (fraction, bias) in enumerate(
                    zip(result.layer_real_fraction[-1], result.selection_bias[-1]), start=1):
                log_writer.add_scalar(f"{setup.name}/seed{seed}/real_fraction_layer{layer}",
                                      fraction, step)
                if setup.budget_control:
                    log_writer.add_scalar(f"{setup.name}/seed{seed}/null_bias_layer{layer}",
                                          bias, step)
        if on_step is not None:
            on_step()
    return gpt, result


def _selection_bias(router) -> float:
    """The null selection bias a router used this step (0 without null experts)."""
    bias = getattr(router, "null_selection_bias", None)
    return 0.0 if bias is None else float(bias)


@torch.no_grad()
def _evaluate(gpt, result: RunResult, model_shape: DemoModel, device, samples: int, seed: int):
    """Held-out text loss, routing histograms per type, and one image's per-patch compute."""
    generator = torch.Generator().manual_seed(999_999 + seed)
    batch = data.make_batch(samples, generator)
    routed = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: routed.append(out[1]))
             for module in gpt.modules() if type(module).__name__ == "NullExpertRouter"]
    gpt.eval()
    result.eval_loss = float(_forward_loss(gpt, batch, device))
    for hook in hooks:
        hook.remove()
    # routing maps: [S*B, N] per layer, sequence-major -> real experts per token [B, S]
    real = torch.stack([m.sum(-1).reshape(data.SEQUENCE_LENGTH, samples).t() for m in routed])
    types = batch.token_types
    result.eval_real_experts_histogram = {
        name: [torch.bincount(layer[types == index].cpu(), minlength=gpt.config.moe_router_topk + 1
                              ).tolist() for layer in real]
        for index, name in enumerate(data.TOKEN_TYPE_NAMES) if name != "other"
    }
    result.example_patch_compute = real[:, 0, 1: 1 + data.NUM_PATCHES].float().mean(0).tolist()
    result.example_image = batch.images[0].tolist()
    result.example_caption = batch.captions[0]
