"""A Hugging Face Qwen3 directory (config.json + safetensors) as a dense Megatron GPTModel.

Qwen3 is a Megatron GPT with grouped-query attention, per-head RMSNorm on queries and keys
(``--qk-layernorm``), RoPE, SwiGLU, RMSNorm and no linear biases. The only layout change is
the attention input projection: Megatron's ``linear_qkv`` holds, for each of the
``num_key_value_heads`` groups in turn, the group's query heads, then its key head, then its
value head; Qwen3 keeps q_proj, k_proj and v_proj apart (and a GLU's fc1 is gate_proj over
up_proj). The map runs both ways: ``megatron_tensors`` reads a Qwen3 directory,
``hugging_face_tensors`` gives a Megatron tensor's Hugging Face names (for the export).
Nothing is downloaded.
"""

import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open

from megatron_null_moe.upcycle.architecture import DenseArchitecture

HF_FLAG = "--hf-model"


def _refuse(directory: Path, what: str) -> None:
    raise ValueError(f"{HF_FLAG} {directory}: {what}")


def _read_json_object(directory: Path, name: str) -> dict:
    """The JSON object in file ``name``; refused naming the file if it is not one."""
    try:
        value = json.loads((directory / name).read_text())
    except (OSError, ValueError) as error:  # ValueError: bad JSON or not UTF-8
        _refuse(directory, f"{name} is not valid JSON ({error}).")
    if not isinstance(value, dict):
        _refuse(directory, f"{name} holds a JSON {type(value).__name__}; allowed: a JSON "
                           "object.")
    return value


def read_config(directory: Path) -> dict:
    if not (directory / "config.json").is_file():
        _refuse(directory, "no config.json; allowed: a Hugging Face Qwen3ForCausalLM directory "
                           "(config.json and *.safetensors).")
    return _read_json_object(directory, "config.json")


# config.json keys a Qwen3 architecture cannot be read without (the others have defaults).
REQUIRED_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size",
                        "num_attention_heads", "vocab_size", "max_position_embeddings",
                        "rms_norm_eps")


def qwen3_architecture(directory: Path, config: dict) -> DenseArchitecture:
    """DenseArchitecture of a Qwen3 config; anything else is refused, naming what is allowed."""
    model_type = config.get("model_type")
    if model_type == "qwen3_moe" or config.get("num_experts"):
        _refuse(directory, f"model_type {model_type!r} is already a mixture of experts; "
                           "allowed: a dense model, model_type 'qwen3'.")
    if model_type != "qwen3":
        _refuse(directory, f"model_type {model_type!r} is not supported; allowed: 'qwen3'.")
    missing = [key for key in REQUIRED_CONFIG_KEYS if config.get(key) is None]
    if missing:
        _refuse(directory, f"config.json has no {', '.join(map(repr, missing))}; allowed: a "
                           "Qwen3 config.json (as transformers saves it).")
    rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(rope_key) or {}
    if not isinstance(rope, dict):
        _refuse(directory, f"config.json: {rope_key} {rope!r}; allowed: a JSON object.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for name, value, allowed in (("hidden_act", config.get("hidden_act"), "silu"),
                                 ("rope_type", rope_type, "default"),
                                 ("attention_bias", config.get("attention_bias", False), False),
                                 ("use_sliding_window",
                                  config.get("use_sliding_window", False), False)):
        if value != allowed:
            _refuse(directory, f"{name}={value!r} is not supported; allowed: {allowed!r}.")
    heads = config["num_attention_heads"]
    return DenseArchitecture(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads", heads),
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config["max_position_embeddings"],
        rotary_base=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        norm_epsilon=config["rms_norm_eps"], normalization="RMSNorm", qk_layernorm=True,
        gated_linear_unit=True, activation="silu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_method_std=config.get("initializer_range", 0.02),
        attention_dropout=config.get("attention_dropout", 0.0),
    )


class SafetensorsReader:
    """Tensors of a Hugging Face directory by name, read one at a time (memory-light)."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = "model.safetensors.index.json"
        if (directory / index).is_file():
            weight_map = _read_json_object(directory, index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(f, str) for f in weight_map.values()):
                _refuse(directory, f"{index} has no 'weight_map' of tensor names to file "
                                   f"names (got {str(weight_map)[:100]}).")
        elif (directory / "model.safetensors").is_file():
            weight_map = None
        else:
            _refuse(directory, "no model.safetensors or model.safetensors.index.json.")
        self._files = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in files:
            try:
                self._files[name] = safe_open(str(directory / name), framework="pt")
            except Exception as error:  # safetensors raises its own error types
                _refuse(directory, f"{name} cannot be read as safetensors ({error}).")
        self._where = weight_map or {key: "model.safetensors"
                                     for key in self._files["model.safetensors"].keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            _refuse(self.directory, f"tensor {name!r} is missing.")
        try:
            return self._files[self._where[name]].get_tensor(name)
        except Exception as error:
            _refuse(self.directory, f"tensor {name!r} cannot be read ({error}).")


# Tensors that map one to one: (Hugging Face name, Megatron GPTModel name), per layer under
# ``model.layers.L.`` and ``decoder.layers.L.``, and outside the layers (lm_head only with
# untied embeddings).
LAYER_NAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
    ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
)
MODEL_NAMES = (
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    ("model.norm.weight", "decoder.final_layernorm.weight"),
    ("lm_head.weight", "output_layer.weight"),
)
QKV = "self_attention.linear_qkv.weight"


def hugging_face_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def megatron_layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}."


def interleave_qkv(q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                   num_query_groups: int) -> torch.Tensor:
    """[(heads + 2 groups) d, h] Megatron linear_qkv from q [heads d, h], k and v [groups d, h]:
    per group, its heads/groups query heads, then its key head, then its value head."""
    hidden = q_weight.shape[1]
    q = q_weight.reshape(num_query_groups, -1, hidden)
    k = k_weight.reshape(num_query_groups, -1, hidden)
    v = v_weight.reshape(num_query_groups, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv_weight: torch.Tensor, num_query_groups: int, num_attention_heads: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """interleave_qkv's inverse: q [heads d, h], k and v [groups d, h] from linear_qkv."""
    hidden = qkv_weight.shape[1]
    heads_per_group = num_attention_heads // num_query_groups
    grouped = qkv_weight.reshape(num_query_groups, heads_per_group + 2, -1, hidden)
    return (grouped[:, :heads_per_group].reshape(-1, hidden),
            grouped[:, heads_per_group].reshape(-1, hidden),
            grouped[:, heads_per_group + 1].reshape(-1, hidden))


