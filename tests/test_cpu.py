"""The CPU harness: reversible patches, Megatron's real MoE code on the CPU, gloo ranks."""

import functools
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_null_moe.cpu import (
    cpu_harness,
    destroy_cpu_parallel_state,
    init_cpu_parallel_state,
)
from megatron_null_moe.cpu_ranks import run_on_ranks

TORCH_CUDA_STAND_INS = [
    "synchronize", "empty_cache", "memory_stats", "memory_allocated", "max_memory_allocated",
    "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats", "set_device",
    "current_device", "Stream", "Event", "current_stream", "default_stream", "stream",
    "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all",
]
# (module, attribute path) of everything the harness replaces while it is active.
PATCHED = [("torch.cuda", name) for name in TORCH_CUDA_STAND_INS] + [
    ("torch.cuda.random", "get_rng_state"),
    ("torch", "Tensor.cuda"),
    ("torch", "Tensor.record_stream"),
    ("torch", "nn.Module.cuda"),
    ("torch.autograd", "_engine_run_backward"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),
    ("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu"),
    ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.training.initialize", "initialize_megatron"),
    ("megatron.training.training", "initialize_megatron"),
    ("megatron.training.initialize", "_initialize_distributed"),
    ("megatron.training.initialize", "_set_random_seed"),
    ("megatron.training.utils.common_utils", "get_device_arch_version"),
    ("megatron.training.arguments", "get_device_arch_version"),
    ("megatron.training.training", "train_step"),
    ("megatron.training.training", "evaluate"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("torch.distributed", "all_gather"),
    ("torch.distributed", "reduce_scatter"),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm"),
    ("megatron.core.models.backends", "LNImpl"),
    ("megatron.core.models.gpt.gpt_layer_specs", "LNImpl"),
    ("megatron.core.transformer.transformer_block", "LayerNormImpl"),
]

# Runs in a fresh interpreter: ids of the patched objects before and after the import.
IMPORT_CHANGES_NOTHING = """
import functools, importlib, json, sys
def snapshot():
    return [id(functools.reduce(getattr, path.split("."), importlib.import_module(module)))
            for module, path in json.loads(sys.argv[1])]
before = snapshot()
import megatron_null_moe.cpu
assert snapshot() == before, "importing megatron_null_moe.cpu patched something"
"""

HIDDEN, NUM_EXPERTS, TOKENS, BATCH = 16, 4, 6, 2


def current(module: str, path: str):
    return functools.reduce(getattr, path.split("."), importlib.import_module(module))


def snapshot() -> dict:
    return {(module, path): current(module, path) for module, path in PATCHED}


def function_modes() -> list:
    return torch.overrides._get_current_function_mode_stack()


def moe_config(**overrides) -> TransformerConfig:
    settings = dict(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=32, num_attention_heads=2,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        add_bias_linear=False, params_dtype=torch.float32,
    )
    return TransformerConfig(**{**settings, **overrides})


def build_moe_layer(config: TransformerConfig):
    """Megatron's MoELayer (TopKRouter, SequentialMLP experts) from the local GPT layer spec."""
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    return spec.submodules.mlp(config=config)


@pytest.fixture
def cpu_parallel_state():
    if torch.cuda.is_available():
        pytest.skip("in-process harness tests run only where CUDA is absent")
    with cpu_harness():
        init_cpu_parallel_state()
        try:
            yield
        finally:
            destroy_cpu_parallel_state()


def test_import_patches_nothing():
    watched = json.dumps(PATCHED)
    subprocess.run([sys.executable, "-c", IMPORT_CHANGES_NOTHING, watched], check=True)


def test_harness_patches_while_active_and_restores_on_exit():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    originals = snapshot()
    modes_before = function_modes()
    with cpu_harness():
        patched = snapshot()
        assert [key for key in PATCHED if patched[key] is originals[key]] == []
        assert len(function_modes()) == len(modes_before) + 1
        assert torch.empty(2, device="cuda").device.type == "cpu"
        assert torch.zeros(1).to(torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert not torch.cuda.is_available()
    restored = snapshot()
    assert [key for key in PATCHED if restored[key] is not originals[key]] == []
    assert function_modes() == modes_before


def test_nested_entries_restore_at_the_outermost_exit():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    original_synchronize = torch.cuda.synchronize
    with cpu_harness():
        with cpu_harness():
            pass
        assert torch.cuda.synchronize is not original_synchronize
        assert torch.empty(1, device="cuda").device.type == "cpu"
    assert torch.cuda.synchronize is original_synchronize


def test_refuses_to_enter_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original_synchronize = torch.cuda.synchronize
    with pytest.raises(RuntimeError, match="force=True"):
        with cpu_harness():
            pass
    assert torch.cuda.synchronize is original_synchronize
    with cpu_harness(force=True):
        assert torch.empty(1, device="cuda").device.type == "cpu"
    assert torch.cuda.synchronize is original_synchronize


@pytest.mark.parametrize("before", [None, "8"])
def test_one_cuda_queue_while_active(monkeypatch, before):
    """Megatron's validate_args asks for CUDA_DEVICE_MAX_CONNECTIONS=1 with TP or CP."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    if before is None:
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    else:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", before)
    with cpu_harness():
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == before


def test_tensors_name_their_cuda_type_while_active():
    """Megatron's optimizers accept parameters whose type() is 'torch.cuda.FloatTensor' etc."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with cpu_harness():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        converted = torch.zeros(1).type("torch.cuda.HalfTensor")
        assert converted.dtype == torch.float16 and converted.device.type == "cpu"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    assert torch.zeros(1).type() == "torch.FloatTensor"


@pytest.mark.parametrize("normalization,norm_class", [("LayerNorm", torch.nn.LayerNorm),
                                                       ("RMSNorm", torch.nn.RMSNorm)])
def test_local_spec_norm_takes_sequence_parallelism(cpu_parallel_state, normalization,
                                                    norm_class):
    """Megatron's torch norm refuses sequence parallelism; the harness's normalises each token
    as torch does and marks its parameters for the gradient all-reduce over TP."""
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(normalization=normalization)
    config = moe_config(normalization=normalization)
    config.sequence_parallel = True  # as TP > 1 sets it; this process has TP 1
    norm = build_module(spec.submodules.input_layernorm, config=config, hidden_size=HIDDEN,
                        eps=1e-5)
    assert type(norm) is norm_class
    assert [getattr(p, "sequence_parallel", None) for p in norm.parameters()] == \
        [True] * len(list(norm.parameters()))
    hidden = torch.randn(TOKENS, BATCH, HIDDEN)
    expected = norm_class(HIDDEN, eps=1e-5)
    expected.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(hidden), expected(hidden), rtol=0, atol=0)


def test_init_cpu_parallel_state_needs_the_harness():
    with pytest.raises(RuntimeError, match="inside cpu_harness"):
        init_cpu_parallel_state()


def test_failed_init_leaves_no_process_group():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with cpu_harness():
        with pytest.raises(RuntimeError):
            init_cpu_parallel_state(tensor_model_parallel_size=2)  # world size is 1
        assert not torch.distributed.is_initialized()


def test_rng_tracker_forks_and_resumes_from_its_states(cpu_parallel_state):
    from megatron.core.tensor_parallel import layers, random

    tracker = layers.get_cuda_rng_tracker()  # bound by name in tensor_parallel.layers
    assert tracker is random.get_cuda_rng_tracker()
    saved = {name: state.clone() for name, state in tracker.get_states().items()}
    assert all(state.device.type == "cpu" for state in saved.values())
    default_state = torch.get_rng_state()
    with tracker.fork():
        drawn = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), default_state)
    with tracker.fork(random.get_expert_parallel_rng_tracker_name()):
        expert_drawn = torch.rand(4)
    assert not torch.equal(drawn, expert_drawn)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), drawn)


