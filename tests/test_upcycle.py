"""Upcycling against the real thing: transformers' Qwen3, Megatron's models and loop.

A tiny random Qwen3 (2 layers, hidden 64, 4 query heads over 2 KV groups, FFN 128) is made
with ``transformers`` and saved locally; nothing is downloaded.
"""

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_null_moe.cpu_ranks import run_on_ranks
from megatron_null_moe.process_groups import free_port
from megatron_null_moe.upcycle.__main__ import build_parser, read_dense, upcycle
from megatron_null_moe.upcycle.architecture import (
    DenseArchitecture,
    build_gpt_model,
    checkpoint_args,
    megatron_flags,
)
from megatron_null_moe.upcycle.checkpoint import save_release_checkpoint, staged_outputs
from megatron_null_moe.upcycle.convert import UpcycleSettings, upcycle_into
from megatron_null_moe.upcycle.weights import ffn_slices
from test_pretrain import scalars
from upcycle_workers import resave_dense_checkpoints

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
# fp32 on the CPU; measured: 1.8e-6 (transformers vs Megatron, logits up to 3.8) and 1.4e-6
# (upcycled at rho = 1 vs dense).
LOGIT_TOLERANCE = 1e-5


def make_qwen3(directory: Path, tie: bool = False, max_shard_size=None) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
                    initializer_range=0.1, tie_word_embeddings=tie)
    model = Qwen3ForCausalLM(Qwen3Config(**settings)).float()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size}
                                        if max_shard_size else {}))
    return directory


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_qwen3(tmp_path_factory.mktemp("qwen3") / "untied")


def arguments(*argv) -> argparse.Namespace:
    return build_parser().parse_args([str(a) for a in argv])


def logits(model, tokens=TOKENS):
    """[B, S, V] logits of a Megatron GPTModel (causal mask, eval mode)."""
    model.eval()
    length = tokens.shape[1]
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
    positions = torch.arange(length)[None].expand(tokens.shape[0], length)
    with torch.no_grad():
        return model(tokens, positions, mask)


def transformers_logits(directory: Path):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(directory).float().eval()
    with torch.no_grad():
        return model(TOKENS).logits


def upcycled_models(directory: Path, **settings):
    """(dense architecture, dense model, MoE model, settings) without writing anything."""
    dense, dense_model = read_dense(arguments("--hf-model", directory, "--output", "unused",
                                              "--num-experts", "1"))
    upcycle_settings = UpcycleSettings(**settings)
    moe = upcycle_settings.moe_shape(dense)
    moe_model = build_gpt_model(dense, moe)
    upcycle_into(dense_model, moe_model, dense, moe, upcycle_settings)
    return dense, dense_model, moe_model


@pytest.mark.parametrize("tie,max_shard_size", [(False, None), (True, None), (False, "100KB")])
def test_converted_dense_model_logits_equal_transformers_qwen3(parallel_state, tmp_path, tie,
                                                                max_shard_size):
    """Untied and tied embeddings; one safetensors file or shards with an index."""
    directory = make_qwen3(tmp_path / "qwen3", tie=tie, max_shard_size=max_shard_size)
    assert (directory / "model.safetensors.index.json").is_file() == bool(max_shard_size)
    _, model = read_dense(arguments("--hf-model", directory, "--output", tmp_path / "out",
                                    "--num-experts", "4"))
    reference = transformers_logits(directory)
    assert reference.abs().max() > 1.0  # logits of a size that tests something
    assert (logits(model) - reference).abs().max() < LOGIT_TOLERANCE


def test_upcycled_without_nulls_at_granularity_two_keeps_dense_logits(parallel_state, qwen3):
    """rho = 1, G = 2, K = 2: every token's two slots are one whole group (the group's two
    experts share a router row), so every layer computes the dense FFN exactly."""
    _, dense_model, moe_model = upcycled_models(qwen3, num_experts=4, granularity=2, topk=2)
    difference = (logits(moe_model) - logits(dense_model)).abs().max()
    assert difference < LOGIT_TOLERANCE
    assert (logits(moe_model) - transformers_logits(qwen3)).abs().max() < LOGIT_TOLERANCE


