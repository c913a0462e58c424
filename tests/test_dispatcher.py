"""Null-aware dispatchers: phantom slots masked, allgather correct, FP8 padding safe."""

import logging
from types import SimpleNamespace

import pytest
import torch

from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

from builders import build_moe_layer, moe_config
from megatron_null_moe.dispatcher import NullAwareAllGatherTokenDispatcher, mask_unrouted_slots
from megatron_null_moe.routing import route_with_null_experts


@pytest.mark.parametrize("tp_size,ep_size", [(1, 1), (1, 4), (2, 2), (2, 1)])
def test_flex_layout_phantom_slots_masked(tp_size, ep_size):
    """The DeepEP/NCCL-EP managers take top-(TP*K) of the expanded probs; every slot that
    is not a real assignment must come out as -1, every real one must survive."""
    num_experts, topk = 8, 4
    generator = torch.Generator().manual_seed(tp_size * 10 + ep_size)
    real = torch.randn(32, num_experts, generator=generator)
    null = torch.randn(32, generator=generator) + 0.5
    probs, routing_map, _ = route_with_null_experts(real, null, 8, topk)
    layout = SimpleNamespace(tp_size=tp_size, ep_size=ep_size,
                             num_local_experts=num_experts // ep_size)
    expanded_map, expanded_probs = MoEFlexTokenDispatcher._initialize_metadata(
        layout, routing_map, probs
    )
    expanded_map = expanded_map.reshape(32, -1)
    _, indices = torch.topk(expanded_probs.reshape(32, -1), tp_size * topk, dim=-1)
    masked = mask_unrouted_slots(indices, expanded_map)
    for token in range(32):
        kept = sorted(i for i in masked[token].tolist() if i >= 0)
        assert kept == expanded_map[token].nonzero().flatten().tolist()
    assert (masked == -1).any() and (routing_map.sum(-1) < topk).any()


def test_allgather_equals_alltoall_and_warns_once(parallel_state, caplog, monkeypatch):
    import megatron_null_moe.dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "_allgather_warned", False)
    hidden = torch.randn(12, 2, 16)
    outputs = {}
    with caplog.at_level(logging.WARNING, logger="megatron_null_moe.dispatcher"):
        for dispatcher in ("alltoall", "allgather", "allgather"):
            layer = build_moe_layer(moe_config(moe_token_dispatcher_type=dispatcher),
                                    real_fraction=0.5, seed=2)
            with torch.no_grad():
                outputs[dispatcher] = layer(hidden)[0]
    assert isinstance(layer.token_dispatcher, NullAwareAllGatherTokenDispatcher)
    torch.testing.assert_close(outputs["allgather"], outputs["alltoall"], rtol=1e-6, atol=1e-7)
    warnings = [r for r in caplog.records if "save no communication" in r.message]
    assert len(warnings) == 1 and "allgather" in warnings[0].message


def test_fp8_padding_keeps_router_map_and_output(parallel_state):
    """Upstream pads the routing map in place (FP8 alignment); the router's own map must stay
    as it was and padded rows must add nothing."""
    hidden = torch.randn(10, 2, 16)
    plain = build_moe_layer(moe_config(), real_fraction=0.5, seed=4)
    padded = build_moe_layer(moe_config(), real_fraction=0.5, seed=4)
    # FP8 itself needs Transformer Engine; the alignment logic only reads these two fields.
    padded.config.fp8, padded.config.moe_router_padding_for_quantization = "e4m3", True
    seen = {}

    def keep_map(module, args, output):
        seen["map"], seen["copy"] = output[1], output[1].clone()

    def keep_counts(module, args):
        seen["tokens_per_expert"] = torch.as_tensor(args[1])

    padded.router.register_forward_hook(keep_map)
    padded.experts.register_forward_pre_hook(keep_counts)
    padded.train()
    plain.train()
    output, _ = padded(hidden.clone().requires_grad_(True))
    expected, _ = plain(hidden.clone())
    output.sum().backward()
    assert torch.equal(seen["map"], seen["copy"])
    assert torch.all(seen["tokens_per_expert"] % 16 == 0)
    assert seen["tokens_per_expert"].sum() > seen["map"].sum()
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-7)
