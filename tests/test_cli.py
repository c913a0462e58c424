"""The commands start quietly and refuse bad flags in one line; library imports keep warnings."""

import configparser
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_null_moe.cli import environment_line, refusals_as_errors
from test_pretrain import TINY_GPT

ROOT = Path(__file__).parent.parent
# What Megatron-Core 0.19.2 and torch print at import on a machine without TE, Apex, CUDA.
NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
           "Only transformer-engine>=", "No CUDA runtime is found")


def _run(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # No PYTHONWARNINGS: the commands must be quiet on their own.
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    environment.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *command], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=ROOT)


def _notices(result: subprocess.CompletedProcess) -> list:
    output = result.stdout + result.stderr
    return [notice for notice in NOTICES if notice in output]


def test_library_import_keeps_megatrons_notices():
    result = _run("-c", "import megatron_null_moe.spec, megatron.training.training")
    assert result.returncode == 0, result.stderr
    assert _notices(result) == list(NOTICES), "Megatron's notices changed: update cli.py"


@pytest.mark.parametrize("module", ["megatron_null_moe.upcycle", "megatron_null_moe.export"])
def test_help_is_quiet(module):
    result = _run("-m", module, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module}")
    assert _notices(result) == [] and result.stderr == ""


def test_benchmark_is_quiet_and_says_what_runs(tmp_path):
    result = _run("benchmarks/moe_layer_benchmark.py", "--preset", "cpu-smoke", "--paths",
                  "upstream,lean", "--output", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr
    assert _notices(result) == []
    assert result.stdout.splitlines()[0] == "CPU run: no Transformer Engine, no Apex; local layers"


def test_demo_and_its_workers_are_quiet(tmp_path):
    result = _run("-m", "megatron_null_moe.demo", "--steps", "10", "--seeds", "0",
                  "--configs", "K4_0.5", "--workers", "1", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert _notices(result) == []
    assert result.stdout.splitlines()[0] == "CPU run: no Transformer Engine, no Apex; " \
                                            "local layers, fp32"


ARGUMENT_DUMP = "------------------------ arguments ------------------------"


@pytest.mark.parametrize("flags, named, before_megatrons_arguments", [
    (["--moe-null-budget-controller", "--moe-null-budget-rate", "-1"],
     "--moe-null-budget-rate) must be a positive finite number", True),
    (["--moe-null-budget-rate", "2"], "--moe-null-budget-rate needs --moe-null-budget-controller",
     True),
    (["--sft"], "--sft (supervised fine-tuning datasets) is not carried by this entry point",
     True),
    # A Megatron option the plugin cannot honour is known once Megatron built its config.
    (["--moe-router-score-function", "sqrtsoftplus"], "--moe-router-score-function", False),
])
def test_entry_point_refuses_a_flag_in_one_line_before_the_model(flags, named,
                                                                 before_megatrons_arguments):
    result = _run("-m", "megatron_null_moe.pretrain_gpt", *TINY_GPT, "--train-iters", "1",
                  *flags)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron_null_moe.pretrain_gpt: error: ") and named in last
    assert "Traceback" not in result.stderr
    assert "number of parameters" not in result.stdout  # Megatron says so once it built one
    assert (ARGUMENT_DUMP not in result.stdout) == before_megatrons_arguments
    assert _notices(result) == []
    assert "CPU run: no Transformer Engine, no Apex; local layers" in result.stdout


def test_refusals_become_one_error_line_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info, refusals_as_errors("prog"):
        raise ValueError("--flag must be 1 or 2; got 3.")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "prog: error: --flag must be 1 or 2; got 3.\n"
    with pytest.raises(SystemExit), refusals_as_errors("prog", speaks=False):
        raise ValueError("said by rank 0 only")
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyError), refusals_as_errors("prog"):
        raise KeyError("a bug")


def test_only_the_named_refusal_becomes_a_line_around_a_whole_run(capsys):
    """Around Megatron's pretrain only the plugin's checkpoint refusals become a line; a
    ValueError of Megatron's (or a bug) keeps its traceback."""
    from megatron_null_moe.training_hooks import CheckpointRefusal

    with pytest.raises(SystemExit) as exit_info, refusals_as_errors(
            "prog", refusal=CheckpointRefusal):
        raise CheckpointRefusal("--use-distributed-optimizer: ...; allowed: --no-load-optim")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == \
        "prog: error: --use-distributed-optimizer: ...; allowed: --no-load-optim\n"
    with pytest.raises(ValueError, match="Megatron's own"), refusals_as_errors(
            "prog", refusal=CheckpointRefusal):
        raise ValueError("Megatron's own")


def test_environment_line_says_what_is_missing():
    # On this machine neither Transformer Engine nor NVIDIA Apex is installed.
    assert environment_line(False, "fp32") == \
        "CPU run: no Transformer Engine, no Apex; local layers, fp32"
    assert environment_line(True, layers="local layers") == \
        "GPU run: no Transformer Engine, no Apex; local layers"


def test_console_scripts_name_quiet_commands_that_exist():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = [line.split("=") for line in
               setup["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert scripts
    for name, target in scripts:
        module, attribute = target.strip().split(":")
        assert module == "megatron_null_moe.cli", name
        command = getattr(importlib.import_module(module), attribute)
        target_module, function = command.args[0].split(":")
        assert callable(getattr(importlib.import_module(target_module), function)), name


def test_argparse_refusal_of_a_plugin_flag_is_two_short_lines(monkeypatch, capsys):
    from megatron_null_moe.pretrain_gpt import parse_arguments

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"])
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments([*TINY_GPT, "--moe-null-expert-path", "bogus"])
    assert exit_info.value.code == 2
    # Importing Megatron's training code here may log first (this is a library import).
    usage, error = capsys.readouterr().err.strip().splitlines()[-2:]
    assert usage == "usage: megatron_null_moe.pretrain_gpt [Megatron arguments] " \
                    "[null-expert flags] (--help lists them)"
    assert error.startswith("megatron_null_moe.pretrain_gpt: error: argument "
                            "--moe-null-expert-path: invalid choice: 'bogus'")
