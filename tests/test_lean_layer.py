"""The lean null-expert layer equals the Megatron path (null-aware alltoall + SequentialMLP)."""

import pytest
import torch
import torch.nn.functional as F

from builders import build_moe_layer, moe_config, named_expert_tensors
from megatron_null_moe import NullExpertConfig, with_null_experts
from megatron_null_moe.expert_bias import update_expert_biases
from megatron_null_moe.host_syncs import count_sync_ops
from megatron_null_moe.lean import grouped_gemm
from megatron_null_moe.lean.support import validate_lean_layer


def _run(layer, hidden, target):
    """Forward + backward; (output, input grad, grads by global name)."""
    layer.train()
    x = hidden.clone().requires_grad_(True)
    output, _ = layer(x)
    (output.float() * target).sum().backward()
    return output.detach().float(), x.grad.float(), {
        name: grad.float() for name, grad in named_expert_tensors(layer, "grads").items()
        if grad is not None}


BUFFERS = ["real-rows", "worst-case"]  # "auto" is real-rows on the CPU


def _compare(overrides=(), dtype=torch.float32, tolerance=1e-5, hidden=None, seed=4,
             lean_buffer="auto"):
    """Both paths from one seed on the same tokens; asserts equality, returns the results.

    Equal within ``tolerance`` of each tensor's largest value, not bit-equal: the paths run
    GEMMs of other shapes (one grouped GEMM vs one per expert), which round differently."""
    settings = dict(overrides)
    if dtype == torch.bfloat16:
        settings.update(params_dtype=torch.bfloat16, bf16=True, moe_router_dtype="fp32")
    config = moe_config(**settings)
    if hidden is None:
        hidden = torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(seed))
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for path, buffer in (("megatron", "auto"), ("lean", lean_buffer)):
        layer = build_moe_layer(config, real_fraction=0.5, seed=seed, expert_path=path,
                                lean_buffer=buffer)
        results.append(_run(layer.to(dtype), hidden.to(dtype), target))
    (out_m, dx_m, grads_m), (out_l, dx_l, grads_l) = results
    for name, (ours, theirs) in {"output": (out_l, out_m), "input grad": (dx_l, dx_m)}.items():
        assert (ours - theirs).abs().max() <= tolerance * theirs.abs().max().clamp(min=1e-3), name
    assert set(grads_l) == set(grads_m)
    for name, grad in grads_m.items():
        limit = tolerance * grad.abs().max().clamp(min=1e-3)
        assert (grads_l[name] - grad).abs().max() <= limit, name
    return results


@pytest.mark.parametrize("lean_buffer", BUFFERS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_forward_and_backward_equal_the_megatron_path(parallel_state, dtype, tolerance,
                                                      lean_buffer):
    (out, _, grads), _ = _compare(dtype=dtype, tolerance=tolerance, lean_buffer=lean_buffer)
    assert grads["router.null_weight"].abs().sum() > 0 and out.abs().sum() > 0


def test_token_dropping_and_swiglu(parallel_state):
    _compare(dict(moe_expert_capacity_factor=1.0, gated_linear_unit=True,
                  activation_func=torch.nn.functional.silu))


def test_moe_layer_recompute(parallel_state):
    _compare(dict(recompute_granularity="selective", recompute_modules=["moe"]))


# Megatron accepts moe_act recompute with grouped-GEMM experts only (moe_grouped_gemm).
MOE_ACT_RECOMPUTE = dict(recompute_granularity="selective", recompute_modules=["moe_act"],
                         moe_grouped_gemm=True)
SWIGLU = dict(gated_linear_unit=True, activation_func=F.silu)


def test_moe_act_recompute_equals_the_megatron_path(parallel_state):
    _compare(dict(MOE_ACT_RECOMPUTE, **SWIGLU))


@pytest.mark.parametrize("lean_buffer", BUFFERS)
@pytest.mark.parametrize("activation", [SWIGLU, dict(gated_linear_unit=False,
                                                      activation_func=F.gelu)],
                         ids=["swiglu", "gelu"])
def test_moe_act_recompute_equals_keeping_the_activation(parallel_state, lean_buffer,
                                                         activation):
    """The lean layer recomputing its expert activation in backward gives bit-equal outputs
    and gradients (router included) to the one keeping it, on either buffer."""
    hidden = torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(4))
    target = torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(5))
    results = []
    for recompute in (False, True):
        settings = dict(activation, moe_grouped_gemm=True)
        settings.update(MOE_ACT_RECOMPUTE if recompute else {})
        layer = build_moe_layer(moe_config(**settings), real_fraction=0.5, seed=4,
                                expert_path="lean", lean_buffer=lean_buffer)
        assert layer.experts.activation_recompute == recompute
        results.append(_run(layer, hidden, target))
    (out_kept, dx_kept, grads_kept), (out, dx, grads) = results
    assert torch.equal(out, out_kept) and torch.equal(dx, dx_kept)
    assert grads.keys() == grads_kept.keys() and "router.weight" in grads
    for name, grad in grads_kept.items():
        assert torch.equal(grads[name], grad), name


