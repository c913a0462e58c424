"""What the lean expert path can do, checked once at build time.

Every refusal is a ValueError naming the setting, its launch flag, the value and what is
allowed, so a launch with ``--moe-null-expert-path lean`` fails at start-up, not mid-step.
"""

from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

LEAN_FLAG = "--moe-null-expert-path lean"


def _refuse(setting: str, flag: str, value, allowed: str, why: str) -> None:
    raise ValueError(
        f"{LEAN_FLAG} does not support {setting}={value!r} ({flag}); allowed: {allowed}. {why}")


def validate_lean_experts(config: TransformerConfig, on_cuda: Optional[bool] = None) -> None:
    """Refuse what LeanGroupedExperts does not implement.

    on_cuda: whether the experts will run on CUDA; default ``torch.cuda.is_available()``
    (Megatron trains on CUDA wherever it exists; the CPU harness runs only without it).
    """
    _validate_dtype_and_sizes(config, torch.cuda.is_available() if on_cuda is None else on_cuda)
    if config.add_bias_linear:
        _refuse("add_bias_linear", "--disable-bias-linear", True, "False",
                "Lean experts have no biases.")
    if config.moe_apply_probs_on_input:
        _refuse("moe_apply_probs_on_input", "--moe-apply-probs-on-input", True, "False",
                "Routing weights are applied to the activation before fc2.")
    if config.moe_latent_size is not None:
        _refuse("moe_latent_size", "--moe-latent-size", config.moe_latent_size, "None", "")
    if config.gated_linear_unit and config.moe_mlp_glu_interleave_size is not None:
        _refuse("moe_mlp_glu_interleave_size", "--moe-mlp-glu-interleave-size",
                config.moe_mlp_glu_interleave_size, "None",
                "fc1 keeps Megatron's [gate; linear] layout.")
    if (config.expert_tensor_parallel_size or 1) > 1:
        _refuse("expert_tensor_parallel_size", "--expert-tensor-parallel-size",
                config.expert_tensor_parallel_size, "1",
                "Experts are split across ranks by expert parallelism only.")
    offloaded = {"expert_fc1", "moe_act"} & set(config.offload_modules or [])
    if config.fine_grained_activation_offloading and offloaded:
        _refuse("offload_modules", "--offload-modules", sorted(offloaded),
                "none of 'expert_fc1', 'moe_act'", "")
    if config.delay_wgrad_compute or config.overlap_dispatch_backward_with_experts_wgrad:
        _refuse("delay_wgrad_compute/overlap_dispatch_backward_with_experts_wgrad",
                "--delay-wgrad-compute/--overlap-dispatch-backward-with-experts-wgrad", True,
                "False", "Weight gradients are computed with the input gradients.")
    if config.fp4:
        _refuse("fp4", "--fp4-format", config.fp4, "None", "")
    if config.fp8:
        _validate_fp8(config)


def _validate_dtype_and_sizes(config: TransformerConfig, on_cuda: bool) -> None:
    """CUDA's grouped GEMM has a kernel for BF16 only: FP16 and FP32 fall back to one GEMM per
    expert after copying the offsets to the host (a sync per GEMM). Every device needs the
    operands' row strides in multiples of 16 bytes."""
    dtype = config.params_dtype
    if on_cuda and (config.fp16 or dtype != torch.bfloat16):
        _refuse("params_dtype", "--bf16", dtype, "torch.bfloat16 on CUDA (--bf16; float32 or "
                "bfloat16 on the CPU)", "CUDA's grouped GEMM is host-sync free for BF16 only.")
    if dtype not in (torch.bfloat16, torch.float32):
        _refuse("params_dtype", "--bf16", dtype, "torch.bfloat16 or torch.float32 (CPU)", "")
    multiple = 16 // dtype.itemsize
    for setting, size in (("hidden_size", config.hidden_size),
                          ("moe_ffn_hidden_size", config.moe_ffn_hidden_size)):
        if size % multiple:
            _refuse(setting, f"--{setting.replace('_', '-')}", size, f"a multiple of {multiple}",
                    f"Grouped GEMMs need 16-byte row strides ({dtype}).")


def _validate_fp8(config: TransformerConfig) -> None:
    recipe = getattr(config.fp8_recipe, "value", config.fp8_recipe)
    if recipe != "tensorwise":
        _refuse("fp8_recipe", "--fp8-recipe", recipe, "'tensorwise'",
                "Lean experts scale dynamically, per row of the tokens and per output column "
                "of each expert's weight (finer than tensorwise, never delayed).")
    for setting, size in (("hidden_size", config.hidden_size),
                          ("moe_ffn_hidden_size", config.moe_ffn_hidden_size)):
        if size % 16:
            _refuse(setting, f"--{setting.replace('_', '-')}", size, "a multiple of 16",
                    "FP8 grouped GEMMs need it.")


def validate_lean_layer(config: TransformerConfig, on_cuda: Optional[bool] = None) -> None:
    """Refuse what LeanTokenDispatcher (and the experts it feeds) do not implement (on_cuda:
    see ``validate_lean_experts``)."""
    if config.moe_token_dispatcher_type != "alltoall":
        _refuse("moe_token_dispatcher_type", "--moe-token-dispatcher-type",
                config.moe_token_dispatcher_type, "'alltoall'",
                "The lean dispatcher is an all-to-all dispatcher of real assignments only.")
    if config.moe_router_padding_for_quantization:
        _refuse("moe_router_padding_for_quantization", "--moe-router-padding-for-quantization",
                True, "False", "Lean grouped GEMMs need no padded expert groups.")
    if config.moe_pad_expert_input_to_capacity:
        _refuse("moe_pad_expert_input_to_capacity", "--moe-pad-expert-input-to-capacity", True,
                "False", "")
    if config.moe_shared_expert_overlap:
        _refuse("moe_shared_expert_overlap", "--moe-shared-expert-overlap", True, "False",
                "Shared experts still work; they run beside the routed ones.")
    if config.cuda_graph_impl != "none":
        _refuse("cuda_graph_impl", "--cuda-graph-impl", config.cuda_graph_impl, "'none'",
                "Megatron's CUDA-graph capture of MoE layers is not verified with this path.")
    validate_lean_experts(config, on_cuda)
