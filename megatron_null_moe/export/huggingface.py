"""The Hugging Face side of an export: config.json and each Megatron tensor's names there.

Names follow transformers' Qwen3-MoE, so tools that read Qwen3-MoE weights find the real
experts: ``model.layers.L.mlp.gate.weight`` (router rows), ``mlp.experts.E.{gate,up,
down}_proj.weight``; layers left dense keep Qwen3's ``mlp.{gate,up,down}_proj.weight``. What
Qwen3-MoE lacks gets names of its own: ``mlp.gate.null_weight`` (the null row),
``mlp.gate.null_selection_bias`` (the budget controller's bias, fp32 in any dtype),
``mlp.gate.expert_bias`` (the per-expert selection bias, fp32 in any dtype) and
``mlp.shared_expert.{gate,up,down}_proj.weight``. Without null copies, a shared expert or a
routing option Qwen3-MoE lacks (sigmoid scores, a per-expert bias, groups) the model is a
plain ``qwen3_moe`` (weights renormalised over the top-K: norm_topk_prob); otherwise
``qwen3_null_moe``, whose code (``remote_code/``) is written beside the weights.
"""

import re
from typing import List, Tuple

import torch

from megatron_null_moe.export.checkpoint import MoEModel
from megatron_null_moe.upcycle import huggingface as qwen3

REMOTE_CONFIGURATION = "configuration_qwen3_null_moe"
REMOTE_MODELING = "modeling_qwen3_null_moe"
# Stay fp32 in a bf16 export: selection biases added to fp32 logits or scores, as the
# plugin keeps them.
FP32_TENSORS = ("null_selection_bias", "expert_bias")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def is_plain_qwen3_moe(model: MoEModel) -> bool:
    """transformers' own Qwen3-MoE computes it: rho = 1, no shared expert, no top-K scaling,
    softmax scores, no per-expert bias, no groups. (Qwen3-MoE takes router logits in the
    model's dtype: with --moe-router-dtype and a bf16 export they are rounded to bf16 where
    training kept them wider.)"""
    return (model.num_null_copies == 0 and not model.moe.shared_expert_ffn_hidden_size
            and model.topk_scaling_factor in (None, 1.0) and model.score_function == "softmax"
            and not model.expert_bias and model.num_groups is None)


def routing_options(model: MoEModel) -> dict:
    """config.json's routing options beyond the paper's (sigmoid scores, a per-expert bias,
    groups), those the checkpoint uses only: a model without them exports as it did before
    they existed, and the configuration's defaults read their absence as softmax, no bias,
    no groups."""
    options = {}
    if model.score_function != "softmax":
        options["router_score_function"] = model.score_function
    if model.expert_bias:
        options["router_expert_bias"] = True
    if model.num_groups is not None:
        options.update(router_num_groups=model.num_groups, router_group_topk=model.group_topk)
    return options


def hugging_face_config(model: MoEModel, dtype: torch.dtype) -> dict:
    """config.json of the exported model (tensors in ``dtype``)."""
    dense, moe = model.dense, model.moe
    config = dict(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
        intermediate_size=dense.ffn_hidden_size, num_hidden_layers=dense.num_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_query_groups, head_dim=dense.kv_channels,
        hidden_act=dense.activation, max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.init_method_std, rms_norm_eps=dense.norm_epsilon,
        tie_word_embeddings=dense.tie_embeddings, use_cache=True,
        rope_parameters={"rope_type": "default", "rope_theta": dense.rotary_base},
        attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
        sliding_window=None, decoder_sparse_step=1,
        mlp_only_layers=[layer - 1 for layer in range(1, dense.num_layers + 1)
                         if layer not in moe.moe_layers],
        num_experts=moe.num_experts, num_experts_per_tok=moe.topk,
        moe_intermediate_size=moe.expert_ffn_hidden_size, norm_topk_prob=True,
        dtype=DTYPE_NAMES[dtype],
    )
    if is_plain_qwen3_moe(model):
        return dict(config, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    return dict(
        config, architectures=["Qwen3NullMoeForCausalLM"], model_type="qwen3_null_moe",
        num_null_experts=model.num_null_copies,
        shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        router_dtype=model.router_dtype, router_topk_scaling_factor=model.topk_scaling_factor,
        **routing_options(model),
        auto_map={
            "AutoConfig": f"{REMOTE_CONFIGURATION}.Qwen3NullMoeConfig",
            "AutoModel": f"{REMOTE_MODELING}.Qwen3NullMoeModel",
            "AutoModelForCausalLM": f"{REMOTE_MODELING}.Qwen3NullMoeForCausalLM",
        },
    )


# An MoE layer's MLP tensors (names under decoder.layers.L.mlp.) that map one to one.
ROUTER_NAMES = {"router.weight": "gate.weight", "router.null_weight": "gate.null_weight",
                "router.null_selection_bias": "gate.null_selection_bias",
                "router.expert_bias": "gate.expert_bias"}
_EXPERT = re.compile(r"experts\.local_experts\.(\d+)\.(.+)")


def hugging_face_tensors(name: str, tensor: torch.Tensor, model: MoEModel
                         ) -> List[Tuple[str, torch.Tensor]]:
    """The Hugging Face (name, tensor) pairs of Megatron GPTModel tensor ``name``.
    ValueError for a name outside the layout (none of the model's)."""
    if not name.startswith("decoder.layers.") or ".mlp." not in name:
        return qwen3.hugging_face_tensors(name, tensor, model.dense)
    layer, rest = qwen3.split_layer_name(name)
    if layer + 1 not in model.moe.moe_layers:
        return qwen3.hugging_face_tensors(name, tensor, model.dense)
    mlp, rest = qwen3.hugging_face_layer_prefix(layer) + "mlp.", rest[len("mlp."):]
    if rest in ROUTER_NAMES:
        return [(mlp + ROUTER_NAMES[rest], tensor)]
    expert = _EXPERT.fullmatch(rest)
    if expert:
        return qwen3.glu_tensors(f"{mlp}experts.{expert.group(1)}.", expert.group(2),
                                       tensor)
    if rest.startswith("shared_experts."):
        return qwen3.glu_tensors(mlp + "shared_expert.", rest[len("shared_experts."):],
                                       tensor)
    raise ValueError(f"{name}: not a tensor of a null-expert Qwen3-MoE layer")


def exported_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor ``name`` is written in when the export's dtype is ``dtype``."""
    return torch.float32 if name.endswith(FP32_TENSORS) else dtype
