"""Forward step, loss and datasets for GPT pretraining on Megatron's loop.

The plain pretraining path of Megatron-LM's ``pretrain_gpt.py`` (not shipped in the
megatron-core wheel): mock or indexed GPT datasets with any Megatron tokenizer (SentencePiece
included), the batch broadcast over TP and split over CP, the masked LM loss. Packed (THD)
sequences, SFT and FIM are not supported here and are refused at start-up.
"""

from functools import partial

import torch

from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, get_timers, print_rank_0
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
# Megatron-LM's pretrain_gpt.py features whose datasets or batches this entry point lacks:
# (flag, args attribute, what it is).
UNSUPPORTED_FEATURES = (
    ("--sft", "sft", "supervised fine-tuning datasets"),
    ("--fim-data", "fim_data", "fill-in-the-middle datasets"),
    ("--dataloader-inter-document-masking", "dataloader_inter_document_masking",
     "packed sequences with per-document attention"),
    ("--hybrid-context-parallel", "hybrid_context_parallel",
     "per-sequence context-parallel batches"),
)


def refuse_unsupported(args) -> None:
    """Fail at start-up on the pretrain_gpt.py features this entry point does not carry."""
    for flag, name, what in UNSUPPORTED_FEATURES:
        if getattr(args, name, False):
            raise ValueError(f"{flag} ({what}) is not carried by this entry point, whose data "
                             "path is plain GPT pretraining; run Megatron-LM's pretrain_gpt.py "
                             "with the plugin's patch (patches/) for it.")
    if getattr(args, "moe_use_upcycling", False):
        # Measured with the megatron-core 0.19.2 wheel: load_and_upcycle_model passes model=
        # to load_checkpoint(ddp_model, ...) (TypeError), and the dense model it builds comes
        # from the already-built MoE model config, so the dense checkpoint cannot load.
        raise ValueError(
            "--moe-use-upcycling is broken in megatron-core 0.19.2's training loop (upcycling "
            "calls load_checkpoint with model= and builds the 'dense' model with experts). "
            "Upcycle the dense checkpoint with 'python -m megatron_null_moe.upcycle' and "
            "start from its output with --pretrained-checkpoint (docs/upcycling.md).")


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch: loaded on TP rank 0, broadcast over TP, split over CP.

    vp_stage: the model chunk's virtual pipeline stage; a chunk that is neither the first nor
    the last stage gets no data iterator (None) and no batch.
    """
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return {key: None for key in BATCH_KEYS}
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = next(data_iterator)
        batch = {key: (value.cuda(non_blocking=True) if torch.is_tensor(value) else value)
                 for key, value in batch.items()}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group()
    )
    return {key: batch.get(key) for key in BATCH_KEYS}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed masked LM loss, its token count, and the report Megatron averages and logs.

    With --check-for-nan-in-loss-and-grad (Megatron's default) a NaN or Inf loss stops the
    run through Megatron's rerun state machine, as in Megatron-LM's pretrain_gpt.py; a
    non-finite router input reaches the loss this way (see routing.route_with_null_experts).
    """
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    if get_args().check_for_nan_in_loss_and_grad:
        rerun_state_machine = get_rerun_state_machine()
        for rejection, message in ((torch.isnan, "found NaN in local forward loss calculation"),
                                   (torch.isinf, "found Inf in local forward loss calculation")):
            rerun_state_machine.validate_result(result=loss, rejection_func=rejection,
                                                message=message, tolerance=0.0, fatal=True)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    # The chunk under its DDP wrapper knows its virtual stage; the wrapper does not.
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    output_tensor = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"],
        labels=batch["labels"], loss_mask=batch["loss_mask"],
    )
    return output_tensor, partial(loss_func, batch["loss_mask"])


def dataset_config_from_args(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")

    def is_built_on_rank():
        return (mpu.get_tensor_model_parallel_rank() == 0
                and is_first_or_last_pipeline_stage(vp_stage))

    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, is_built_on_rank, dataset_config_from_args(args)
    ).build()
