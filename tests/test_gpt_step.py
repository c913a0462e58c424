"""The entry point's loss: Megatron's NaN and Inf checks stop a run whose router input was
not finite (the router turns such a token's MoE output into NaN, see test_layer)."""

from types import SimpleNamespace

import pytest
import torch

from megatron.training.global_vars import set_args

from megatron_null_moe.gpt_step import loss_func


@pytest.fixture
def megatron_args(parallel_state):
    import megatron.training.global_vars as global_vars

    previous = global_vars._GLOBAL_ARGS
    set_args(SimpleNamespace(check_for_nan_in_loss_and_grad=True))
    yield global_vars._GLOBAL_ARGS
    global_vars._GLOBAL_ARGS = previous


@pytest.mark.parametrize("value,message", [(float("nan"), "found NaN in local forward loss"),
                                           (float("inf"), "found Inf in local forward loss")])
def test_non_finite_loss_stops_the_run_with_megatrons_message(megatron_args, value, message):
    losses = torch.ones(2, 4)
    losses[1, 2] = value
    with pytest.raises(RuntimeError, match=message):
        loss_func(torch.ones(2, 4), losses)


def test_finite_loss_and_the_check_switched_off(megatron_args):
    loss, tokens, report = loss_func(torch.ones(2, 4), torch.full((2, 4), 0.5))
    assert float(loss) == 4.0 and int(tokens) == 8
    megatron_args.check_for_nan_in_loss_and_grad = False
    loss, _, _ = loss_func(torch.ones(2, 4), torch.full((2, 4), float("nan")))
    assert torch.isnan(loss)
