"""examples/*.sh: each recipe's Megatron arguments parse on megatron-core's own parser plus the
plugin's flags (unknown flags are errors), give the intended null-expert configuration, and
fit the parallel layout of the GPUs the recipe assumes.

The scripts print their argument list with DRY_RUN=1; a fake ``torchrun`` on PATH checks that
the same list is what they launch. Megatron's cross-rank validation (validate_args) is not run.
"""

import argparse
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron.training.arguments import add_megatron_arguments

from megatron_null_moe.arguments import add_null_expert_args, null_expert_config_from_args
from megatron_null_moe.config import validate_for_transformer_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "pretrain_1gpu_quickstart.sh"
QWEN = ROOT / "examples" / "pretrain_qwen3_30b_a3b_null.sh"
# Variables the scripts read; cleared so the defaults are what is tested.
SCRIPT_VARIABLES = ("GPUS", "GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "TP", "PP", "EP", "RHO", "FP8", "DTYPE", "TRAIN_ITERS", "MICRO_BATCH_SIZE",
                    "GLOBAL_BATCH_SIZE", "SEQ_LENGTH", "VOCAB_SIZE", "TRANSFORMER_IMPL", "LR",
                    "MIN_LR", "DATA_PATH", "MOCK_DATA", "TOKENIZER_TYPE", "TOKENIZER_MODEL",
                    "CHECKPOINT_DIR", "TENSORBOARD_DIR", "DRY_RUN", "CUDA_DEVICE_MAX_CONNECTIONS",
                    "EXPERT_PATH")
QWEN_DATA = {"DATA_PATH": "/data/corpus_text_document"}


def run_script(script: Path, *extra: str, path_prefix: str = "", **variables):
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}
    env.update(variables)
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(script), *extra], env=env, capture_output=True,
                          text=True, timeout=30)


def dry_run(script: Path, *extra: str, **variables) -> list:
    result = run_script(script, *extra, DRY_RUN="1", **variables)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def parser():
    return add_null_expert_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def parse(parser, argv):
    """Megatron's parser plus the plugin's flags; unknown or malformed flags fail the test."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"Megatron's parser refused the arguments: {argv}")


def check_layout(args, world_size: int):
    """The GPU grid Megatron will build: TP x CP x PP divides the world, EP divides DP x CP x TP
    (experts spread over data-parallel ranks), EP*TP*PP divides the GPUs, experts split evenly."""
    tp, pp, ep = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.expert_model_parallel_size)
    etp = args.expert_tensor_parallel_size or tp
    cp = args.context_parallel_size
    assert world_size % (ep * tp * pp) == 0, (world_size, ep, tp, pp)
    assert world_size % (tp * cp * pp) == 0
    data_parallel = world_size // (tp * cp * pp)
    assert (data_parallel * cp * tp) % (ep * etp) == 0
    assert args.num_experts % ep == 0, (args.num_experts, ep)
    assert args.num_layers % pp == 0
    assert args.global_batch_size % (args.micro_batch_size * data_parallel) == 0
    assert tp == 1 or args.sequence_parallel, "TP > 1 without --sequence-parallel"


def check_router_options(args):
    """The plugin's build-time refusals (router options null experts cannot honour)."""
    fields = ("moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
              "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
              "moe_router_fusion", "moe_enable_routing_replay", "moe_router_force_biased",
              "moe_router_load_balancing_type", "moe_pad_expert_input_to_capacity",
              "moe_token_dispatcher_type")
    config = SimpleNamespace(num_moe_experts=args.num_experts,
                             **{field: getattr(args, field) for field in fields})
    null_config = null_expert_config_from_args(args)
    return validate_for_transformer_config(null_config, config)


@pytest.mark.parametrize("script, variables", [(QUICKSTART, {}), (QWEN, QWEN_DATA)])
def test_dry_run_is_what_torchrun_gets(script, variables, tmp_path):
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    launched = run_script(script, "--seed", "7", path_prefix=str(tmp_path), **variables)
    assert launched.returncode == 0, launched.stderr
    words = launched.stdout.splitlines()
    module = words.index("-m")
    assert words[module + 1] == "megatron_null_moe.pretrain_gpt"
    assert words[module + 2:] == dry_run(script, **variables) + ["--seed", "7"]
    launcher = words[:module]
    assert launcher[launcher.index("--nproc-per-node") + 1] == ("1" if script == QUICKSTART
                                                               else "8")
    if script == QWEN:
        for flag, value in (("--nnodes", "4"), ("--node-rank", "0"), ("--master-port", "6000")):
            assert launcher[launcher.index(flag) + 1] == value


def test_quickstart_parses_with_null_experts(parser):
    argv = dry_run(QUICKSTART)
    args = parse(parser, argv)
    null_config = null_expert_config_from_args(args)
    assert null_config.real_fraction == 0.5 and null_config.budget_control_rate == 1.0
    assert (args.num_experts, args.moe_router_topk) == (8, 4)
    assert null_config.null_copies_for(args.num_experts) == 8      # M = N(1-rho)/rho
    assert args.moe_router_load_balancing_type == "global_aux_loss"
    assert (args.moe_aux_loss_coeff, args.moe_z_loss_coeff) == ([2e-2], 1e-3)  # coeff: nargs="+"
    assert args.moe_token_dispatcher_type == "alltoall"
    assert args.mock_data and args.tokenizer_type == "NullTokenizer" and args.vocab_size
    assert args.bf16 and not args.add_bias_linear
    assert args.save == args.load and args.tensorboard_dir and args.train_iters
    assert check_router_options(args) == 8
    check_layout(args, world_size=1)