def test_device_generator_is_apart_from_the_host_generator(cpu_parallel_state):
    """What Megatron's training step draws comes from the CUDA generator's stand-in: draws on
    the host in between (data loaders) do not move it, and its saved state resumes it."""
    from megatron.training import training

    from megatron_null_moe.cpu import device_generator

    assert training.train_step.__wrapped__ is not None  # the step runs inside drawing()
    generator = device_generator()
    torch.cuda.manual_seed(5)
    saved = torch.cuda.get_rng_state()
    drawn = []
    for host_draws in (0, 7):
        torch.cuda.set_rng_state(saved)
        torch.rand(host_draws)
        with generator.drawing():
            drawn.append(torch.rand(3))
            assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    assert torch.equal(drawn[0], drawn[1])
    host = torch.get_rng_state()
    torch.cuda.manual_seed(6)
    assert torch.equal(torch.get_rng_state(), host)
    with generator.drawing():
        assert not torch.equal(torch.rand(3), drawn[0])


def test_split_sizes_come_back_as_numpy(cpu_parallel_state):
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3, 1])
    as_numpy = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.tolist() == [3, 1]
    assert torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(splits))


def test_gradient_clipping_scales_to_max_norm(cpu_parallel_state):
    from megatron.core.optimizer import optimizer
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    parameters[0].grad, parameters[1].grad = torch.full((3,), 2.0), torch.full((4,), -1.0)
    total_norm = get_grad_norm_fp32([p.grad for p in parameters])
    assert total_norm == pytest.approx(4.0)
    optimizer.clip_grad_by_total_norm_fp32(parameters, max_norm=1.0, total_norm=total_norm)
    clipped = torch.cat([p.grad for p in parameters])
    assert clipped.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_moe_layer_forward_backward(cpu_parallel_state):
    layer = build_moe_layer(moe_config())
    hidden_SBH = torch.randn(TOKENS, BATCH, HIDDEN, requires_grad=True)
    output_SBH, bias = layer(hidden_SBH)
    output_SBH.square().sum().backward()
    assert output_SBH.shape == hidden_SBH.shape and bias is None
    assert len(layer.experts.local_experts) == NUM_EXPERTS
    gradients = {name: p.grad for name, p in layer.named_parameters()}
    assert gradients["router.weight"] is not None
    assert all(g is not None and torch.isfinite(g).all() for g in gradients.values())
    assert all(g.abs().sum() > 0 for name, g in gradients.items() if "local_experts" in name)