def test_only_the_chosen_layers_become_moe(parallel_state, qwen3):
    """--moe-layers 2: layer 1 keeps its dense FFN, layer 2 is MoE; at rho = 1 with whole
    groups the logits stay the dense model's."""
    dense, dense_model, moe_model = upcycled_models(qwen3, num_experts=4, granularity=2,
                                                    topk=2, moe_layers=(2,))
    first, second = moe_model.decoder.layers
    assert torch.equal(first.mlp.linear_fc1.weight,
                       dense_model.decoder.layers[0].mlp.linear_fc1.weight)
    assert len(second.mlp.experts.local_experts) == 4
    assert (logits(moe_model) - logits(dense_model)).abs().max() < LOGIT_TOLERANCE
    moe = UpcycleSettings(num_experts=4, granularity=2, moe_layers=(2,)).moe_shape(dense)
    flags = megatron_flags(dense, moe)
    assert flags[flags.index("--moe-layer-freq") + 1] == "[0,1]"


def _layer_outputs(dense_model, moe_model, layer, null_push, seed):
    """Dense FFN and MoE layer on the same normalised states; routed real experts per token.

    null_push: added to the null row along a random direction, so that some tokens keep no
    real expert and some keep all K."""
    dense_mlp = dense_model.decoder.layers[layer].mlp
    moe_mlp = moe_model.decoder.layers[layer].mlp
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(64, 1, 64, generator=generator)  # [S, B, h]
    with torch.no_grad():
        moe_mlp.router.null_weight += null_push * torch.randn(1, 64, generator=generator)
        dense_out = dense_mlp(hidden)[0].squeeze(1)
        moe_out = moe_mlp(hidden)[0].squeeze(1)
        _, routing_map = moe_mlp.router(hidden)
    return dense_out, moe_out, routing_map.sum(dim=-1)


def test_moe_layer_is_dense_ffn_for_every_token_with_a_real_expert(parallel_state, qwen3):
    """r = 0, G = 1, no shared expert, rho = 0.5 (N = 4, M = 4, K = 2)."""
    _, dense_model, moe_model = upcycled_models(qwen3, num_experts=4, granularity=1, topk=2,
                                                real_fraction=0.5)
    moe_model.eval()
    for layer in range(2):
        dense_out, moe_out, real = _layer_outputs(dense_model, moe_model, layer, 0.3, layer)
        assert {0, 1, 2} <= set(real.tolist())  # no real, one real, all real experts
        kept = real > 0
        assert (moe_out[kept] - dense_out[kept]).abs().max() < 1e-5
        assert moe_out[~kept].abs().max() == 0


def test_granularity_and_shared_expert_keep_dense_ffn_for_whole_groups(parallel_state, qwen3):
    """G = 2 with K = 2 and M = 4 multiples of G: a token's real experts are whole groups,
    so it gets the dense FFN exactly (shared half + routed half); a token with no real
    expert gets the shared expert's half of the dense FFN."""
    _, dense_model, moe_model = upcycled_models(qwen3, num_experts=4, granularity=2, topk=2,
                                                real_fraction=0.5,
                                                shared_expert_ffn_hidden_size=128)
    moe_model.eval()
    for layer in range(2):
        dense_out, moe_out, real = _layer_outputs(dense_model, moe_model, layer, 0.3, layer)
        assert set(real.tolist()) == {0, 2}  # whole groups only
        kept = real > 0
        assert (moe_out[kept] - dense_out[kept]).abs().max() < 1e-5
        assert (moe_out[~kept] - dense_out[~kept] / 2).abs().max() < 1e-5


def test_independent_router_rows_route_expert_by_expert(parallel_state, qwen3):
    """--router-init independent: one row per expert, so a token may take one slice of a
    copy (1 real expert at K = 2), which grouped rows never do (previous test)."""
    _, dense_model, moe_model = upcycled_models(qwen3, num_experts=4, granularity=2, topk=2,
                                                real_fraction=0.5, grouped_router=False)
    moe_model.eval()
    rows = moe_model.decoder.layers[0].mlp.router.weight
    assert len({tuple(row.tolist()) for row in rows}) == 4
    _, _, real = _layer_outputs(dense_model, moe_model, 0, 0.3, 0)
    assert 1 in set(real.tolist())


def test_null_start_mean_row_leaves_the_selection_bias_at_zero(parallel_state, qwen3):
    """--null-start mean-row: the paper's routing from the null row alone (bias 0); the
    default writes the calibrated offset into both budget buffers."""
    for calibrated in (True, False):
        _, _, moe_model = upcycled_models(qwen3, num_experts=4, granularity=2, topk=2,
                                          real_fraction=0.5, calibrated_null_start=calibrated)
        router = moe_model.decoder.layers[0].mlp.router
        torch.testing.assert_close(router.null_selection_bias, router.null_bias_integral)
        assert (float(router.null_selection_bias) != 0.0) == calibrated


