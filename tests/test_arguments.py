"""Launch flags: parsed on Megatron's parser; bad combinations fail naming the flags."""

import argparse
import logging
import re

import pytest

from megatron.training.arguments import add_megatron_arguments

from megatron_null_moe.arguments import (
    DISPATCHER_CHOSEN,
    add_null_expert_args,
    null_expert_config_from_args,
    null_expert_path_from_args,
    warn_where_the_flags_lose,
)

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
MOE = ["--num-experts", "8", "--moe-router-topk", "4"]


def parse(*argv):
    parser = add_null_expert_args(add_megatron_arguments(argparse.ArgumentParser()))
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
    ((*MOE, "--moe-null-expert-path", "lean"),
     "--moe-null-expert-path lean needs --moe-null-expert-rho"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-num-null-experts", "-2"),
     r"\(--moe-num-null-experts\) must be a whole number >= 0"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-num-null-experts", "0"),
     r"--moe-num-null-experts=0 contradicts --moe-null-expert-rho=0.5 .*allowed: 8 "),
    ((*MOE, "--moe-null-budget-controller"), "need --moe-null-expert-rho"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-budget-rate", "2"),
     "--moe-null-budget-rate needs --moe-null-budget-controller"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-budget-controller",
      "--moe-null-budget-rate", "0"), "--moe-null-budget-rate.*positive finite"),
    ((*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-balance-scope", "global",
      "--moe-router-load-balancing-type", "seq_aux_loss"),
     "--moe-null-balance-scope=global asks for 'global_aux_loss' but "
     "--moe-router-load-balancing-type is seq_aux_loss"),
])
def test_bad_combinations_fail_naming_the_flags(argv, message, capsys):
    """Refused as the arguments are parsed: one error line and argparse's exit status."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.match(r"\S+: error: ", error), error
    assert re.search(message, error), error
    with pytest.raises(ValueError, match=message):  # the same check on parsed arguments
        null_expert_config_from_args(unchecked_parse(*argv))


def unchecked_parse(*argv):
    """The same parser without the plugin's checks at parse time (argparse's own method)."""
    parser = add_null_expert_args(add_megatron_arguments(argparse.ArgumentParser()))
    args, unknown = argparse.ArgumentParser.parse_known_args(parser, [*BASE, *argv])
    assert not unknown
    return args


def test_dispatcher_defaults_to_alltoall_with_null_experts():
    with_null = parse(*MOE, "--moe-null-expert-rho", "0.5")
    assert with_null.moe_token_dispatcher_type == "alltoall" and getattr(with_null,
                                                                         DISPATCHER_CHOSEN)
    without = parse(*MOE)
    assert without.moe_token_dispatcher_type == "allgather"  # Megatron's default, untouched
    assert not getattr(without, DISPATCHER_CHOSEN)
    for dispatcher in ("allgather", "alltoall", "flex"):
        given = parse(*MOE, "--moe-null-expert-rho", "0.5",
                      "--moe-token-dispatcher-type", dispatcher)
        assert given.moe_token_dispatcher_type == dispatcher
        assert not getattr(given, DISPATCHER_CHOSEN)


def test_expert_path_flag():
    assert null_expert_path_from_args(parse(*MOE)) == "megatron"
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-expert-path", "lean")
    assert null_expert_path_from_args(args) == "lean"
    assert null_expert_config_from_args(args).real_fraction == 0.5


def test_lean_buffer_flag():
    lean = (*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-expert-path", "lean")
    assert null_expert_config_from_args(parse(*lean)).lean_buffer == "auto"
    for buffer in ("real-rows", "worst-case"):
        args = parse(*lean, "--moe-null-lean-buffer", buffer)
        assert null_expert_config_from_args(args).lean_buffer == buffer
    with pytest.raises(ValueError, match="--moe-null-lean-buffer worst-case needs "
                                         "--moe-null-expert-path lean; allowed on the megatron "
                                         "path: auto"):
        null_expert_config_from_args(unchecked_parse(*MOE, "--moe-null-expert-rho", "0.5",
                                                     "--moe-null-lean-buffer", "worst-case"))


def test_unknown_lean_buffer_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse(*MOE, "--moe-null-lean-buffer", "tight")
    error = capsys.readouterr().err
    assert "--moe-null-lean-buffer: invalid choice: 'tight'" in error
    assert "'auto', 'real-rows', 'worst-case'" in error


def test_unknown_scope_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-balance-scope", "batch")
    assert "invalid choice: 'batch'" in capsys.readouterr().err


def test_allgather_warns_once_in_one_wording(caplog, monkeypatch):
    """The start-up check and the dispatcher share one warning, said once per process."""
    import megatron_null_moe.dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "_allgather_warned", False)
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-aux-loss-coeff", "0.01",
                 "--moe-token-dispatcher-type", "allgather")
    with caplog.at_level(logging.WARNING):
        warn_where_the_flags_lose(args, null_expert_config_from_args(args))
        warn_where_the_flags_lose(args, null_expert_config_from_args(args))
        dispatcher_module.warn_allgather_saves_no_communication()
    assert [r.name for r in caplog.records] == ["megatron_null_moe.dispatcher"]
    assert "save no communication" in caplog.text


def test_default_dispatcher_does_not_warn(caplog, monkeypatch):
    import megatron_null_moe.dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "_allgather_warned", False)
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-aux-loss-coeff", "0.01")
    with caplog.at_level(logging.WARNING):
        warn_where_the_flags_lose(args, null_expert_config_from_args(args))
    assert "save no communication" not in caplog.text


def test_help_explains_rho(capsys):
    """Megatron's full --help (its own crashes on a bare '%' in 0.19.2) with the plugin's."""
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "target fraction of each token's --moe-router-topk slots that go to real experts" in text
    assert "in (0, 1]" in text
    assert "With --moe-null-expert-rho the default is alltoall" in text


def test_budget_controller_flags():
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-budget-controller")
    assert null_expert_config_from_args(args).budget_control_rate == 1.0
    args = parse(*MOE, "--moe-null-expert-rho", "0.5", "--moe-null-budget-controller",
                 "--moe-null-budget-rate", "0.25")
    assert null_expert_config_from_args(args).budget_control_rate == 0.25
    args = parse(*MOE, "--moe-null-expert-rho", "0.5")
    assert null_expert_config_from_args(args).budget_control_rate is None


@pytest.mark.parametrize("argv,warns", [
    (("--moe-null-expert-rho", "0.5"), True),  # Megatron's default coefficient is 0
    (("--moe-null-expert-rho", "0.5", "--moe-aux-loss-coeff", "0.02",
      "--moe-router-load-balancing-type", "none"), True),
    (("--moe-null-expert-rho", "0.5", "--moe-aux-loss-coeff", "0.02"), False),
    (("--moe-null-expert-rho", "0.5", "--moe-null-budget-controller"), False),
    (("--moe-null-expert-rho", "1.0"), False),
])
def test_warns_when_nothing_holds_the_budget(argv, warns, caplog):
    args = parse(*MOE, *argv)
    with caplog.at_level(logging.WARNING, logger="megatron_null_moe.arguments"):
        warn_where_the_flags_lose(args, null_expert_config_from_args(args))
    assert ("nothing pulls the real fraction towards the target" in caplog.text) == warns