def test_gpt_model_with_moe_layers_forward_backward(cpu_parallel_state):
    vocab_size, sequence_length = 32, 8
    config = moe_config(num_layers=2, moe_aux_loss_coeff=0.01)
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
        max_sequence_length=sequence_length,
    )
    tokens_BS = torch.randint(0, vocab_size, (BATCH, sequence_length))
    positions_BS = torch.arange(sequence_length).expand(BATCH, -1)
    causal_mask = torch.ones(1, 1, sequence_length, sequence_length).triu(1).bool()
    loss_BS = model(tokens_BS, positions_BS, causal_mask, labels=tokens_BS)
    loss_BS.mean().backward()
    assert loss_BS.shape == (BATCH, sequence_length) and torch.isfinite(loss_BS).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def expert_parallel_moe_layer(rank, world_size):
    """One rank of an EP=2 MoELayer (alltoall): its input, output and weights."""
    init_cpu_parallel_state(expert_model_parallel_size=world_size)
    try:
        layer = build_moe_layer(moe_config())
        inputs = torch.Generator().manual_seed(rank)
        hidden_SBH = torch.randn(TOKENS, BATCH, HIDDEN, generator=inputs)
        output_SBH, _ = layer(hidden_SBH)
        output_SBH.sum().backward()
        return {
            "input": hidden_SBH,
            "output": output_SBH.detach(),
            "router": layer.router.weight.detach(),
            "experts": [expert.state_dict() for expert in layer.experts.local_experts],
            "grads_finite": all(torch.isfinite(p.grad).all() for p in layer.parameters()),
        }
    finally:
        destroy_cpu_parallel_state()


@pytest.mark.world_size(2)
def test_expert_parallel_moe_layer_matches_one_process(cpu_parallel_state):
    ranks = run_on_ranks(expert_parallel_moe_layer, 2)
    assert all(rank["grads_finite"] and len(rank["experts"]) == 2 for rank in ranks)
    assert torch.equal(ranks[0]["router"], ranks[1]["router"])  # replicated, identically seeded
    reference = build_moe_layer(moe_config())
    reference.router.weight.data.copy_(ranks[0]["router"])
    experts = [state for rank in ranks for state in rank["experts"]]  # rank r holds 2r, 2r+1
    for expert, state in zip(reference.experts.local_experts, experts):
        expert.load_state_dict(state)
    for rank in ranks:
        expected_SBH, _ = reference(rank["input"])
        torch.testing.assert_close(rank["output"], expected_SBH.detach())
    assert multiprocessing.active_children() == []


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    time.sleep(600)  # rank 0 would hang: run_on_ranks must terminate it


def sleep_on_every_rank(rank, world_size):
    time.sleep(600)


@pytest.mark.world_size(2)
def test_a_failing_rank_raises_with_its_traceback_and_stops_the_others():
    with pytest.raises(RuntimeError, match="rank 1 of 2") as failure:
        run_on_ranks(fail_on_rank_one, 2, timeout_s=120)
    assert "ValueError: rank one fails on purpose" in str(failure.value)
    assert "fail_on_rank_one" in str(failure.value)
    assert multiprocessing.active_children() == []


@pytest.mark.world_size(2)
def test_ranks_past_the_timeout_are_stopped():
    with pytest.raises(TimeoutError):
        run_on_ranks(sleep_on_every_rank, 2, timeout_s=1)
    assert multiprocessing.active_children() == []
