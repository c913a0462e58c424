"""The check of the saved expert path when Megatron loads a checkpoint (training_hooks)."""

from types import SimpleNamespace

import pytest

import megatron.training.checkpointing as checkpointing

from megatron_null_moe.training_hooks import (
    null_expert_checkpoint_load,
    null_expert_training,
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
