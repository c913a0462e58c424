"""with_null_experts changes the MoE layers of any GPT spec and nothing else."""

import dataclasses
import functools

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from builders import moe_config
from megatron_null_moe import (
    NullExpertConfig,
    NullExpertMoELayer,
    NullExpertRouter,
    pop_layer_statistics,
    with_null_experts,
)

HALF = NullExpertConfig(real_fraction=0.5)


def _assert_only_mlp_changed(original, converted):
    assert isinstance(converted.submodules.mlp, functools.partial)
    assert converted.submodules.mlp.func is NullExpertMoELayer
    moe = converted.submodules.mlp.keywords["submodules"]
    assert moe.router.func is NullExpertRouter and moe.router.keywords["null_config"] is HALF
    original_moe = original.submodules.mlp.keywords["submodules"]
    assert moe.experts is original_moe.experts
    assert moe.shared_experts is original_moe.shared_experts
    for field in dataclasses.fields(original.submodules):
        if field.name != "mlp":
            assert getattr(converted.submodules, field.name) is getattr(original.submodules,
                                                                        field.name), field.name


def test_local_layer_spec():
    original = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    converted = with_null_experts(original, HALF)
    assert original.submodules.mlp.func is MoELayer  # the input is not modified
    assert original.submodules.mlp.keywords["submodules"].router is TopKRouter
    _assert_only_mlp_changed(original, converted)


def test_dense_spec_is_returned_unchanged():
    dense = get_gpt_layer_local_spec()
    assert with_null_experts(dense, HALF) is dense


def test_mixed_dense_and_moe_decoder_block_spec(parallel_state):
    config = moe_config(num_layers=4, moe_layer_freq=[0, 1, 0, 1])
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    converted = with_null_experts(block, HALF)
    kinds = []
    for original_layer, layer in zip(block.layer_specs, converted.layer_specs):
        if layer is original_layer:
            kinds.append("same")
        else:
            _assert_only_mlp_changed(original_layer, layer)
            kinds.append("null")
    assert kinds == ["same", "null", "same", "null"]
    assert converted.layer_norm is block.layer_norm


def test_module_spec_form_of_moe_layer():
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False).submodules.mlp
    as_module_spec = ModuleSpec(module=MoELayer, submodules=spec.keywords["submodules"])
    converted = with_null_experts(as_module_spec, HALF)
    assert converted.module is NullExpertMoELayer
    assert converted.submodules.router.func is NullExpertRouter


def test_custom_moe_layer_or_router_refused():
    class CustomMoE(MoELayer):
        pass

    class CustomRouter(TopKRouter):
        pass

    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    custom = functools.partial(CustomMoE, **spec.submodules.mlp.keywords)
    with pytest.raises(ValueError, match="CustomMoE.*allowed: MoELayer, NullExpertMoELayer or LeanNullExpertMoELayer"):
        with_null_experts(custom, HALF)
    submodules = dataclasses.replace(spec.submodules.mlp.keywords["submodules"],
                                     router=CustomRouter)
    with pytest.raises(ValueError, match="CustomRouter.*allowed: TopKRouter"):
        with_null_experts(functools.partial(MoELayer, submodules=submodules), HALF)


def test_gpt_model_with_null_experts_trains_one_step(parallel_state):
    config = moe_config(num_layers=3, moe_layer_freq=[1, 0, 1], hidden_dropout=0.0,
                        attention_dropout=0.0)
    block = with_null_experts(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                              HALF)
    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=64,
                     max_sequence_length=16)
    model.train()
    tokens = torch.randint(0, 64, (2, 16))
    position_ids = torch.arange(16).expand(2, -1)
    attention_mask = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril().logical_not()
    loss = model(tokens, position_ids, attention_mask, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    routers = [m for m in model.modules() if isinstance(m, NullExpertRouter)]
    assert len(routers) == 2 and all(r.null_weight.grad is not None for r in routers)
    statistics = pop_layer_statistics(model)
    assert sorted(statistics) == [1, 3]
    assert all(s.num_tokens == 32 for s in statistics.values())