def test_drop_upcycling_reinitialises_the_stated_share_of_each_expert(parallel_state, qwen3):
    dense, dense_model, moe_model = upcycled_models(qwen3, num_experts=4, granularity=2,
                                                    topk=2, reinit_fraction=0.3)
    fc1 = dense_model.decoder.layers[1].mlp.linear_fc1.weight
    fc2 = dense_model.decoder.layers[1].mlp.linear_fc2.weight
    slices = ffn_slices(fc1, fc2, 2, gated=True)
    experts = moe_model.decoder.layers[1].mlp.experts.local_experts
    columns = []
    for index, expert in enumerate(experts):
        changed = (expert.linear_fc2.weight != slices[index % 2][1] * 2).any(dim=0)
        assert int(changed.sum()) == round(0.3 * 64)  # 19 of the expert's 64 units
        columns.append(changed)
    assert not torch.equal(columns[0], columns[2])  # copies of a slice differ


TINY = DenseArchitecture(num_layers=2, hidden_size=64, ffn_hidden_size=128,
                         num_attention_heads=4, num_query_groups=2, kv_channels=16,
                         vocab_size=128, max_position_embeddings=128, rotary_base=1e6,
                         norm_epsilon=1e-6)


@pytest.mark.parametrize("argv,match", [
    (("--granularity", "4"),  # the default top-2 at G = 4
     r"--moe-router-topk 2 is not a multiple of --granularity 4: .* take 2 real experts"),
    (("--granularity", "4", "--moe-null-expert-rho", "0.5"),  # M = 8
     r"--moe-router-topk 2 is not a multiple of --granularity 4"),
    (("--granularity", "4", "--moe-router-topk", "4", "--moe-null-expert-rho", "0.8"),
     r"M=2 from --moe-null-expert-rho 0.8 is below --moe-router-topk 4 and not a multiple "
     r"of --granularity 4: .* take 2 real experts"),
    (("--granularity", "4", "--moe-router-topk", "4", "--moe-null-expert-rho", "0.8",
      "--moe-num-null-experts", "2"), r"--moe-num-null-experts 2 is below"),
])
def test_grouped_router_init_refuses_a_top_k_that_cuts_a_group(argv, match):
    """With grouped rows such a start is not the dense FFN; the message says what is allowed,
    and --router-init independent (no such promise) takes the same setting."""
    from megatron_null_moe.upcycle.__main__ import settings_from_args

    def moe_shape(*more):
        return settings_from_args(arguments("--hf-model", "unused", "--output", "unused",
                                            "--num-experts", "8", *more)).moe_shape(TINY)

    with pytest.raises(ValueError, match=match + r".*allowed: --moe-router-topk a multiple of "
                                               r"--granularity.* or --router-init independent"):
        moe_shape(*argv)
    moe_shape(*argv, "--router-init", "independent")
    for whole in (("--moe-router-topk", "4"), ("--moe-router-topk", "4",  # K = 4, M = 8
                                               "--moe-null-expert-rho", "0.5")):
        moe_shape("--granularity", "4", *whole)


@functools.lru_cache(maxsize=None)
def _megatron_defaults() -> dict:
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return {action.dest: (action.option_strings, action.default) for action in parser._actions}


@pytest.mark.parametrize("name,value", [
    ("rotary_interleaved", True), ("use_rope_scaling", True),
    ("rotary_seq_len_interpolation_factor", 2), ("no_rope_freq", 4),
    ("window_size", (128, 0)), ("apply_residual_connection_post_layernorm", True),
    ("openai_gelu", True), ("quick_geglu", True), ("qk_l2_norm", True),
    ("attention_output_gate", True), ("softmax_type", "learnable"),
    ("layernorm_zero_centered_gamma", True), ("glu_linear_offset", 1.0),
    ("activation_func_clamp_value", 7.0), ("experimental_attention_variant", "dsa"),
    ("use_mup", True),
])
def test_megatron_checkpoint_settings_that_change_the_function_are_refused(name, value):
    """Each such setting of a dense checkpoint's args, at anything but Megatron-Core
    0.19.2's default, is refused naming Megatron's flag; the default passes."""
    from megatron_null_moe.upcycle.checkpoint import UNSUPPORTED_SETTINGS, dense_architecture

    (flag, allowed), = [(f, a) for f, n, a in UNSUPPORTED_SETTINGS if n == name]
    assert _megatron_defaults()[name] == ([flag], allowed)
    args = checkpoint_args(TINY)
    setattr(args, name, allowed)
    assert dense_architecture(Path("ckpt"), args) == TINY
    setattr(args, name, value)
    message = f"--megatron-checkpoint ckpt: {flag}={value!r} is not supported; allowed: " \
              f"{allowed!r}."
    with pytest.raises(ValueError, match=re.escape(message)):
        dense_architecture(Path("ckpt"), args)


