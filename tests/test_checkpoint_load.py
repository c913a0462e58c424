"""The checks of the optimizer state when Megatron loads a checkpoint (training_hooks): the
saved expert path, and the distributed optimizer's state Megatron cannot load."""

from types import SimpleNamespace

import pytest

import megatron.training.checkpointing as checkpointing

from megatron_null_moe.training_hooks import (
    null_expert_checkpoint_load,
    null_expert_training,
    refuse_distributed_optimizer_state_megatron_cannot_load,
    refuse_optimizer_state_across_expert_groups,
    refuse_optimizer_state_across_expert_paths,
)


def _args(path="lean", **overrides):
    values = dict(moe_null_expert_path=path, finetune=False, no_load_optim=False,
                  use_distributed_optimizer=True)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_distributed_optimizer_state_saved_on_the_other_path_is_refused():
    with pytest.raises(ValueError, match=(
            r"--moe-null-expert-path lean: the checkpoint at --load was saved with "
            r"--moe-null-expert-path megatron.*allowed: --moe-null-expert-path megatron, or "
            r"--no-load-optim")):
        refuse_optimizer_state_across_expert_paths(_args("megatron"), _args("lean"), False)


@pytest.mark.parametrize("saved,run,release", [
    (_args("lean"), _args("lean"), False),                        # same path
    (SimpleNamespace(), _args("megatron"), False),                 # no plugin args: megatron
    (_args("megatron"), _args("lean"), True),                      # release: no optimizer
    (_args("megatron"), _args("lean", finetune=True), False),
    (_args("megatron"), _args("lean", no_load_optim=True), False),
    (_args("megatron", no_save_optim=True), _args("lean"), False),
    (_args("megatron"), _args("lean", use_distributed_optimizer=False), False),
])
def test_weights_and_the_plain_optimizers_state_load_across_paths(saved, run, release):
    refuse_optimizer_state_across_expert_paths(saved, run, release)


def test_megatrons_loader_is_wrapped_while_training_and_restored_after():
    original = checkpointing._load_base_checkpoint
    with null_expert_training(on_cpu=False):
        assert checkpointing._load_base_checkpoint is not original
    assert checkpointing._load_base_checkpoint is original

    def load(load_dir, args, rank0=False):
        return {"args": _args("megatron")}, "name", False, None

    with pytest.raises(ValueError, match="does not carry across expert paths"):
        null_expert_checkpoint_load(load)("dir", _args("lean"), rank0=True)
    empty = (None, "", False, None)
    assert null_expert_checkpoint_load(lambda *a, **k: empty)("dir", _args("lean")) == empty


# A checkpoint of EP2 on 8 ranks in Megatron's default distributed-optimizer layout.
SIZES = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
             virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=2,
             expert_tensor_parallel_size=1, ckpt_format="torch_dist",
             dist_ckpt_optim_fully_reshardable=False)


def test_distributed_optimizer_state_refused_without_apex_or_transformer_engine():
    with pytest.raises(ValueError, match=(
            r"--use-distributed-optimizer: without apex or Transformer Engine .* cannot load "
            r"the distributed optimizer's state .*allowed: --no-load-optim")):
        refuse_distributed_optimizer_state_megatron_cannot_load(
            _args("megatron", **SIZES), _args("megatron", **SIZES), False, has_apex_or_te=False)


@pytest.mark.parametrize("flag,name,value", [
    ("--tensor-model-parallel-size", "tensor_model_parallel_size", 2),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size", 2),
    ("--virtual-pipeline-model-parallel-size", "virtual_pipeline_model_parallel_size", 2),
    ("--expert-model-parallel-size", "expert_model_parallel_size", 4),
    ("--expert-tensor-parallel-size", "expert_tensor_parallel_size", 2),
])
def test_default_distributed_optimizer_layout_refused_across_model_parallel_sizes(
        flag, name, value):
    run = _args("megatron", **{**SIZES, name: value})
    with pytest.raises(ValueError, match=(
            rf"'dp_reshardable'.* changes {flag} \S+ -> {value}; allowed: the checkpoint's "
            r"sizes, or --no-load-optim .*--dist-ckpt-optim-fully-reshardable")):
        refuse_distributed_optimizer_state_megatron_cannot_load(
            _args("megatron", **SIZES), run, False, has_apex_or_te=True)