def test_quickstart_environment_overrides(parser):
    args = parse(parser, dry_run(QUICKSTART, "--train-iters", "3", GPUS="2", EP="2",
                                 RHO="0.25", DTYPE="fp32", CHECKPOINT_DIR="/tmp/ckpt"))
    assert args.expert_model_parallel_size == 2 and args.train_iters == 3
    assert not args.bf16 and args.save == args.load == "/tmp/ckpt"
    assert null_expert_config_from_args(args).null_copies_for(args.num_experts) == 24
    check_layout(args, world_size=2)


def test_qwen3_30b_a3b_recipe(parser):
    args = parse(parser, dry_run(QWEN, **QWEN_DATA))
    shape = (args.num_layers, args.hidden_size, args.num_attention_heads,
             args.num_query_groups, args.kv_channels)
    assert shape == (48, 2048, 32, 4, 128) and args.group_query_attention
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (128, 8, 768)
    assert args.swiglu and args.qk_layernorm and args.untie_embeddings_and_output_weights
    assert args.normalization == "RMSNorm" and args.position_embedding_type == "rope"
    assert args.seq_length == 4096 and args.bf16 and not args.add_bias_linear
    assert args.moe_grouped_gemm and args.moe_token_dispatcher_type == "alltoall"
    assert args.moe_router_dtype == "fp32" and args.use_distributed_optimizer
    assert args.ckpt_format == "torch_dist" and args.save == args.load
    assert args.data_path == ["/data/corpus_text_document"]
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.tokenizer_model == "Qwen/Qwen3-30B-A3B"
    null_config = null_expert_config_from_args(args)
    assert null_config.real_fraction == 0.5 and null_config.budget_control_rate == 1.0
    assert null_config.null_copies_for(args.num_experts) == 128
    assert args.moe_router_load_balancing_type == "global_aux_loss"
    assert args.expert_model_parallel_size == 8 and args.fp8 is None
    assert check_router_options(args) == 128
    check_layout(args, world_size=4 * 8)                            # default NNODES=4 x 8 GPUs


@pytest.mark.parametrize("variables, world_size", [
    ({"NNODES": "8"}, 64),
    ({"TP": "2", "PP": "2"}, 32),
    ({"FP8": "1"}, 32),
])
def test_qwen3_30b_a3b_recipe_variants(parser, variables, world_size):
    args = parse(parser, dry_run(QWEN, **QWEN_DATA, **variables))
    check_layout(args, world_size)
    if variables.get("FP8"):
        assert (args.fp8, args.fp8_recipe) == ("hybrid", "tensorwise")
        assert args.moe_router_padding_for_quantization
    assert check_router_options(args) == 128


def test_qwen3_recipe_weighted_blend_and_missing_data(parser):
    args = parse(parser, dry_run(QWEN, DATA_PATH="0.7 /data/a_text_document 0.3 /data/b"))
    assert args.data_path == ["0.7", "/data/a_text_document", "0.3", "/data/b"]
    assert parse(parser, dry_run(QWEN, MOCK_DATA="1")).mock_data
    placeholder = run_script(QWEN, DRY_RUN="1")  # the arguments, a placeholder for the data
    assert placeholder.returncode == 0, placeholder.stderr
    assert parse(parser, placeholder.stdout.splitlines()).data_path == ["<DATA_PATH>"]
    assert "DATA_PATH is not set: <DATA_PATH> stands in for it" in placeholder.stderr
    missing = run_script(QWEN)  # a launch without data stops before torchrun
    assert missing.returncode != 0 and "Set DATA_PATH" in missing.stderr


def transformer_config(args):
    """Megatron's TransformerConfig of the parsed arguments (its own checks run; the dtype is
    what validate_args would set)."""
    import torch
    from megatron.training.argument_utils import core_transformer_config_from_args

    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float32
    # Checked against Transformer Engine, which the GPU image has and this machine has not:
    # rope fusion, and the FP8 settings (set after Megatron's checks instead).
    args.apply_rope_fusion = False
    fp8 = {name: getattr(args, name) for name in ("fp8", "moe_router_padding_for_quantization")}
    args.fp8, args.moe_router_padding_for_quantization = None, False
    config = core_transformer_config_from_args(args)
    for name, value in fp8.items():
        setattr(config, name, value)
        setattr(args, name, value)
    return config


@pytest.mark.parametrize("fp8", ["0", "1"])
@pytest.mark.parametrize("expert_path", ["megatron", "lean"])
def test_qwen3_recipe_on_either_expert_path(parser, expert_path, fp8):
    """EXPERT_PATH switches the experts; both recompute the expert activation; the FP8 padding
    flag is Megatron's experts' alone, and the lean path takes the whole recipe."""
    from megatron_null_moe.arguments import null_expert_path_from_args
    from megatron_null_moe.lean.support import validate_lean_layer

    args = parse(parser, dry_run(QWEN, **QWEN_DATA, EXPERT_PATH=expert_path, FP8=fp8))
    assert null_expert_path_from_args(args) == expert_path
    assert args.recompute_granularity == "selective" and args.recompute_modules == ["moe_act"]
    assert args.moe_router_padding_for_quantization == (expert_path == "megatron" and fp8 == "1")
    assert (args.fp8 == "hybrid") == (fp8 == "1")
    config = transformer_config(args)
    validate_for_transformer_config(null_expert_config_from_args(args), config)
    if expert_path == "lean":
        validate_lean_layer(config, on_cuda=True)
    bad = run_script(QWEN, DRY_RUN="1", EXPERT_PATH="sequential", **QWEN_DATA)
    assert bad.returncode != 0 and "EXPERT_PATH must be megatron or lean" in bad.stderr


def test_unknown_flag_fails_the_parse(parser):
    with pytest.raises(pytest.fail.Exception):
        parse(parser, dry_run(QUICKSTART, "--moe-null-expert-rhoo", "0.5"))
