"""LeanGroupedExperts against Megatron's SequentialMLP: weights, math, FP8 operands, checkpoints;
moe_act recompute against keeping the activation."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import apply_factories
from megatron.core.dist_checkpointing.dict_utils import nested_values

from builders import build_moe_layer, moe_config, named_expert_tensors
from megatron_null_moe.lean import fp8 as lean_fp8
from megatron_null_moe.lean.experts import LeanGroupedExperts
from megatron_null_moe.lean.grouped_gemm import grouped_linear
from megatron_null_moe.lean.support import validate_lean_experts

ACTIVATIONS = {"swiglu": dict(gated_linear_unit=True, activation_func=F.silu),
               "gelu": dict(gated_linear_unit=False, activation_func=F.gelu)}
# Megatron accepts moe_act recompute with grouped-GEMM experts only (moe_grouped_gemm).
MOE_ACT_RECOMPUTE = dict(recompute_granularity="selective", recompute_modules=["moe_act"],
                         moe_grouped_gemm=True)


def _pair(seed=3, **overrides):
    """(Megatron SequentialMLP layer, lean layer), built from the same seed."""
    config = moe_config(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None, **overrides)
    return (build_moe_layer(config, real_fraction=0.5, seed=seed),
            build_moe_layer(config, real_fraction=0.5, seed=seed, expert_path="lean"))


def test_experts_initialised_exactly_like_sequential_mlp(parallel_state):
    megatron, lean = _pair(**ACTIVATIONS["swiglu"])
    assert isinstance(lean.experts, LeanGroupedExperts)
    assert tuple(lean.experts.linear_fc1.weight.shape) == (8, 64, 16)
    ours, theirs = named_expert_tensors(lean), named_expert_tensors(megatron)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    weight = lean.experts.linear_fc1.weight
    assert weight.tensor_model_parallel and weight.partition_dim == 1 and weight.allreduce


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_experts_equal_sequential_mlp_forward_and_backward(parallel_state, activation, dtype,
                                                           tolerance):
    settings = dict(ACTIVATIONS[activation], params_dtype=dtype, bf16=dtype == torch.bfloat16)
    megatron, lean = (layer.experts.to(dtype) for layer in _pair(**settings))
    counts = torch.tensor([3, 0, 5, 1, 0, 4, 2, 1])  # two experts without tokens
    rows, spare = int(counts.sum()), 7
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows + spare, 16, generator=generator).to(dtype)
    hidden[rows:] = float("nan")  # the lean buffer's unused rows may hold anything
    probs = torch.rand(rows + spare, generator=generator)
    target = torch.randn(rows, 16, generator=generator).to(dtype)
    results = []
    for experts, count_rows in ((megatron, rows), (lean, rows + spare)):
        x = hidden[:count_rows].clone().requires_grad_(True)
        p = probs[:count_rows].clone().requires_grad_(True)
        output, bias = experts(x, counts, p)
        assert bias is None
        (output[:rows].float() * target.float()).sum().backward()
        grads = {n: t.float() for n, t in named_expert_tensors(_as_layer(experts), "grads").items()}
        results.append((output[:rows].float(), x.grad[:rows].float(), p.grad[:rows], grads))
    (out_m, dx_m, dp_m, dw_m), (out_l, dx_l, dp_l, dw_l) = results
    scale = out_m.abs().max()
    assert (out_l - out_m).abs().max() <= tolerance * scale
    assert (dx_l - dx_m).abs().max() <= tolerance * dx_m.abs().max()
    assert (dp_l - dp_m).abs().max() <= tolerance * dp_m.abs().max()
    for name, grad in dw_m.items():
        assert (dw_l[name] - grad).abs().max() <= tolerance * grad.abs().max().clamp(min=1), name
    assert torch.all(dw_l["experts.local_experts.1.linear_fc1.weight"] == 0)


def _as_layer(experts):
    """named_expert_tensors wants a layer: a stand-in with the experts under 'experts.'."""
    layer = torch.nn.Module()
    layer.experts = experts
    layer.local_expert_indices = [0]
    layer.num_local_experts = experts.num_local_experts
    return layer


@pytest.mark.parametrize("recompute", [False, True])
def test_no_rows_at_all_still_gives_zero_weight_gradients(parallel_state, recompute):
    experts = _lean_experts(recompute)
    x = torch.zeros(0, 16, requires_grad=True)
    probs = torch.zeros(0, requires_grad=True)
    output, _ = experts(x, torch.zeros(8, dtype=torch.long), probs)
    output.sum().backward()
    assert output.shape == (0, 16) and probs.grad.shape == (0,)
    assert torch.all(experts.linear_fc1.weight.grad == 0)
    assert torch.all(experts.linear_fc2.weight.grad == 0)


def _lean_experts(recompute, seed=3, **overrides):
    """Lean experts from the seed, with or without moe_act recompute (nothing else differs)."""
    settings = dict(moe_grouped_gemm=True, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
                    **overrides)
    settings.update(MOE_ACT_RECOMPUTE if recompute else {})
    layer = build_moe_layer(moe_config(**settings), real_fraction=0.5, seed=seed,
                            expert_path="lean")
    assert layer.experts.activation_recompute == recompute
    return layer.experts


def _expert_inputs(dtype=torch.float32, spare=5):
    """(tokens per expert, hidden, probs, target): two experts without tokens, and ``spare``
    unused rows after the last expert's (the worst-case buffer's), holding NaN."""
    counts = torch.tensor([3, 0, 5, 1, 0, 4, 2, 1])
    rows = int(counts.sum())
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows + spare, 16, generator=generator).to(dtype)
    hidden[rows:] = float("nan")
    probs = torch.rand(rows + spare, generator=generator)
    target = torch.randn(rows, 16, generator=generator)
    return counts, hidden, probs, target


def _forward_backward(experts, counts, hidden, probs, target):
    """[output, input grad, probs grad, fc1 grad, fc2 grad] over the used rows."""
    rows = target.shape[0]
    x, p = hidden.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    output, _ = experts(x, counts, p)
    (output[:rows].float() * target).sum().backward()
    return [output[:rows].detach(), x.grad[:rows], p.grad[:rows],
            experts.linear_fc1.weight.grad, experts.linear_fc2.weight.grad]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_act_recompute_equals_keeping_the_activation(parallel_state, activation, dtype):
    """Recomputation replays the same ops on the same fc1 output: bit-equal output and
    gradients (input, routing weights, both weights)."""
    settings = dict(ACTIVATIONS[activation], params_dtype=dtype, bf16=dtype == torch.bfloat16)
    inputs = _expert_inputs(dtype)
    kept, recomputed = (_forward_backward(_lean_experts(recompute, **settings).to(dtype), *inputs)
                        for recompute in (False, True))
    names = ["output", "input grad", "probs grad", "fc1 grad", "fc2 grad"]
    for name, ours, theirs in zip(names, recomputed, kept):
        assert torch.equal(ours, theirs), name
    assert recomputed[2].abs().sum() > 0 and recomputed[4].abs().sum() > 0


def _storages_saved_for_backward(experts, counts, hidden, probs):
    """(storages autograd still holds after the forward, the storages of the experts' inputs,
    weights, offsets and fc1 output, fc2's input tensor), storages by data pointer."""
    saved, seen = [], {}
    hooks = [experts.linear_fc1.register_forward_hook(
                 lambda module, args, output: seen.update(offsets=args[1], fc1_output=output)),
             experts.linear_fc2.register_forward_pre_hook(
                 lambda module, args: seen.update(fc2_input=args[0]))]
    x, p = hidden.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output, _ = experts(x, counts, p)
    for hook in hooks:
        hook.remove()

    def live(tensors):
        return {t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes()}

    necessary = live([x, p, experts.linear_fc1.weight, experts.linear_fc2.weight,
                      seen["offsets"], seen["fc1_output"]])
    return live(saved), necessary, seen["fc2_input"], output


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_moe_act_recompute_keeps_no_activation_for_backward(parallel_state, activation):
    """After the forward, backward holds only the experts' inputs, weights and fc1's output:
    the weighted activation fc2 saved has released its storage (as Megatron's
    CheckpointWithoutOutput does), and it is refilled for the backward."""
    counts, hidden, probs, target = _expert_inputs()
    held, necessary, fc2_input, _ = _storages_saved_for_backward(
        _lean_experts(False, **ACTIVATIONS[activation]), counts, hidden, probs)
    assert not held <= necessary and fc2_input.untyped_storage().nbytes() > 0
    experts = _lean_experts(True, **ACTIVATIONS[activation])
    held, necessary, fc2_input, output = _storages_saved_for_backward(experts, counts, hidden,
                                                                      probs)
    assert held <= necessary and fc2_input.untyped_storage().nbytes() == 0
    (output[:target.shape[0]] * target).sum().backward()
    assert fc2_input.untyped_storage().nbytes() == fc2_input.numel() * fc2_input.itemsize


def test_options_the_lean_experts_cannot_honour_are_refused():
    for overrides, flag in ((dict(add_bias_linear=True), "--disable-bias-linear"),
                            (dict(moe_apply_probs_on_input=True, moe_router_topk=1,
                                  moe_router_pre_softmax=True),
                             "--moe-apply-probs-on-input")):
        with pytest.raises(ValueError, match=f"lean.*{flag}.*allowed"):
            validate_lean_experts(moe_config(**overrides))
    config = moe_config(**MOE_ACT_RECOMPUTE)
    validate_lean_experts(config)  # the activation is recomputed, ...
    config.fine_grained_activation_offloading, config.offload_modules = True, ["moe_act"]
    with pytest.raises(ValueError, match=r"offload_modules=\['moe_act'\] \(--offload-modules\); "
                                         "allowed: none of 'expert_fc1', 'moe_act'"):
        validate_lean_experts(config)  # ... never offloaded
    config = moe_config()
    config.fp8, config.fp8_recipe = "hybrid", "delayed"  # FP8 configs need TE to be built
    with pytest.raises(ValueError, match="--fp8-recipe.*allowed: 'tensorwise'"):
        validate_lean_experts(config)
    config.fp8_recipe, config.moe_ffn_hidden_size = "tensorwise", 24
    with pytest.raises(ValueError, match="--moe-ffn-hidden-size.*multiple of 16"):
        validate_lean_experts(config)


def test_cuda_needs_bf16_and_16_byte_aligned_sizes():
    """CUDA's grouped GEMM syncs on the host for FP16/FP32 (its per-expert fallback): refused
    there, naming --bf16; the CPU keeps FP32 and BF16."""
    config = moe_config()
    validate_lean_experts(config, on_cuda=False)
    with pytest.raises(ValueError, match=r"params_dtype=torch.float32 \(--bf16\); allowed: "
                                         r"torch.bfloat16 on CUDA"):
        validate_lean_experts(config, on_cuda=True)
    config.fp16, config.params_dtype = True, torch.float16
    for on_cuda in (True, False):
        with pytest.raises(ValueError, match=r"\(--bf16\); allowed"):
            validate_lean_experts(config, on_cuda=on_cuda)
    config.fp16, config.bf16, config.params_dtype = False, True, torch.bfloat16
    validate_lean_experts(config, on_cuda=True)
    config.hidden_size = 20
    with pytest.raises(ValueError, match="--hidden-size.*allowed: a multiple of 8"):
        validate_lean_experts(config, on_cuda=True)


def test_fp8_grouped_linear_refuses_the_cpu_clearly():
    x, weight = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(2, 16, 16).bfloat16()
    with pytest.raises(RuntimeError, match="FP8 lean experts need CUDA"):
        lean_fp8.Fp8GroupedLinear.apply(x, weight, torch.tensor([1, 4], dtype=torch.int32))


def _emulated_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, out_dtype=None,
                                use_fast_accum=False):
    """torch._scaled_grouped_mm's contract on the CPU: E4M3 row-major a [M, K], column-major
    b [G, K, N], scales [M] and [G, N]; dequantise and multiply in fp32."""
    assert mat_a.dtype == mat_b.dtype == torch.float8_e4m3fn
    assert mat_a.stride(-1) == 1 and mat_b.stride(-2) == 1  # row-major a, column-major b
    assert scale_a.shape == mat_a.shape[:1] and scale_b.shape == (mat_b.shape[0], mat_b.shape[2])
    a = mat_a.float() * scale_a.unsqueeze(-1)
    b = mat_b.float() * scale_b.unsqueeze(1)
    return F.grouped_mm(a, b, offs=offs).to(out_dtype)


