"""null_expert_training(): Megatron's loop hooked once, and restored after."""

import megatron.training.training as training
import pytest

from megatron_null_moe.training_hooks import null_expert_training


def test_entered_twice_is_refused_clearly_and_leaves_the_hooks_as_they_were():
    """A wrapper around the entry point or the patched pretrain_gpt.py (which enter it
    themselves) would hook Megatron's loop twice; that fails at once, naming the cause."""
    original = training.train_step
    with null_expert_training(on_cpu=False):
        hooked = training.train_step
        with pytest.raises(RuntimeError, match=r"null_expert_training\(\) is already active.*"
                                               "Enter it once"):
            with null_expert_training(on_cpu=False):
                pass
        assert training.train_step is hooked
    assert training.train_step is original
    with null_expert_training(on_cpu=False):  # entered again after it was left: fine
        assert training.train_step is not original
