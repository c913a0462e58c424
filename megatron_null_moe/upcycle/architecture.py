"""The dense GPT architecture an upcycle starts from, and the Megatron models built from it.

``DenseArchitecture`` is what the dense model is (read from a Megatron checkpoint's args or a
Hugging Face Qwen3 ``config.json``); ``MoEShape`` is what the upcycle adds. From the two come
Megatron's ``TransformerConfig``, a ``GPTModel`` on Megatron's local layer spec (CPU, no
Transformer Engine) and the launch flags that rebuild the same model in a training run.
"""

import dataclasses
from argparse import Namespace
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.spec import with_null_experts

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


@dataclasses.dataclass(frozen=True)
class DenseArchitecture:
    """A dense decoder-only GPT (Megatron names; Qwen3 in its terms in the comments)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # F, Qwen3's intermediate_size
    num_attention_heads: int
    num_query_groups: int  # Qwen3's num_key_value_heads
    kv_channels: int  # head dimension
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    normalization: str = "RMSNorm"
    qk_layernorm: bool = True
    gated_linear_unit: bool = True  # SwiGLU with activation "silu"
    activation: str = "silu"
    tie_embeddings: bool = False
    add_qkv_bias: bool = False
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """What upcycling adds: N experts of width F/G, top-K, a shared expert, null experts.

    moe_layers: 1-based numbers of the layers that become MoE (the others stay dense).
    """

    num_experts: int
    expert_ffn_hidden_size: int
    topk: int
    shared_expert_ffn_hidden_size: int
    null_config: NullExpertConfig
    moe_layers: Tuple[int, ...]


def transformer_config(dense: DenseArchitecture, moe: Optional[MoEShape] = None,
                       params_dtype: torch.dtype = torch.float32,
                       router_settings: Optional[dict] = None) -> TransformerConfig:
    """Megatron's config for the dense model, or for its upcycled MoE when ``moe`` is given
    (softmax scores without groups, unless ``router_settings``, TransformerConfig fields such
    as moe_router_score_function or moe_router_num_groups, say otherwise).

    Fusions that need apex or Transformer Engine are off; initialisation is skipped (every
    tensor is filled from the dense model).
    """
    settings = dict(
        num_layers=dense.num_layers, hidden_size=dense.hidden_size,
        ffn_hidden_size=dense.ffn_hidden_size, num_attention_heads=dense.num_attention_heads,
        num_query_groups=dense.num_query_groups, kv_channels=dense.kv_channels,
        normalization=dense.normalization, layernorm_epsilon=dense.norm_epsilon,
        qk_layernorm=dense.qk_layernorm, gated_linear_unit=dense.gated_linear_unit,
        activation_func=ACTIVATIONS[dense.activation], add_bias_linear=False,
        add_qkv_bias=dense.add_qkv_bias, hidden_dropout=dense.hidden_dropout,
        attention_dropout=dense.attention_dropout, init_method_std=dense.init_method_std,
        params_dtype=params_dtype, use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if moe is not None:
        settings.update(
            num_moe_experts=moe.num_experts, moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_router_topk=moe.topk, moe_layer_freq=moe_layer_pattern(dense, moe),
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
            moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32",
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            **(router_settings or {}),
        )
    return TransformerConfig(**settings)


def moe_layer_pattern(dense: DenseArchitecture, moe: MoEShape) -> Union[int, List[int]]:
    """Megatron's --moe-layer-freq: 1 when every layer is MoE, else a list (1: MoE, 0: dense).

    The form matters beyond the layers it picks: with a list, Megatron saves each layer
    under its own checkpoint keys (``decoder.layers.3.mlp...``), with 1 it stacks all layers
    under one key; a run must use the form its checkpoint was written with.
    """
    pattern = [1 if layer in moe.moe_layers else 0 for layer in range(1, dense.num_layers + 1)]
    return 1 if all(pattern) else pattern


def build_gpt_model(dense: DenseArchitecture, moe: Optional[MoEShape] = None,
                    params_dtype: torch.dtype = torch.float32,
                    expert_path: str = "megatron",
                    router_settings: Optional[dict] = None) -> GPTModel:
    """The dense GPTModel, or the null-expert MoE one, on Megatron's local spec (TP=PP=EP=1;
    expert_path: with_null_experts'; router_settings: transformer_config's).

    Needs Megatron's process groups (e.g. ``single_process_parallel_state("cpu")``).
    """
    config = transformer_config(dense, moe, params_dtype, router_settings)
    if moe is None:
        spec = get_gpt_layer_local_spec(qk_layernorm=dense.qk_layernorm,
                                        normalization=dense.normalization)
    else:
        spec = with_null_experts(
            get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                       normalization=dense.normalization),
            moe.null_config, expert_path=expert_path,
        )
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=dense.vocab_size,
        max_sequence_length=dense.max_position_embeddings, position_embedding_type="rope",
        rotary_base=dense.rotary_base,
        share_embeddings_and_output_weights=dense.tie_embeddings,
    )


def megatron_flags(dense: DenseArchitecture, moe: Optional[MoEShape] = None) -> List[str]:
    """Megatron launch flags that build the dense or the upcycled model (a word an item)."""
    flags = [
        "--num-layers", str(dense.num_layers), "--hidden-size", str(dense.hidden_size),
        "--ffn-hidden-size", str(dense.ffn_hidden_size),
        "--num-attention-heads", str(dense.num_attention_heads),
        "--group-query-attention", "--num-query-groups", str(dense.num_query_groups),
        "--kv-channels", str(dense.kv_channels),
        "--max-position-embeddings", str(dense.max_position_embeddings),
        "--position-embedding-type", "rope", "--rotary-base", _number(dense.rotary_base),
        "--normalization", dense.normalization, "--norm-epsilon", _number(dense.norm_epsilon),
        "--disable-bias-linear", "--init-method-std", _number(dense.init_method_std),
        "--attention-dropout", _number(dense.attention_dropout),
        "--hidden-dropout", _number(dense.hidden_dropout),
    ]
    flags += ["--qk-layernorm"] if dense.qk_layernorm else []
    flags += ["--swiglu"] if dense.gated_linear_unit else []
    flags += ["--add-qkv-bias"] if dense.add_qkv_bias else []
    flags += [] if dense.tie_embeddings else ["--untie-embeddings-and-output-weights"]
    if moe is None:
        return flags
    flags += [
        "--num-experts", str(moe.num_experts),
        "--moe-ffn-hidden-size", str(moe.expert_ffn_hidden_size),
        "--moe-router-topk", str(moe.topk),
        "--moe-null-expert-rho", _number(moe.null_config.real_fraction),
    ]
    pattern = moe_layer_pattern(dense, moe)
    if pattern != 1:
        flags += ["--moe-layer-freq", "[" + ",".join(map(str, pattern)) + "]"]
    if moe.null_config.num_null_copies is not None:
        flags += ["--moe-num-null-experts", str(moe.null_config.num_null_copies)]
    if moe.shared_expert_ffn_hidden_size:
        flags += ["--moe-shared-expert-intermediate-size",
                  str(moe.shared_expert_ffn_hidden_size)]
    return flags


def checkpoint_args(dense: DenseArchitecture, moe: Optional[MoEShape] = None,
                    bf16: bool = False) -> Namespace:
    """The ``args`` a Megatron checkpoint carries: what its loader compares and reads
    (bf16: the checkpoint's tensors are bf16)."""
    args = Namespace(
        num_layers=dense.num_layers, hidden_size=dense.hidden_size,
        ffn_hidden_size=dense.ffn_hidden_size, num_attention_heads=dense.num_attention_heads,
        group_query_attention=True, num_query_groups=dense.num_query_groups,
        kv_channels=dense.kv_channels, max_position_embeddings=dense.max_position_embeddings,
        # Megatron's parser leaves add_position_embedding True with rope (then unused); its
        # loader compares the value.
        position_embedding_type="rope", add_position_embedding=True,
        rotary_base=dense.rotary_base, normalization=dense.normalization,
        layernorm_epsilon=dense.norm_epsilon, qk_layernorm=dense.qk_layernorm,
        swiglu=dense.gated_linear_unit, add_bias_linear=False, add_qkv_bias=dense.add_qkv_bias,
        untie_embeddings_and_output_weights=not dense.tie_embeddings,
        padded_vocab_size=dense.vocab_size, init_method_std=dense.init_method_std,
        attention_dropout=dense.attention_dropout, hidden_dropout=dense.hidden_dropout,
        apply_layernorm_1p=False, rotary_percent=1.0,
        bf16=bf16, fp16=False, num_experts=None,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=1, world_size=1, data_parallel_size=1,
        consumed_train_samples=0, skipped_train_samples=0, ckpt_format="torch_dist",
    )
    if moe is None:
        return args
    vars(args).update(
        num_experts=moe.num_experts, moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_router_topk=moe.topk, moe_layer_freq=moe_layer_pattern(dense, moe),
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_null_expert_rho=moe.null_config.real_fraction,
        moe_num_null_experts=moe.null_config.num_null_copies,
    )
    return args


def _number(value: float) -> str:
    """Shortest text that reads back as the same number (1e-06, 1000000, 0.5)."""
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else repr(value)
