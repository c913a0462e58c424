"""Pretrain a GPT with null experts on Megatron's own training loop.

    torchrun --nproc-per-node 8 -m megatron_null_moe.pretrain_gpt <Megatron GPT args> \
        --moe-null-expert-rho 0.5

Megatron's ``pretrain`` with the model's layer spec passed through ``with_null_experts``;
arguments, data (``--mock-data``, indexed datasets, any Megatron tokenizer), checkpointing
and logging are Megatron's. Without CUDA it runs through the package's CPU harness (gloo).
"""

import functools
import re
import sys
from typing import Optional

import torch

from megatron_null_moe.config import NullExpertConfig, validate_for_transformer_config
from megatron_null_moe.spec import with_null_experts


def null_expert_layer_spec(model_config, vp_stage: Optional[int] = None, *,
                           null_config: NullExpertConfig):
    """Megatron's default GPT layer spec for ``model_config``, with null experts.

    Set as ``GPTModelConfig.transformer_layer_spec`` (a callable of the config and vp_stage).
    """
    from megatron.training.models.gpt import default_layer_spec

    return with_null_experts(default_layer_spec(model_config, vp_stage), null_config)


def build_model_config(args):
    """GPTModelConfig from Megatron's args, its layer spec made null-expert when asked."""
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_null_moe.arguments import null_expert_config_from_args

    null_config = null_expert_config_from_args(args)
    model_config = gpt_config_from_args(args)
    if null_config is not None:
        # Refuse unsupported router options now, not when the first layer is built.
        validate_for_transformer_config(null_config, model_config.transformer)
        if args.spec is not None:
            base = model_config.transformer_layer_spec
            model_config.transformer_layer_spec = with_null_experts(base, null_config)
        else:
            model_config.transformer_layer_spec = functools.partial(
                null_expert_layer_spec, null_config=null_config
            )
    return model_config, null_config


def extra_args_provider(parser):
    """The plugin's flags; also makes Megatron's --help printable."""
    from megatron_null_moe.arguments import add_null_expert_args

    for action in parser._actions:
        if action.help:
            # megatron-core 0.19.2 has a help text with a bare '%' ("= 10%)") that makes
            # argparse's --help crash.
            action.help = re.sub(r"%%|%\(|%", lambda m: m[0] if len(m[0]) == 2 else "%%",
                                 action.help)
    return add_null_expert_args(parser)


def parse_arguments(argv=None):
    """Megatron's parse and validate, with the plugin's flags (argv: without the program)."""
    from megatron.training.arguments import parse_and_validate_args

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return parse_and_validate_args(
        extra_args_provider=extra_args_provider,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )


def main(argv=None) -> None:
    from megatron_null_moe.training_hooks import null_expert_training, single_process_environment

    single_process_environment()
    on_cpu = not torch.cuda.is_available()
    with null_expert_training(on_cpu=on_cpu) as monitor:
        from megatron.core.enums import ModelType
        from megatron.training import pretrain
        from megatron.training.argument_utils import pretrain_cfg_container_from_args

        from megatron_null_moe import gpt_step

        args = parse_arguments(argv)
        gpt_step.refuse_unsupported(args)
        if on_cpu and args.distributed_backend != "gloo":
            print(f"> megatron_null_moe: --distributed-backend {args.distributed_backend} needs "
                  "CUDA; using gloo", flush=True)
            args.distributed_backend = "gloo"
        model_config, null_config = build_model_config(args)
        if args.num_experts:
            rho = null_config.pool_real_fraction(args.num_experts) if null_config else 1.0
            monitor.expected_real_experts = rho * args.moe_router_topk

        def forward_step(data_iterator, model):
            monitor.watch(model)
            return gpt_step.forward_step(data_iterator, model)

        gpt_step.train_valid_test_datasets_provider.is_distributed = True
        pretrain(
            pretrain_cfg_container_from_args(args, model_config),
            gpt_step.train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            forward_step,
        )


if __name__ == "__main__":
    main()