def test_fp8_operands_scales_and_gradients_on_an_emulated_kernel(monkeypatch):
    """The E4M3 quantisation, operand layouts and backward of Fp8GroupedLinear, with the
    scaled grouped GEMM emulated on the CPU (the GPU test runs the real kernel)."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _emulated_scaled_grouped_mm)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, generator=generator).bfloat16()
    x[9:] = 0  # unused rows read zeros: their scales must stay finite
    weight = (torch.randn(3, 16, 32, generator=generator) * 0.1).bfloat16()
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)
    results = []
    for function in (lean_fp8.Fp8GroupedLinear.apply, grouped_linear):
        xi, wi = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = function(xi, wi, offsets)
        out[:9].float().pow(2).sum().backward()
        results.append((out[:9].float(), xi.grad[:9].float(), wi.grad.float()))
    for fp8, exact in zip(*results):
        assert torch.isfinite(fp8).all()
        assert (fp8 - exact).norm() <= 0.08 * exact.norm()
    data, scale = lean_fp8.quantize_e4m3(x.float(), dim=-1)
    assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))  # powers of two
    assert torch.all(data[9:].float() == 0) and torch.isfinite(scale).all()


def _sharded_metadata(layer, prefix="mlp."):
    """(key, global shape, global offset, fragmentation, replica id) of every expert shard."""
    sharded = layer.sharded_state_dict(prefix=prefix)
    apply_factories(sharded)
    rows = []
    for shard in nested_values(sharded):
        if ".experts." in shard.key:
            fragments = getattr(shard, "axis_fragmentations", None)
            rows.append((shard.key, shard.global_shape, shard.global_offset, fragments,
                         shard.replica_id))
    return sorted(rows, key=repr)


@pytest.mark.parametrize("glu", [True, False])
def test_checkpoint_layout_is_sequential_mlps(parallel_state, glu):
    megatron, lean = _pair(gated_linear_unit=glu)
    assert _sharded_metadata(lean) == _sharded_metadata(megatron)


def _save(layer, directory):
    directory.mkdir()
    dist_checkpointing.save(layer.sharded_state_dict(prefix="mlp."), str(directory))


def _load(layer, directory):
    state = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."), str(directory))
    layer.load_state_dict({key[len("mlp."):]: value for key, value in state.items()})


def test_torch_dist_checkpoints_load_both_ways(parallel_state, tmp_path):
    source_megatron, source_lean = _pair(seed=1, gated_linear_unit=True)
    target_megatron, target_lean = _pair(seed=2, gated_linear_unit=True)
    expert = "experts.local_experts.5.linear_fc1.weight"
    assert not torch.equal(named_expert_tensors(target_lean)[expert],
                           named_expert_tensors(source_megatron)[expert])
    _save(source_megatron, tmp_path / "megatron")
    _save(source_lean, tmp_path / "lean")
    _load(target_lean, tmp_path / "megatron")
    _load(target_megatron, tmp_path / "lean")
    for source, target in ((source_megatron, target_lean), (source_lean, target_megatron)):
        saved, loaded = named_expert_tensors(source), named_expert_tensors(target)
        for name, tensor in saved.items():
            assert torch.equal(loaded[name], tensor), name


def test_moe_act_recompute_releases_the_fp8_fc2_input_on_an_emulated_kernel(parallel_state,
                                                                           monkeypatch):
    """FP8's fc2 saves its BF16 input (for the BF16 weight gradient), not the E4M3 copy: that
    input is released too, and recomputation gives the same output and gradients."""
    kernel_calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm",
                        lambda *args, **kwargs: kernel_calls.append(1)
                        or _emulated_scaled_grouped_mm(*args, **kwargs))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    counts, hidden, probs, target = _expert_inputs(torch.bfloat16)
    results = []
    for recompute in (False, True):
        experts = _lean_experts(recompute, params_dtype=torch.bfloat16, bf16=True,
                                **ACTIVATIONS["swiglu"])
        experts.config.fp8 = "e4m3"  # set after the build: FP8 configs need TE to be built
        held, necessary, fc2_input, _ = _storages_saved_for_backward(experts, counts, hidden,
                                                                     probs)
        assert (held <= necessary) == recompute
        assert (fc2_input.untyped_storage().nbytes() == 0) == recompute
        results.append(_forward_backward(experts, counts, hidden, probs, target))
    for kept, recomputed in zip(*results):
        assert torch.equal(recomputed, kept)
    # Per setting: fc1 and fc2 in two forwards and one backward (input gradients).
    assert len(kernel_calls) == 2 * 2 * 3
