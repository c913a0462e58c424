"""Rank body for the upcycle tests (module level, so spawn can pickle it)."""

import dataclasses

import torch

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state
from megatron_null_moe.upcycle.architecture import checkpoint_args, transformer_config
from megatron_null_moe.upcycle.checkpoint import CONTENT_METADATA, TRACKER


def resave_dense_checkpoints(rank, world_size, dense, source, layouts):
    """resave_dense_checkpoint for each (tensor_parallel, pipeline_parallel, target) in turn
    (one spawn of the ranks for all)."""
    for tensor_parallel, pipeline_parallel, target in layouts:
        resave_dense_checkpoint(rank, world_size, dense, source, target, tensor_parallel,
                                pipeline_parallel)


def resave_dense_checkpoint(rank, world_size, dense, source, target, tensor_parallel,
                            pipeline_parallel):
    """Load the TP=1 dense checkpoint ``source`` into a TP x PP GPTModel and save it to
    ``target`` as Megatron's training loop would at that TP/PP (iteration 7)."""
    init_cpu_parallel_state(tensor_model_parallel_size=tensor_parallel,
                            pipeline_model_parallel_size=pipeline_parallel)
    try:
        config = dataclasses.replace(transformer_config(dense),
                                     tensor_model_parallel_size=tensor_parallel,
                                     pipeline_model_parallel_size=pipeline_parallel,
                                     pipeline_dtype=torch.float32)
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=dense.qk_layernorm,
                                                            normalization=dense.normalization),
            vocab_size=dense.vocab_size, max_sequence_length=dense.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            position_embedding_type="rope", rotary_base=dense.rotary_base,
            share_embeddings_and_output_weights=dense.tie_embeddings)
        metadata = dict(CONTENT_METADATA,
                        dp_cp_group=parallel_state.get_data_parallel_group(
                            with_context_parallel=True))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=metadata)},
                                         f"{source}/release")
        model.load_state_dict(loaded["model"], strict=False)
        args = checkpoint_args(dense)
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size = \
            tensor_parallel, pipeline_parallel
        args.world_size = world_size
        state = {"model": model.sharded_state_dict(metadata=metadata), "args": args,
                 "checkpoint_version": 3.0, "iteration": 7}
        if rank == 0:
            (target / "iter_0000007").mkdir(parents=True)
        torch.distributed.barrier()  # the directory exists before any rank writes
        dist_checkpointing.save(state, str(target / "iter_0000007"),
                                content_metadata=CONTENT_METADATA)
        if rank == 0:
            (target / TRACKER).write_text("7")
    finally:
        destroy_cpu_parallel_state()
