"""Launch flags: parsed on Megatron's parser; bad combinations fail naming the flags."""

import argparse
import logging

import pytest

from megatron.training.arguments import add_megatron_arguments

from megatron_null_moe.arguments import null_expert_config_from_args
from megatron_null_moe.pretrain_gpt import extra_args_provider

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
MOE = ["--num-experts", "8", "--moe-router-topk", "4"]


def parse(*argv):
    parser = extra_args_provider(add_megatron_arguments(argparse.ArgumentParser()))
    return parser.parse_args([*BASE, *argv])


def test_flags_off_by_default():
    assert null_expert_config_from_args(parse(*MOE)) is None


def test_rho_gives_config_and_scope_sets_megatron_balancing_type():
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-balance-scope", "global")
    config = null_expert_config_from_args(args)
    assert config.real_fraction == 0.5 and config.null_copies_for(8) == 8
    assert args.moe_router_load_balancing_type == "global_aux_loss"


def test_explicit_null_copies():
    args = parse(*MOE, "--moe-null-expert-rho", "0.3", "--moe-num-null-experts", "18")
    assert null_expert_config_from_args(args).null_copies_for(8) == 18


@pytest.mark.parametrize("argv,message", [
    ((*MOE, "--moe-null-expert-rho", "1.5"), r"--moe-null-expert-rho.*\(0, 1\]"),
    (("--moe-null-expert-rho", "0.5"), "--moe-null-expert-rho needs an MoE model: set --num-experts"),
    ((*MOE, "--moe-null-expert-rho", "0.3"), "not a whole number.*--moe-num-null-experts"),
    ((*MOE, "--moe-num-null-experts", "8"), "need --moe-null-expert-rho"),
    ((*MOE, "--moe-null-balance-scope", "global"), "need --moe-null-expert-rho"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-num-null-experts", "-2"),
     r"\(--moe-num-null-experts\) must be a whole number >= 0"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-balance-scope", "global",
      "--moe-router-load-balancing-type", "seq_aux_loss"),
     "--moe-null-balance-scope=global asks for 'global_aux_loss' but "
     "--moe-router-load-balancing-type is seq_aux_loss"),
])
def test_bad_combinations_fail_naming_the_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        null_expert_config_from_args(parse(*argv))


def test_unknown_scope_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-balance-scope", "batch")
    assert "invalid choice: 'batch'" in capsys.readouterr().err


def test_allgather_warns_that_no_communication_is_saved(caplog):
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-token-dispatcher-type", "allgather")
    with caplog.at_level(logging.WARNING, logger="megatron_null_moe.arguments"):
        null_expert_config_from_args(args)
    assert "save no communication" in caplog.text


def test_help_explains_rho(capsys):
    """Megatron's full --help (its own crashes on a bare '%' in 0.19.2) with the plugin's."""
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "target fraction of each token's --moe-router-topk slots that go to real experts" in text
    assert "in (0, 1]" in text
