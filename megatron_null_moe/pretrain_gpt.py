"""Pretrain a GPT with null experts on Megatron's own training loop.

    torchrun --nproc-per-node 8 -m megatron_null_moe.pretrain_gpt <Megatron GPT args> \
        --moe-null-expert-rho 0.5 --moe-null-budget-controller

Megatron's ``pretrain`` with the model's layer spec passed through ``with_null_experts``;
arguments, data (``--mock-data``, indexed datasets, any Megatron tokenizer), checkpointing
and logging are Megatron's. Without CUDA it runs through the package's CPU harness (gloo).
The patched Megatron-LM ``pretrain_gpt.py`` (patches/) uses the same pieces.
"""

import functools
import sys
from typing import Optional

from megatron_null_moe.cli import quiet_if_command

quiet_if_command(__name__)  # before Megatron is imported: its notices fire at import

from megatron_null_moe.config import (  # noqa: E402
    NullExpertConfig,
    validate_for_transformer_config,
)
from megatron_null_moe.lean.support import validate_lean_layer  # noqa: E402
from megatron_null_moe.spec import with_null_experts  # noqa: E402

PROG = "megatron_null_moe.pretrain_gpt"


def null_expert_layer_spec(model_config, vp_stage: Optional[int] = None, *,
                           null_config: NullExpertConfig, expert_path: str = "megatron"):
    """Megatron's default GPT layer spec for ``model_config``, with null experts.

    Set as ``GPTModelConfig.transformer_layer_spec`` (a callable of the config and vp_stage).
    """
    from megatron.training.models.gpt import default_layer_spec

    return with_null_experts(default_layer_spec(model_config, vp_stage), null_config,
                             expert_path=expert_path)


def apply_null_expert_spec(model_config, null_config: Optional[NullExpertConfig],
                           custom_spec: bool, expert_path: str = "megatron") -> None:
    """Make ``model_config``'s (a GPTModelConfig) layer spec null-expert, when asked.

    custom_spec: the user gave ``--spec``, whose spec is wrapped; otherwise Megatron's
    default spec is built through ``null_expert_layer_spec``. expert_path: see
    ``with_null_experts`` (``--moe-null-expert-path``).
    """
    if null_config is None:
        return
    # Refuse unsupported router (and lean-path) options now, not when the first layer is built.
    validate_for_transformer_config(null_config, model_config.transformer)
    if expert_path == "lean":
        validate_lean_layer(model_config.transformer)
    if custom_spec:
        model_config.transformer_layer_spec = with_null_experts(
            model_config.transformer_layer_spec, null_config, expert_path=expert_path)
    else:
        model_config.transformer_layer_spec = functools.partial(
            null_expert_layer_spec, null_config=null_config, expert_path=expert_path)


def add_entry_point_args(parser):
    """The plugin's flags on Megatron's parser, with this entry point's name and refusals."""
    from megatron_null_moe import gpt_step
    from megatron_null_moe.arguments import add_null_expert_args

    parser.prog = PROG
    return add_null_expert_args(parser, refuse=gpt_step.refuse_unsupported)


def parse_arguments(argv=None):
    """Megatron's parse and validate, with the plugin's flags (argv: without the program)."""
    from megatron.training.arguments import parse_and_validate_args

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return parse_and_validate_args(
        extra_args_provider=add_entry_point_args,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )


def main(argv=None) -> None:
    from megatron_null_moe.cli import refusals_as_errors
    from megatron_null_moe.process_groups import is_rank_zero
    from megatron_null_moe.training_hooks import (
        CheckpointRefusal,
        null_expert_training,
        single_process_environment,
    )

    single_process_environment()
    with null_expert_training() as monitor:
        from megatron.core.enums import ModelType
        from megatron.training import pretrain
        from megatron.training.argument_utils import (
            gpt_config_from_args,
            pretrain_cfg_container_from_args,
        )

        from megatron_null_moe import gpt_step
        from megatron_null_moe.arguments import null_expert_path_from_args

        # The plugin's flags and this entry point's refusals are checked as they are parsed.
        args = parse_arguments(argv)
        # Refusals of the Megatron options the flags contradict: one line, before any model.
        with refusals_as_errors(PROG, speaks=is_rank_zero()):
            null_config = monitor.configure(args)
            model_config = gpt_config_from_args(args)
            apply_null_expert_spec(model_config, null_config, custom_spec=args.spec is not None,
                                   expert_path=null_expert_path_from_args(args))
        gpt_step.train_valid_test_datasets_provider.is_distributed = True
        # Refusals of what --load holds come while Megatron loads it: one line too.
        with refusals_as_errors(PROG, speaks=is_rank_zero(), refusal=CheckpointRefusal):
            pretrain(
                pretrain_cfg_container_from_args(args, model_config),
                gpt_step.train_valid_test_datasets_provider,
                ModelType.encoder_or_decoder,
                gpt_step.forward_step,
            )


if __name__ == "__main__":
    main()