def test_shared_experts(parallel_state):
    (out, _, grads), _ = _compare(dict(moe_shared_expert_intermediate_size=32))
    assert grads["shared_experts.linear_fc1.weight"].abs().sum() > 0


def _poisoned_grouped_linear(input_MK, weight_GNK, offsets_G):
    """The real grouped GEMM, but rows past the last offset come out NaN, forward and
    backward: on a GPU they are uninitialised memory."""
    return _Poisoned.apply(input_MK, weight_GNK, offsets_G)


class _Poisoned(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_MK, weight_GNK, offsets_G):
        ctx.save_for_backward(input_MK, weight_GNK, offsets_G)
        with torch.enable_grad():
            output = torch.nn.functional.grouped_mm(
                input_MK.detach(), weight_GNK.detach().transpose(-2, -1), offs=offsets_G)
        return output.index_fill(0, _past_end(input_MK, offsets_G), float("nan"))

    @staticmethod
    def backward(ctx, grad):
        input_MK, weight_GNK, offsets_G = ctx.saved_tensors
        with torch.enable_grad():
            x = input_MK.detach().requires_grad_(True)
            w = weight_GNK.detach().requires_grad_(True)
            out = torch.nn.functional.grouped_mm(x, w.transpose(-2, -1), offs=offsets_G)
            grad_x, grad_w = torch.autograd.grad(out, (x, w), grad.nan_to_num(0.0))
        return grad_x.index_fill(0, _past_end(input_MK, offsets_G), float("nan")), grad_w, None


def _past_end(input_MK, offsets_G):
    rows = torch.arange(input_MK.shape[0])
    return rows[rows >= offsets_G[-1]]


def test_undefined_rows_never_reach_outputs_or_gradients(parallel_state, monkeypatch):
    """Garbage (here NaN) in the rows a grouped GEMM leaves unwritten changes nothing."""
    monkeypatch.setattr(grouped_gemm, "grouped_linear", _poisoned_grouped_linear)
    (out, dx, grads), _ = _compare(lean_buffer="worst-case")  # the buffer with such rows
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert all(torch.isfinite(grad).all() for grad in grads.values())


@pytest.mark.parametrize("lean_buffer", BUFFERS)
def test_all_null_micro_batch(parallel_state, monkeypatch, lean_buffer):
    monkeypatch.setattr(grouped_gemm, "grouped_linear", _poisoned_grouped_linear)
    layer = build_moe_layer(moe_config(), real_fraction=0.5, expert_path="lean",
                            lean_buffer=lean_buffer)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.null_weight.fill_(1.0)
    output, dx, grads = _run(layer, torch.rand(6, 2, 16) + 0.1, torch.randn(6, 2, 16))
    assert torch.all(output == 0) and torch.isfinite(dx).all()
    assert torch.all(grads["experts.local_experts.0.linear_fc1.weight"] == 0)
    assert torch.isfinite(grads["router.null_weight"]).all()


def _dispatch_and_experts(layer, hidden, probs, routing_map):
    """Everything after the router, forward and backward."""
    tokens, weights = layer.preprocess(hidden, probs, routing_map)
    tokens, weights = layer.dispatch(tokens, weights)
    output, _ = layer.routed_experts_compute(tokens, weights)
    output = layer.postprocess(layer.combine(output), None)
    output.sum().backward()


def test_worst_case_buffer_never_reads_back_to_the_host_real_rows_once(parallel_state):
    hidden = torch.randn(10, 2, 16, requires_grad=True)
    calls = {}
    for path, buffer in (("megatron", "auto"), ("lean", "worst-case"), ("lean", "real-rows")):
        layer = build_moe_layer(moe_config(), real_fraction=0.5, expert_path=path,
                                lean_buffer=buffer)
        probs, routing_map = layer.router(hidden)
        calls[buffer] = count_sync_ops(
            lambda: _dispatch_and_experts(layer, hidden, probs, routing_map))
    assert calls["worst-case"] == []
    assert calls["real-rows"] == ["TensorBase.__int__"]  # the real count, once
    assert "TensorBase.tolist" in calls["auto"]  # the counter does see Megatron's reads


@pytest.mark.parametrize("routing", [{}, dict(
    moe_router_score_function="sigmoid", moe_router_num_groups=4, moe_router_group_topk=2)],
    ids=["softmax", "sigmoid-bias-groups"])