def megatron_tensors(reader: SafetensorsReader,
                     dense: DenseArchitecture) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Megatron GPTModel parameter name, tensor) for every parameter of the dense model."""
    for hf_name, megatron_name in MODEL_NAMES:
        if megatron_name != "output_layer.weight" or not dense.tie_embeddings:
            yield megatron_name, reader[hf_name]
    for layer in range(dense.num_layers):
        hf, mg = hugging_face_layer_prefix(layer), megatron_layer_prefix(layer)
        for hf_name, megatron_name in LAYER_NAMES:
            yield mg + megatron_name, reader[hf + hf_name]
        attention = hf + "self_attn."
        yield mg + QKV, interleave_qkv(
            reader[attention + "q_proj.weight"], reader[attention + "k_proj.weight"],
            reader[attention + "v_proj.weight"], dense.num_query_groups)
        yield mg + "mlp.linear_fc1.weight", torch.cat(
            [reader[hf + "mlp.gate_proj.weight"], reader[hf + "mlp.up_proj.weight"]])
        yield mg + "mlp.linear_fc2.weight", reader[hf + "mlp.down_proj.weight"]


def hugging_face_tensors(name: str, tensor: torch.Tensor, dense: DenseArchitecture
                         ) -> List[Tuple[str, torch.Tensor]]:
    """megatron_tensors' inverse, one Megatron GPTModel tensor at a time: the Hugging Face
    Qwen3 (name, tensor) pairs it holds. ValueError for a name outside that layout."""
    outside = {megatron_name: hf_name for hf_name, megatron_name in MODEL_NAMES}
    if name in outside:
        return [(outside[name], tensor)]
    layer, rest = split_layer_name(name)
    hf = hugging_face_layer_prefix(layer)
    in_layer = {megatron_name: hf_name for hf_name, megatron_name in LAYER_NAMES}
    if rest in in_layer:
        return [(hf + in_layer[rest], tensor)]
    if rest == QKV:
        q, k, v = split_qkv(tensor, dense.num_query_groups, dense.num_attention_heads)
        return [(f"{hf}self_attn.{part}_proj.weight", weight)
                for part, weight in (("q", q), ("k", k), ("v", v))]
    if rest.startswith("mlp."):
        return glu_tensors(hf + "mlp.", rest[len("mlp."):], tensor)
    raise ValueError(f"{name}: not a tensor of a dense Qwen3's layout")


_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def split_layer_name(name: str) -> Tuple[int, str]:
    """'decoder.layers.3.mlp.linear_fc1.weight' -> (3, 'mlp.linear_fc1.weight');
    ValueError for a name outside the layers."""
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name}: not a tensor of a decoder layer")
    return int(match.group(1)), match.group(2)


def glu_tensors(prefix: str, linear: str, tensor: torch.Tensor
                ) -> List[Tuple[str, torch.Tensor]]:
    """A Megatron GLU's ``linear`` ('linear_fc1.weight' = [gate; up] or 'linear_fc2.weight')
    under Qwen3's MLP names at ``prefix``."""
    if linear == "linear_fc1.weight":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(prefix + "gate_proj.weight", gate), (prefix + "up_proj.weight", up)]
    if linear == "linear_fc2.weight":
        return [(prefix + "down_proj.weight", tensor)]
    raise ValueError(f"{prefix}{linear}: not a GLU weight (linear_fc1/linear_fc2.weight)")


def load_into(model: torch.nn.Module, tensors: Iterator[Tuple[str, torch.Tensor]],
              source: str) -> None:
    """Copy every (name, tensor) into ``model``'s parameter of that name; each parameter
    must be filled exactly once, with the same shape."""
    targets: Dict[str, torch.Tensor] = dict(model.named_parameters())
    filled = set()
    for name, tensor in tensors:
        if name not in targets or targets[name].shape != tensor.shape:
            expected = tuple(targets[name].shape) if name in targets else "no such parameter"
            raise ValueError(f"{source}: tensor for {name} has shape {tuple(tensor.shape)}; "
                             f"the model expects {expected}.")
        with torch.no_grad():
            targets[name].copy_(tensor)
        filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(f"{source}: no tensor for {missing[:5]}")
