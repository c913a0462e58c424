"""Grouped-GEMM experts under null routing on a GPU (CUDA + Transformer Engine).

Forward and backward of the null-expert layer, against the same experts applied one by one
in fp32: TEGroupedMLP experts in BF16 and FP8 (with the router padding for quantization),
and the lean path (torch grouped GEMMs) in BF16 and FP8. The lean path also: never
synchronises with EP=1 (CUDA's sync debug mode), replays as a CUDA graph, and exchanges
torch_dist checkpoints with TEGroupedMLP. With 2 GPUs: context parallelism (CP2 x EP2) through
the entry point trains what one GPU trains (the CPU harness cannot run it).
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

te = pytest.importorskip("transformer_engine.pytorch") if torch.cuda.is_available() else None

HIDDEN, FFN, EXPERTS, TOPK = 256, 512, 8, 4


@pytest.fixture(scope="module")
def cuda_parallel_state():
    from megatron_null_moe.process_groups import single_process_parallel_state

    with single_process_parallel_state("cuda", seed=123):
        yield


def _grouped_layer(expert_path="megatron", **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_null_moe import NullExpertConfig, with_null_experts

    settings = dict(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_attention_heads=4, num_moe_experts=EXPERTS, moe_router_topk=TOPK,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True, add_bias_linear=False,
        bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32",
        moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss",
    )
    settings.update(overrides)
    config = TransformerConfig(**settings)
    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=EXPERTS, moe_grouped_gemm=True)
    torch.manual_seed(0)
    layer = with_null_experts(spec, NullExpertConfig(real_fraction=0.5),
                              expert_path=expert_path).submodules.mlp(config=config)
    layer.set_layer_number(1)
    return layer.cuda(), config


def _expert_weights(layer, name):
    """Each expert's weight of linear ``name`` (TEGroupedMLP's weight{e} or the lean stack)."""
    linear = getattr(layer.experts, name)
    if hasattr(linear, "weight") and linear.weight.dim() == 3:
        return list(linear.weight.unbind(0)), lambda e: linear.weight.grad[e]
    params = dict(layer.experts.named_parameters())
    return ([params[f"{name}.weight{e}"] for e in range(EXPERTS)],
            lambda e: params[f"{name}.weight{e}"].grad)


def _reference(layer, hidden_TH, probs_TN):
    """sum_i w_i fc2_i(act(fc1_i(x))) in fp32, expert by expert, on fp32 leaf copies of the
    expert weights (returned, for their gradients)."""
    fc1_weights = [w.detach().float().requires_grad_(True)
                   for w in _expert_weights(layer, "linear_fc1")[0]]
    fc2_weights = _expert_weights(layer, "linear_fc2")[0]
    output = torch.zeros_like(hidden_TH, dtype=torch.float32)
    for expert, fc1 in enumerate(fc1_weights):
        fc2 = fc2_weights[expert].detach().float()
        expert_out = F.gelu(hidden_TH @ fc1.t()) @ fc2.t()
        output = output + probs_TN[:, expert : expert + 1].float() * expert_out
    return output, fc1_weights


def _relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _check(layer, fp8_context, tolerance):
    hidden = torch.randn(64, 2, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.5
    hidden_ref = hidden.detach().float().reshape(-1, HIDDEN)
    hidden = hidden.requires_grad_(True)
    layer.train()
    with fp8_context:
        output, _ = layer(hidden)
    probs, routing_map = layer.router(hidden.detach())
    assert (routing_map.sum(-1) < TOPK).any(), "no token dropped a slot to a null"
    expected, reference_fc1 = _reference(layer, hidden_ref, probs.detach())
    assert _relative_error(output.reshape(-1, HIDDEN), expected) < tolerance
    target = torch.randn_like(expected)
    (output.reshape(-1, HIDDEN).float() * target).sum().backward()
    (expected * target).sum().backward()
    fc1_grad = _expert_weights(layer, "linear_fc1")[1]
    for expert, reference in enumerate(reference_fc1):
        grad = fc1_grad(expert)
        if reference.grad.abs().sum() == 0:  # an expert no token chose
            assert grad is None or grad.abs().sum() == 0
        else:
            assert _relative_error(grad, reference.grad) < tolerance, expert
    assert torch.isfinite(hidden.grad.float()).all()
    assert layer.router.null_weight.grad is not None


@pytest.mark.parametrize("permute_fusion", [False, True])
def test_te_grouped_gemm_bf16_matches_experts_one_by_one(cuda_parallel_state, permute_fusion):
    import contextlib

    layer, _ = _grouped_layer(moe_permute_fusion=permute_fusion)
    _check(layer, contextlib.nullcontext(), tolerance=2e-2)


def test_te_grouped_gemm_fp8_with_padding_matches(cuda_parallel_state):
    from megatron.core.fp8_utils import get_fp8_context

    layer, config = _grouped_layer(fp8="hybrid", fp8_recipe="tensorwise",
                                   moe_router_padding_for_quantization=True)
    _check(layer, get_fp8_context(config), tolerance=1e-1)


def test_lean_bf16_matches_experts_one_by_one(cuda_parallel_state):
    import contextlib

    layer, _ = _grouped_layer(expert_path="lean")
    _check(layer, contextlib.nullcontext(), tolerance=2e-2)


def test_lean_fp8_matches(cuda_parallel_state, monkeypatch):
    """The FP8 grouped linear must have run (fc1 and fc2): BF16 would pass the tolerance."""
    from megatron.core.fp8_utils import get_fp8_context

    from megatron_null_moe.lean import grouped_gemm

    calls, original = [], grouped_gemm.fp8_grouped_linear
    monkeypatch.setattr(grouped_gemm, "fp8_grouped_linear",
                        lambda *args: calls.append(1) or original(*args))
    layer, config = _grouped_layer(expert_path="lean", fp8="hybrid", fp8_recipe="tensorwise")
    _check(layer, get_fp8_context(config), tolerance=1e-1)
    assert len(calls) == 2


def test_lean_all_null_micro_batch_and_experts_without_tokens(cuda_parallel_state):
    """Real CUDA kernels on zero-size groups (pytorch#172439: wrong results for them on
    Blackwell): experts without tokens get exactly zero weight gradients, an all-null
    micro-batch gives a zero output and zero gradients."""
    layer, hidden, probs, routing_map, grad = _lean_inputs()
    few = torch.zeros_like(routing_map)
    few[:, 0] = True  # every token to expert 0: experts 1.. get no rows
    few[::2, 0] = False  # and half the tokens are all-null
    for routing in (few, torch.zeros_like(routing_map)):
        layer.zero_grad(set_to_none=True)
        hidden.grad = None
        output = _after_router(layer, hidden, probs * routing, routing, grad)
        torch.cuda.synchronize()
        weight_grads = [layer.experts.linear_fc1.weight.grad,
                        layer.experts.linear_fc2.weight.grad]
        for weight_grad in weight_grads:
            assert weight_grad is not None and torch.isfinite(weight_grad).all()
            assert torch.all(weight_grad[1:] == 0)
        null_tokens = ~routing.reshape(-1, EXPERTS).any(-1)
        assert torch.all(output.reshape(-1, HIDDEN)[null_tokens] == 0)
        assert torch.isfinite(hidden.grad).all()
        if not routing.any():
            assert all(torch.all(weight_grad == 0) for weight_grad in weight_grads)
        else:
            assert weight_grads[0][0].abs().sum() > 0


def _lean_inputs(seed=0):
    """A lean BF16 layer, tokens [S, B, H] (leaf), the router's output for them (detached),
    and an output gradient."""
    layer, _ = _grouped_layer(expert_path="lean")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(64, 2, HIDDEN, device="cuda", dtype=torch.bfloat16,
                         generator=generator).requires_grad_(True)
    with torch.no_grad():
        probs, routing_map = layer.router(hidden)
    return layer, hidden, probs, routing_map, torch.randn_like(hidden)


def _after_router(layer, hidden, probs, routing_map, grad):
    """Dispatch, experts and combine, forward and backward; returns the output."""
    tokens, weights = layer.preprocess(hidden, probs, routing_map)
    tokens, weights = layer.dispatch(tokens, weights)
    output, _ = layer.routed_experts_compute(tokens, weights)
    output = layer.postprocess(layer.combine(output), None)
    output.backward(grad)
    return output


def test_lean_path_never_synchronises_with_one_expert_rank(cuda_parallel_state):
    layer, hidden, probs, routing_map, grad = _lean_inputs()
    _after_router(layer, hidden, probs, routing_map, grad)  # warm-up: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _after_router(layer, hidden, probs, routing_map, grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_whole_lean_layer_never_synchronises_with_one_expert_rank(cuda_parallel_state):
    """Router included (training: losses and statistics), forward and backward."""
    layer, hidden, _, _, grad = _lean_inputs()
    layer.train()
    layer(hidden)[0].backward(grad)  # warm-up: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(hidden)[0].backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_lean_path_replays_as_a_cuda_graph(cuda_parallel_state):
    """Fixed shapes (the worst-case buffer) and no host reads: forward and backward after the
    router capture into one CUDA graph and replay with new tokens."""
    layer, hidden, probs, routing_map, grad = _lean_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _after_router(layer, hidden, probs, routing_map, grad)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    hidden.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = _after_router(layer, hidden, probs, routing_map, grad)
    new_tokens = torch.randn_like(hidden)
    with torch.no_grad():
        hidden.copy_(new_tokens)
    graph.replay()
    replayed = (output.detach().clone(), hidden.grad.detach().clone(),
                layer.experts.linear_fc1.weight.grad.detach().clone())
    eager_input = new_tokens.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    eager = _after_router(layer, eager_input, probs, routing_map, grad)
    # Combine and its backward add each token's K rows with atomic index_add_ in BF16, in an
    # order that varies between runs: each add rounds to 8 bits (2^-8 relative), so results
    # differ by a few BF16 ulps, far below 1e-2 in norm; a wrong replay differs by O(1).
    for actual, expected in ((replayed[0], eager.detach()), (replayed[1], eager_input.grad),
                             (replayed[2], layer.experts.linear_fc1.weight.grad)):
        assert _relative_error(actual, expected) < 1e-2


def test_lean_and_te_grouped_checkpoints_interchange(cuda_parallel_state, tmp_path):
    from megatron.core import dist_checkpointing

    def save(layer, name):
        (tmp_path / name).mkdir()
        dist_checkpointing.save(layer.sharded_state_dict(prefix="mlp."), str(tmp_path / name))

    def load(layer, name):
        state = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."),
                                        str(tmp_path / name))
        layer.load_state_dict({k[len("mlp."):]: v for k, v in state.items()}, strict=False)

    te_source, lean_source = _grouped_layer()[0], _grouped_layer(expert_path="lean")[0]
    with torch.no_grad():
        for param in lean_source.experts.parameters():
            param.normal_()
    save(te_source, "te")
    save(lean_source, "lean")
    lean_target, te_target = _grouped_layer(expert_path="lean")[0], _grouped_layer()[0]
    load(lean_target, "te")
    load(te_target, "lean")
    for name in ("linear_fc1", "linear_fc2"):
        for source, target in ((te_source, lean_target), (lean_source, te_target)):
            for saved, loaded in zip(_expert_weights(source, name)[0],
                                     _expert_weights(target, name)[0]):
                assert torch.equal(saved, loaded), name


def _pretrain_on_gpus(nproc: int, *arguments: str) -> None:
    import os
    import subprocess
    import sys

    from megatron_null_moe.process_groups import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "megatron_null_moe.pretrain_gpt",
               *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHONWARNINGS="ignore",
                                     CUDA_DEVICE_MAX_CONNECTIONS="1"))  # for CP before sm100
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism needs 2 GPUs")
@pytest.mark.parametrize("expert_path", ["megatron", "lean"])
def test_context_parallel_with_expert_parallel_trains_what_one_gpu_trains(tmp_path,
                                                                          expert_path):
    """CP2 x EP2 on 2 GPUs from one GPU's checkpoint (weights and controller state) trains
    iterations 2-5 as one GPU does. Megatron's local attention refuses context parallelism
    (DotProductAttention), so this runs Transformer Engine's, in BF16: the tolerances allow
    BF16 rounding (2^-8 relative per operation) and the few routing choices it flips; they
    are not yet calibrated on a GPU. The model and runs are tests/test_layouts.py's."""
    from test_layouts import LAYERS, MODEL, _with_flags
    from test_pretrain import scalars

    model = [flag for flag in _with_flags(MODEL, {
        "--transformer-impl": "transformer_engine", "--distributed-backend": "nccl"})
        if flag != "--no-persist-layer-norm"] + ["--bf16", "--moe-router-dtype", "fp32",
                                                  "--moe-null-expert-path", expert_path]
    initial = str(tmp_path / "initial")
    _pretrain_on_gpus(1, *model, "--train-iters", "1", "--save", initial, "--save-interval", "1",
                      "--no-save-optim")
    for name, nproc, layout in (("one_gpu", 1, []), ("cp2_ep2", 2, [
            "--context-parallel-size", "2", "--expert-model-parallel-size", "2"])):
        _pretrain_on_gpus(nproc, *model, *layout, "--load", initial, "--no-load-optim",
                          "--tensorboard-dir", str(tmp_path / name / "tb"))
    expected, trained = scalars(tmp_path / "one_gpu"), scalars(tmp_path / "cp2_ep2")
    assert sorted(trained["lm loss"]) == [2, 3, 4, 5]
    for step in range(2, 6):
        assert trained["lm loss"][step] == pytest.approx(expected["lm loss"][step], rel=1e-2)
        for layer in LAYERS:
            for name in ("real_fraction", "budget_bias"):
                tag = f"null_moe/{name}_layer_{layer}"
                assert trained[tag][step] == pytest.approx(expected[tag][step], abs=0.02), tag