def test_whole_lean_layer_never_reads_back_to_the_host(parallel_state, routing):
    """Worst-case buffer, router included (training mode: losses and statistics), forward
    and backward; with sigmoid scores, the per-expert bias and groups too, and the bias's
    update from the step's host counts."""
    layer = build_moe_layer(moe_config(**routing), real_fraction=0.5, expert_path="lean",
                            lean_buffer="worst-case",
                            expert_bias_rate=1e-2 if routing else None)
    layer.train()
    hidden = torch.randn(10, 2, 16, requires_grad=True)
    assert count_sync_ops(lambda: layer(hidden)[0].sum().backward()) == []
    if routing:
        counts = {1: torch.arange(8, dtype=torch.float64)}  # host counts, as the monitor has
        assert count_sync_ops(lambda: update_expert_biases([layer.router], counts)) == []
        assert layer.router.expert_bias.any()


def test_buffer_rows_real_on_the_cpu_and_worst_case_on_a_gpu_by_default(parallel_state):
    """auto: real rows where reading the count costs nothing, the worst case (no host sync,
    CUDA-graph capturable) on a GPU; the explicit settings hold on every device."""
    chosen = {}
    for buffer in ("auto", "real-rows", "worst-case"):
        dispatcher = build_moe_layer(moe_config(), real_fraction=0.5, expert_path="lean",
                                     lean_buffer=buffer).token_dispatcher
        chosen[buffer] = [dispatcher.holds_real_rows_only(torch.device(device))
                          for device in ("cpu", "cuda")]
    assert chosen == {"auto": [True, False], "real-rows": [True, True],
                      "worst-case": [False, False]}
    layer = build_moe_layer(moe_config(), real_fraction=0.5, expert_path="lean")
    rows = {}
    for buffer in ("real-rows", "worst-case"):
        layer.token_dispatcher.lean_buffer = buffer
        probs, routing_map = layer.router(torch.randn(10, 2, 16))
        tokens, _ = layer.token_dispatcher.dispatch_preprocess(torch.randn(10, 2, 16),
                                                               routing_map, probs)
        rows[buffer] = (tokens.shape[0], int(routing_map.sum()))
    assert rows["real-rows"][0] == rows["real-rows"][1] < rows["worst-case"][0] == 20 * 4


@pytest.mark.parametrize("overrides,flag", [
    (dict(moe_token_dispatcher_type="allgather"), "--moe-token-dispatcher-type"),
    (dict(moe_router_padding_for_quantization=True), "--moe-router-padding-for-quantization"),
    (dict(moe_shared_expert_intermediate_size=32, moe_shared_expert_overlap=True),
     "--moe-shared-expert-overlap"),
    (dict(expert_tensor_parallel_size=2), "--expert-tensor-parallel-size"),
])
def test_refused_with_the_flag_named(overrides, flag):
    config = moe_config()
    for name, value in overrides.items():  # set afterwards: some need FP8 (TE) to be built
        setattr(config, name, value)
    with pytest.raises(ValueError, match=f"--moe-null-expert-path lean.*{flag}.*allowed"):
        validate_lean_layer(config)


def test_unknown_expert_path_refused():
    with pytest.raises(ValueError, match="--moe-null-expert-path.*'fast'; allowed: megatron, lean"):
        with_null_experts(None, NullExpertConfig(0.5), expert_path="fast")


def test_bad_lean_buffer_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--moe-null-lean-buffer.*auto, real-rows, worst-case; "
                                         "got 'tight'"):
        NullExpertConfig(0.5, lean_buffer="tight")
    with pytest.raises(ValueError, match="--moe-null-lean-buffer.*'real-rows' applies to "
                                         "expert_path 'lean' only; allowed with 'megatron'"):
        with_null_experts(None, NullExpertConfig(0.5, lean_buffer="real-rows"))


def test_sync_counter_sees_blocking_copies_comparisons_and_value_sized_one_hot():
    tokens = torch.arange(4)
    would_sync = [lambda: tokens.to("cpu"), lambda: tokens.to(device="cpu"),
                  lambda: torch.equal(tokens, tokens), lambda: tokens.allclose(tokens),
                  lambda: F.one_hot(tokens)]
    free = [lambda: tokens.to("cpu", non_blocking=True), lambda: tokens.to(torch.float32),
            lambda: tokens.to(tokens.device), lambda: F.one_hot(tokens, 4)]
    assert [len(count_sync_ops(step)) for step in would_sync] == [1] * len(would_sync)
    assert [len(count_sync_ops(step)) for step in free] == [0] * len(free)