@pytest.mark.parametrize("saved,run,has_apex_or_te", [
    (SIZES, SIZES, True),                                          # data-parallel size only
    ({**SIZES, "dist_ckpt_optim_fully_reshardable": True},
     {**SIZES, "expert_model_parallel_size": 4}, True),             # the reshardable layout
    ({**SIZES, "use_distributed_optimizer": False},
     {**SIZES, "expert_model_parallel_size": 4}, True),             # the default optimizer's
    (SIZES, {**SIZES, "no_load_optim": True, "expert_model_parallel_size": 4}, False),
    (SIZES, {**SIZES, "use_distributed_optimizer": False}, False),
])
def test_distributed_optimizer_state_megatron_can_load(saved, run, has_apex_or_te):
    refuse_distributed_optimizer_state_megatron_cannot_load(
        _args("megatron", **saved), _args("megatron", **run), False, has_apex_or_te)


def _expert_layout(ep, etp=None, tp=1, **overrides):
    values = dict(num_experts=8, expert_model_parallel_size=ep,
                  expert_tensor_parallel_size=etp or tp, tensor_model_parallel_size=tp,
                  use_distributed_optimizer=False)
    return _args("megatron", **{**values, **overrides})


@pytest.mark.parametrize("saved,run", [
    (_expert_layout(4), _expert_layout(1)),                        # EP 4 -> one process
    (_expert_layout(1), _expert_layout(2, tp=2)),                  # one process -> EP 2, TP 2
    (_expert_layout(1, etp=1, tp=2), _expert_layout(1, etp=2, tp=2)),  # expert TP 1 -> = TP
])
def test_optimizer_state_refused_across_expert_groups(saved, run):
    with pytest.raises(ValueError, match=(
            r"the checkpoint at --load was saved with --expert-model-parallel-size .*"
            r"megatron-core 0.19.2 cannot load optimizer state across that change; allowed: "
            r"expert groups on both sides or on neither, or --no-load-optim")):
        refuse_optimizer_state_across_expert_groups(saved, run, False)


@pytest.mark.parametrize("saved,run", [
    (_expert_layout(2), _expert_layout(4)),                        # EP 2 -> EP 4
    (_expert_layout(1), _expert_layout(1, tp=2)),                  # TP changes, no expert groups
    (_expert_layout(4), _expert_layout(1, no_load_optim=True)),
    (_expert_layout(4), _expert_layout(1, finetune=True)),
    (_expert_layout(4), _expert_layout(1, num_experts=None)),
])
def test_optimizer_state_loads_within_expert_groups_or_not_at_all(saved, run):
    refuse_optimizer_state_across_expert_groups(saved, run, False)


def _vocabulary(padded, divisible_by, tensor_parallel, vocab_size=128):
    return SimpleNamespace(padded_vocab_size=padded, make_vocab_size_divisible_by=divisible_by,
                           tensor_model_parallel_size=tensor_parallel, vocab_size=vocab_size)


def test_vocabulary_multiples_keeping_the_rows_follow_megatrons_padding():
    import math

    from megatron_null_moe.training_hooks import vocabulary_multiples_keeping

    for vocab_size, padded, tensor_parallel in ((128, 128, 2), (151669, 151936, 2), (100, 128, 4)):
        keeping = vocabulary_multiples_keeping(padded, vocab_size, tensor_parallel)
        everything = [d for d in range(1, padded + 1)  # Megatron's rule, tried one by one
                      if math.ceil(vocab_size / (d * tensor_parallel)) * d * tensor_parallel
                      == padded]
        assert keeping == everything and keeping, (vocab_size, padded, tensor_parallel)


def test_a_vocabulary_padded_to_other_rows_is_refused_naming_the_value_that_keeps_it():
    from megatron_null_moe.training_hooks import refuse_padded_vocabulary_change

    saved = _vocabulary(128, 128, 1)  # 128 tokens, TP 1: 128 rows
    with pytest.raises(ValueError, match=(
            r"--make-vocab-size-divisible-by 128: the checkpoint at --load has a vocabulary "
            r"of 128 rows .* this run pads it to 256 at --tensor-model-parallel-size 2.*"
            r"allowed: --make-vocab-size-divisible-by 64 \(the largest of the 7 values that "
            r"keep it\)\.$")):
        refuse_padded_vocabulary_change(saved, _vocabulary(256, 128, 2), 128)
    refuse_padded_vocabulary_change(saved, _vocabulary(128, 64, 2), 128)  # the same rows
    refuse_padded_vocabulary_change(SimpleNamespace(), _vocabulary(256, 128, 2), 128)
    odd = _vocabulary(129, 1, 1, vocab_size=129)  # 129 rows cannot split over TP 2
    with pytest.raises(ValueError, match="allowed: no --make-vocab-size-divisible-by pads 129 "
                                         "tokens to 129 rows at --tensor-model-parallel-size 2"):
        refuse_padded_vocabulary_change(odd, _vocabulary(130, 1, 2, vocab_size=129), 129)