def test_megatron_checkpoint_with_linear_biases_is_refused_naming_the_flag():
    from megatron_null_moe.upcycle.checkpoint import dense_architecture

    args = checkpoint_args(TINY)
    args.add_bias_linear = True
    with pytest.raises(ValueError, match=r"saved without --disable-bias-linear"):
        dense_architecture(Path("ckpt"), args)


def test_megatron_checkpoint_without_normalization_reads_megatron_default():
    from megatron_null_moe.upcycle.checkpoint import dense_architecture

    args = checkpoint_args(TINY)
    del args.normalization
    assert dense_architecture(Path("ckpt"), args).normalization == "LayerNorm"
    args.normalization = "Foo"
    with pytest.raises(ValueError, match=r"--normalization='Foo'; allowed: 'LayerNorm'"):
        dense_architecture(Path("ckpt"), args)


def _checkpoint_tensors(directory: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    release = directory / "release"
    converted = directory.parent / f"{directory.name}.pt"
    dcp_to_torch_save(str(release), str(converted))
    tensors = torch.load(converted, weights_only=False)
    return {k: v for k, v in tensors.items() if torch.is_tensor(v)}


PAPER_LIKE = ("--num-experts", "4", "--granularity", "2", "--moe-router-topk", "2",
              "--moe-null-expert-rho", "0.5", "--moe-shared-expert-intermediate-size", "128",
              "--reinit-fraction", "0.3", "--seed", "5")


def test_megatron_checkpoint_at_any_tp_pp_upcycles_like_hugging_face(parallel_state, qwen3,
                                                                     tmp_path):
    """HF -> dense Megatron checkpoint (--save-dense), re-saved by Megatron at TP=2 and at
    PP=2; upcycling each gives the same tensors as upcycling the HF directory."""
    report = upcycle(arguments("--hf-model", qwen3, "--output", tmp_path / "from_hf",
                               "--save-dense", tmp_path / "dense", *PAPER_LIKE))
    expected = _checkpoint_tensors(tmp_path / "from_hf")
    assert "decoder.layers.mlp.router.null_weight" in expected
    assert "decoder.layers.pre_mlp_layernorm.weight" in expected  # Transformer Engine's key
    offsets = torch.tensor([[start["null_offset"]] for start in report["router_start"]])
    for name in ("null_selection_bias", "null_bias_integral"):  # the budget state starts at b
        torch.testing.assert_close(expected[f"decoder.layers.mlp.router.{name}"], offsets)
    dense = DenseArchitecture(**report["dense"])
    layouts = [(2, 1, tmp_path / "dense_tp2"), (1, 2, tmp_path / "dense_pp2")]
    run_on_ranks(resave_dense_checkpoints, 2, dense, tmp_path / "dense", layouts)
    for _, _, resaved in layouts:
        output = tmp_path / f"from_{resaved.name}"
        upcycle(arguments("--megatron-checkpoint", resaved, "--output", output, *PAPER_LIKE))
        tensors = _checkpoint_tensors(output)
        assert tensors.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(tensors[name], value), name


def _nothing_written(output: Path) -> bool:
    return not output.exists() and not list(output.parent.glob(f".{output.name}.partial*"))


def _refused(argv, match, output):
    with pytest.raises(ValueError, match=match):
        upcycle(arguments("--output", output, *argv))  # an --output in argv wins
    assert _nothing_written(output)


def test_bad_input_is_refused_naming_the_option_and_writes_nothing(parallel_state, qwen3,
                                                                   tmp_path):
    output = tmp_path / "out"
    source = ("--hf-model", qwen3)
    _refused((*source, "--num-experts", "6", "--granularity", "4"),
             r"--num-experts 6 is not a multiple of --granularity 4", output)
    _refused((*source, "--num-experts", "6", "--granularity", "3"),
             r"--granularity 3 does not divide the dense FFN width F=128; allowed: a divisor",
             output)
    _refused((*source, "--num-experts", "4", "--moe-shared-expert-intermediate-size", "100"),
             r"--moe-shared-expert-intermediate-size 100: allowed: 0 .* multiple", output)
    _refused((*source, "--num-experts", "4", "--reinit-fraction", "1.5"),
             r"--reinit-fraction 1.5: allowed: a number in \[0, 1\)", output)
    _refused((*source, "--num-experts", "4", "--moe-null-expert-rho", "0.3"),
             r"--moe-null-expert-rho=0.3 with 4 experts gives M = .* not a whole number", output)
    _refused((*source, "--num-experts", "4", "--moe-layers", "3"),
             r"--moe-layers '3': allowed: layer numbers in 1..2", output)

    moe_config = json.loads((qwen3 / "config.json").read_text())
    for changes, match in (({"model_type": "qwen3_moe", "num_experts": 8},
                            r"model_type 'qwen3_moe' is already a mixture of experts"),
                           ({"model_type": "llama"},
                            r"model_type 'llama' is not supported; allowed: 'qwen3'")):
        other = tmp_path / changes["model_type"]
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**moe_config, **changes}))
        _refused(("--hf-model", other, "--num-experts", "4"), f"--hf-model {other}: {match}",
                 output)
    broken = tmp_path / "broken"
    broken.mkdir()
    _refused(("--hf-model", broken, "--num-experts", "4"), r"no config.json", output)
    (broken / "config.json").write_text((qwen3 / "config.json").read_text())
    _refused(("--hf-model", broken, "--num-experts", "4"), r"no model.safetensors", output)
    (broken / "model.safetensors").write_bytes((qwen3 / "model.safetensors").read_bytes()[:999])
    _refused(("--hf-model", broken, "--num-experts", "4"), r"cannot be read as safetensors",
             output)
    _refused(("--megatron-checkpoint", tmp_path, "--num-experts", "4"),
             r"not a Megatron torch_dist checkpoint", output)

    upcycled, dense = tmp_path / "upcycled", tmp_path / "dense"
    upcycle(arguments(*source, "--output", upcycled, "--num-experts", "4", "--save-dense", dense))
    _refused(("--megatron-checkpoint", upcycled, "--num-experts", "4"),
             r"already a mixture of experts \(--num-experts 4\)", output)
    _refused((*source, "--num-experts", "4", "--output", upcycled), r"--output .* exists", output)
    assert (upcycled / "release").is_dir()  # untouched
    mla = tmp_path / "mla"
    dense_args = checkpoint_args(DenseArchitecture(**json.loads(
        (upcycled / "upcycle.json").read_text())["dense"]))
    dense_args.multi_latent_attention = True
    with staged_outputs([("--output", mla)]) as (directory,):
        save_release_checkpoint(read_dense(arguments(*source, "--output", output,
                                                     "--num-experts", "4"))[1],
                                dense_args, directory, [], {})
    _refused(("--megatron-checkpoint", mla, "--num-experts", "4"),
             r"--multi-latent-attention=True is not supported; allowed: False", output)
    distcp = next((dense / "release").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    _refused(("--megatron-checkpoint", dense, "--num-experts", "4"),
             r"its tensors cannot be loaded", output)


@pytest.mark.parametrize("text", ["0", "2-5", "1,3,5", "1,3-4,9", "5,1"])
def test_moe_layers_refusal_shows_the_layers_as_typed(text):
    from megatron_null_moe.upcycle.__main__ import parse_layers
    from megatron_null_moe.upcycle.convert import layers_text

    assert layers_text(parse_layers(text)) == text
    with pytest.raises(ValueError, match=rf"--moe-layers '{text}': allowed: layer numbers "
                                         r"in 1..2 \(the dense model's layers\)"):
        UpcycleSettings(num_experts=4, moe_layers=parse_layers(text)).moe_shape(TINY)


def test_outputs_are_new_names_in_existing_directories(tmp_path):
    """Checked before the read: a dangling link counts as existing, a missing parent is
    refused (not created), for --output and --save-dense alike."""
    from megatron_null_moe.upcycle.__main__ import refuse_existing_outputs

    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    for flag, path, match in (
            ("--output", tmp_path / "link", r"--output .*link exists; allowed: a path that "
                                            r"does not exist"),
            ("--save-dense", tmp_path / "file", r"--save-dense .*file exists"),
            ("--output", tmp_path / "no" / "out", r"--output .*out: its parent directory "
                                                  r".*no does not exist; allowed: a new "
                                                  r"directory inside an existing one"),
            ("--save-dense", tmp_path / "no" / "dense", r"--save-dense .* parent directory")):
        paths = {"--output": tmp_path / "out", "--save-dense": tmp_path / "dense", flag: path}
        with pytest.raises(ValueError, match=match):
            refuse_existing_outputs(argparse.Namespace(output=paths["--output"],
                                                       save_dense=paths["--save-dense"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


QWEN3_CONFIG = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=64,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=128, max_position_embeddings=128,
                    rms_norm_eps=1e-6, hidden_act="silu")


@pytest.mark.parametrize("text,match", [
    (json.dumps({k: v for k, v in QWEN3_CONFIG.items() if k != "intermediate_size"}),
     r"config.json has no 'intermediate_size'; allowed: a Qwen3 config.json"),
    (json.dumps(dict(QWEN3_CONFIG, rope_scaling=[1])),
     r"config.json: rope_scaling \[1\]; allowed: a JSON object"),
    ("[1, 2]", r"config.json holds a JSON list; allowed: a JSON object"),
    ("{", r"config.json is not valid JSON"),
    ("\udcff", r"config.json is not valid JSON"),
])
def test_malformed_hugging_face_config_is_refused_naming_file_and_key(tmp_path, text, match):
    from megatron_null_moe.upcycle.huggingface import qwen3_architecture, read_config

    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=rf"--hf-model {tmp_path}: {match}"):
        qwen3_architecture(tmp_path, read_config(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    assert qwen3_architecture(tmp_path, read_config(tmp_path)).ffn_hidden_size == 128


@pytest.mark.parametrize("text,match", [
    ("{}", r"model.safetensors.index.json has no 'weight_map' .*got None"),
    ('{"weight_map": []}', r"model.safetensors.index.json has no 'weight_map'"),
    ('{"weight_map": {"a": 1}}', r"model.safetensors.index.json has no 'weight_map'"),
    ('{"weight_map": ', r"model.safetensors.index.json is not valid JSON"),
    ('"weight_map"', r"model.safetensors.index.json holds a JSON str"),
])
def test_malformed_safetensors_index_is_refused_naming_the_file(tmp_path, text, match):
    from megatron_null_moe.upcycle.huggingface import SafetensorsReader

    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=rf"--hf-model {tmp_path}: {match}"):
        SafetensorsReader(tmp_path)


def test_failed_write_leaves_nothing(parallel_state, qwen3, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(dist_checkpointing, "save", fail)
    output = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        upcycle(arguments("--hf-model", qwen3, "--output", output, "--num-experts", "4"))
    assert _nothing_written(output)


def test_save_dense_is_written_with_the_moe_checkpoint_or_not_at_all(parallel_state, qwen3,
                                                                     tmp_path, monkeypatch):
    """The dense checkpoint is saved first; when the MoE save then fails, neither remains
    (a rerun is not refused for a leftover dense directory)."""
    from megatron.core import dist_checkpointing

    save, saves = dist_checkpointing.save, []

    def second_fails(*args, **kwargs):
        saves.append(args[1])
        if len(saves) == 2:
            raise OSError("disk full (simulated)")
        return save(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", second_fails)
    output, dense = tmp_path / "out", tmp_path / "dense"
    with pytest.raises(OSError, match="simulated"):
        upcycle(arguments("--hf-model", qwen3, "--output", output, "--num-experts", "4",
                          "--save-dense", dense))
    assert len(saves) == 2 and ".dense.partial" in saves[0]
    assert _nothing_written(output) and _nothing_written(dense)


def test_save_dense_must_be_another_directory_than_output(tmp_path):
    from megatron_null_moe.upcycle.__main__ import refuse_existing_outputs

    (tmp_path / "link").symlink_to(tmp_path)
    for dense in (tmp_path / "out", tmp_path / "link" / "out"):
        with pytest.raises(ValueError, match=r"--save-dense .*out is --output .*out; allowed: "
                                             r"another new directory"):
            refuse_existing_outputs(argparse.Namespace(output=tmp_path / "out",
                                                       save_dense=dense))


def test_command_line_reports_start_and_refuses_with_exit_code(qwen3, tmp_path):
    command = [sys.executable, "-m", "megatron_null_moe.upcycle", "--hf-model", str(qwen3),
               "--num-experts", "6", "--granularity", "4", "--output", str(tmp_path / "bad")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 2
    assert "error: --num-experts 6 is not a multiple of --granularity 4" in result.stderr
    assert _nothing_written(tmp_path / "bad")


def _train(upcycled: Path, load: Path, save: Path, log_dir: Path, *extra, nproc=1,
           program=("-m", "megatron_null_moe.pretrain_gpt")) -> str:
    """The entry point on the upcycled checkpoint, as the example script runs it (budget
    controller on): --pretrained-checkpoint is where a fresh run starts (iteration 0, new
    optimizer), --load/--save where it resumes."""
    model = (upcycled / "megatron_args.txt").read_text().split()
    flags = [*model, "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size",
             "4", "--moe-token-dispatcher-type", "alltoall", "--moe-null-balance-scope",
             "global", "--moe-aux-loss-coeff", "2e-2", "--moe-z-loss-coeff", "1e-3",
             "--transformer-impl", "local", "--no-persist-layer-norm",
             "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--mock-data",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--lr", "1e-3",
             "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
             "--ckpt-format", "torch_dist", "--seed", "1", "--train-iters", "4",
             "--moe-null-budget-controller",
             "--pretrained-checkpoint", str(upcycled), "--load", str(load), "--save", str(save),
             "--save-interval", "2", "--tensorboard-dir", str(log_dir / "tb"), *extra]
    module = [*program, *flags]
    launcher = [] if nproc == 1 and program[0] == "-m" else [
        "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
        str(free_port())]
    # Megatron warms its fused SwiGLU up with torch.compile at start-up, ~20 s of inductor
    # work on this CPU; eager is the same math.
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, *launcher, *module], capture_output=True,
                            text=True, timeout=600, env=environment)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _train_save_resume(tmp_path: Path, upcycled: Path, *parallel, nproc=1) -> dict:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    output = _train(upcycled, straight / "ckpt", straight / "ckpt", straight, *parallel,
                    nproc=nproc)
    assert f"finetune with checkpoint in {upcycled}" in output
    _train(upcycled, straight / "ckpt", resumed / "ckpt", resumed, "--ckpt-step", "2",
           *parallel, nproc=nproc)
    first, second = scalars(straight), scalars(resumed)
    assert sorted(second["lm loss"]) == [3, 4]
    for tag in ("lm loss", "null real fraction", "null zero-real tokens"):
        for step in (3, 4):
            assert second[tag][step] == pytest.approx(first[tag][step], rel=1e-5, abs=1e-7), (
                tag, step)
    return first


@pytest.fixture(scope="module")
def upcycled_qwen3(qwen3, tmp_path_factory):
    """The paper's recipe at toy size, through the command line."""
    output = tmp_path_factory.mktemp("upcycled") / "moe"
    command = [sys.executable, "-m", "megatron_null_moe.upcycle", "--hf-model", str(qwen3),
               "--output", str(output), *PAPER_LIKE]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initial real fraction on proxy inputs (target 0.5)" in result.stdout
    return output


def test_trains_from_upcycled_qwen3_saves_and_resumes_exactly(tmp_path, upcycled_qwen3):
    """One process. The realised real fraction of the first steps is where upcycle.json
    says it starts (rho = 0.5 on proxy inputs, through the calibrated null selection bias),
    not where the null row alone would start it (1.0); the controller keeps it there."""
    tensorboard = _train_save_resume(tmp_path, upcycled_qwen3)
    starts = json.loads((upcycled_qwen3 / "upcycle.json").read_text())["router_start"]
    assert [s["real_fraction_with_offset"] for s in starts] == [0.5, 0.5]
    assert [s["real_fraction_without_offset"] for s in starts] == [1.0, 1.0]
    for step in (1, 2, 3, 4):
        assert tensorboard["null real fraction"][step] == pytest.approx(0.5, abs=0.1), step


def test_plain_load_of_the_upcycled_checkpoint_trains_on_either_expert_path(tmp_path,
                                                                           upcycled_qwen3):
    """--load <upcycled> alone (Megatron's check of the checkpoint's args runs): a release
    checkpoint starts at iteration 0 with a fresh optimizer. The lean expert path loads the
    same expert weights: its first-step loss is the Megatron path's."""
    losses = {}
    for path in ("megatron", "lean"):
        run = tmp_path / path
        output = _train(upcycled_qwen3, upcycled_qwen3, run / "ckpt", run,
                        "--train-iters", "1", "--save-interval", "100",
                        "--moe-null-expert-path", path)
        assert f"loading release distributed checkpoint from {upcycled_qwen3}" in output
        assert "attempting to finetune" not in output
        assert "iteration        1/       1" in output
        assert f"; expert path {path}; dispatcher alltoall" in output
        losses[path] = scalars(run)["lm loss"][1]
    assert losses["lean"] == pytest.approx(losses["megatron"], rel=1e-5)


def test_patched_megatron_lm_script_trains_from_the_upcycled_checkpoint(tmp_path,
                                                                        upcycled_qwen3):
    """With MEGATRON_LM_REPO set (as in test_patches): Megatron-LM core_v0.19.0's own
    pretrain_gpt.py with the patch starts from the upcycled checkpoint the same way."""
    from test_patches import _megatron_lm_git_dir, _patched_scripts

    work = _patched_scripts(_megatron_lm_git_dir(), tmp_path)
    output = _train(upcycled_qwen3, tmp_path / "ckpt", tmp_path / "ckpt", tmp_path,
                    "--train-iters", "2", program=(str(work / "pretrain_gpt.py"),))
    assert f"finetune with checkpoint in {upcycled_qwen3}" in output
    real = scalars(tmp_path)["null real fraction"]
    assert real[1] == pytest.approx(0.5, abs=0.1)


@pytest.mark.world_size(2)
def test_trains_from_upcycled_qwen3_with_expert_parallel_two_ranks(tmp_path, upcycled_qwen3):
    _train_save_resume(tmp_path, upcycled_qwen3, "--expert-model-parallel-size", "2",
                       "--distributed-backend", "gloo", nproc=2)


QWEN3_06B = dict(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                 num_query_groups=8, kv_channels=128, vocab_size=151936,
                 max_position_embeddings=40960, rotary_base=1e6, norm_epsilon=1e-6,
                 tie_embeddings=True)


def _documented_command(start: str) -> list:
    """docs/upcycling.md's command that starts with ``start`` (continued lines joined), as
    words."""
    import shlex

    page = Path(__file__).parents[1] / "docs" / "upcycling.md"
    text = page.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.strip().startswith(start)]
    return shlex.split(line)


def test_documented_paper_setting_is_valid_for_qwen3_06b():
    """The upcycle command of docs/upcycling.md, parsed as written, on Qwen3-0.6B's
    architecture: 64 experts of width 768 (3072 / 4), M = 64 null copies, top-8, a 3072-wide
    shared expert."""
    from megatron_null_moe.upcycle.__main__ import settings_from_args

    words = _documented_command("python -m megatron_null_moe.upcycle")
    args = build_parser().parse_args(words[3:])
    moe = settings_from_args(args).moe_shape(DenseArchitecture(**QWEN3_06B))
    assert (moe.num_experts, moe.expert_ffn_hidden_size, moe.topk) == (64, 768, 8)
    assert moe.null_config.null_copies_for(64) == 64
    assert moe.shared_expert_ffn_hidden_size == 3072
    assert (args.reinit_fraction, args.dtype, args.granularity) == (0.3, "bf16", 4)


def test_example_launch_script_arguments_parse_on_megatron(upcycled_qwen3):
    """examples/train_upcycled_qwen3_null.sh (DRY_RUN) on the tiny upcycled checkpoint: every
    argument is one Megatron's parser and the plugin's flags accept, null experts on."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_null_moe.arguments import add_null_expert_args, null_expert_config_from_args

    script = Path(__file__).parents[1] / "examples" / "train_upcycled_qwen3_null.sh"
    environment = {k: v for k, v in os.environ.items() if k not in ("TP", "PP", "EP")}
    environment.update(DRY_RUN="1", UPCYCLED=str(upcycled_qwen3), MOCK_DATA="1")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                            env=environment)
    assert result.returncode == 0, result.stderr
    parser = add_null_expert_args(add_megatron_arguments(argparse.ArgumentParser(
        allow_abbrev=False)))
    args = parser.parse_args(result.stdout.splitlines())
    assert args.pretrained_checkpoint == str(upcycled_qwen3)
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (4, 64, 2)
    assert args.moe_shared_expert_intermediate_size == 128 and args.qk_layernorm
    assert null_expert_config_from_args(args).null_copies_for(4) == 4
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                             env={**environment, "UPCYCLED": str(upcycled_qwen3.parent)})
    assert missing.returncode != 0 and "Set UPCYCLED" in missing.stderr
