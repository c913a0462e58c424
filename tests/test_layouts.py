"""Every parallel layout trains what one process trains, and checkpoints move between layouts.

The entry point on Megatron's loop with the budget controller and the per-expert bias, on
both expert paths, 8 gloo ranks on the CPU. From one initial checkpoint saved by one process
(weights, controller state and per-expert bias), each layout trains iterations 2-5 and must
equal one process: the loss within 2e-5 relative (fp32), each layer's real fraction and
controller bias within 1e-6. Checkpoints of
iteration 3 saved in one layout resume in another and continue the one-process trajectory:
weights and controller state always, the optimizer state where Megatron can move it; where
it cannot, the plugin refuses naming --no-load-optim.

All runs share three launches of tests/pretrain_runs.py, which runs the entry point several
times per launch (an 8-rank launch costs ~1.5 min of start-up on 2 cores): one process
(initial checkpoint, references), 8 ranks (layouts, resharding), one process (resuming the
8-rank checkpoints).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_null_moe.process_groups import free_port
from test_pretrain import TINY_GPT, _checkpoint_tensors, scalars

PATHS = ("megatron", "lean")
LAYERS = ("01", "02", "03", "04")
LOSS_RTOL = 2e-5  # fp32 sums in another order (other GEMM shapes, reductions over ranks)
STATISTICS_ATOL = 1e-6
ONE_LINE_REFUSAL = "megatron_null_moe.pretrain_gpt: error: "  # exit status 2, no traceback


def _with_flags(arguments: list, values: dict) -> list:
    """``arguments`` with the values of the flags in ``values`` replaced."""
    arguments = list(arguments)
    for flag, value in values.items():
        arguments[arguments.index(flag) + 1] = value
    return arguments


# A model of 4 layers, 8 experts, top-4, rho 0.5, the controller and the per-expert bias, at
# a small width.
# Balance per micro-batch: Megatron's global-batch loss averages the expert counts over the
# micro-batches a rank has seen so far in the step, so it changes with the split of the batch
# into DP ranks and micro-batches (measured: 5e-4 apart at the first step between EP4 on 8
# ranks and one process). Dropout off: its masks are drawn per TP rank. The vocabulary is
# padded to a multiple of 64 x TP, which is 128 for TP 1 and 2. No bias-dropout fusion:
# torch.compile recompiles it for each layout's shapes, which costs more than the runs.
MODEL = _with_flags(TINY_GPT, {
    "--num-layers": "4", "--seq-length": "32", "--max-position-embeddings": "32",
    "--micro-batch-size": "1", "--global-batch-size": "8", "--num-experts": "8",
    "--moe-router-topk": "4", "--moe-null-balance-scope": "micro-batch",
}) + ["--ffn-hidden-size", "64", "--make-vocab-size-divisible-by", "64",
      "--hidden-dropout", "0", "--attention-dropout", "0", "--no-bias-dropout-fusion",
      "--moe-null-budget-controller", "--moe-router-enable-expert-bias",
      "--moe-router-bias-update-rate", "1e-2",
      "--distributed-backend", "gloo", "--train-iters", "5"]

TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
EXPERT_TP_1 = ["--expert-tensor-parallel-size", "1"]  # the lean path refuses expert TP > 1
LAYOUTS = {
    # Expert TP 2 (Megatron's default, = TP) on the Megatron path, 1 on the lean path.
    "tp2sp_pp2_ep2": [*TP2_SP, "--pipeline-model-parallel-size", "2",
                      "--expert-model-parallel-size", "2"],
    "ep4": ["--expert-model-parallel-size", "4"],  # DP 8 for the dense part
    "ep8_distributed_optimizer": ["--expert-model-parallel-size", "8",
                                  "--use-distributed-optimizer"],
    "pp2_vp2_ep2": ["--pipeline-model-parallel-size", "2",
                    "--num-layers-per-virtual-pipeline-stage", "1",
                    "--expert-model-parallel-size", "2"],
    "tp2sp_ep2_etp1": [*TP2_SP, "--expert-model-parallel-size", "2", *EXPERT_TP_1],
}
# Resharding pair -> (run that saved iteration 3, layout that resumes it, whether the
# optimizer state moves too). Megatron keeps the experts' optimizer state apart only with
# expert groups (EP > 1 or expert TP != TP) and cannot load it across that change: the
# plugin refuses, naming --no-load-optim, with which the rest moves.
RESHARDING = {
    "ep2_to_ep4": ("ep2", "ep4", True),
    "ep4_to_one_process": ("ep4", "one_process", False),
    "tp2sp_pp2_ep2_to_one_process": ("tp2sp_pp2_ep2", "one_process", False),
    "one_process_to_tp2sp_pp2_ep2": ("one_process", "tp2sp_pp2_ep2", False),
}


def _layout(name: str, path: str) -> list:
    flags = LAYOUTS.get(name, ["--expert-model-parallel-size", "2"] if name == "ep2" else [])
    if path == "lean" and name == "tp2sp_pp2_ep2":
        flags = [*flags, *EXPERT_TP_1]
    return flags


class Runs:
    """The runs' directories and the three launches' plans."""

    def __init__(self, root: Path):
        self.root = root
        self.initial = root / "initial"
        self.reports = {}  # run name -> {"ok", "error", "seconds"}, filled by the launches

    def directory(self, path: str, name: str) -> Path:
        return self.root / path / name

    def entry(self, path: str, name: str, *flags: str, expect_error=None) -> dict:
        directory = self.directory(path, name)
        argv = [*MODEL, "--moe-null-expert-path", path, "--tensorboard-dir",
                str(directory / "tb"), "--save", str(directory / "ckpt"), "--save-interval",
                "3", *flags]
        return {"name": f"{path}/{name}", "argv": argv, "expect_error": expect_error}

    def from_initial(self, path: str, name: str, *flags: str, expect_error=None) -> dict:
        """Weights and controller state of the initial checkpoint; a fresh optimizer."""
        return self.entry(path, name, "--load", str(self.initial), "--no-load-optim", *flags,
                          expect_error=expect_error)

    def resumed(self, path: str, source: str, name: str, *flags: str, expect_error=None) -> dict:
        """Everything the source run saved at iteration 3, optimizer state included."""
        return self.entry(path, name, "--load", str(self.directory(path, source) / "ckpt"),
                          "--ckpt-step", "3", *flags, expect_error=expect_error)

    def one_process_first(self) -> list:
        initial = {"name": "initial", "expect_error": None, "argv": [
            *MODEL, "--save", str(self.initial), "--save-interval", "1", "--train-iters", "1",
            "--no-save-optim"]}
        return [initial] + [self.from_initial(path, "one_process") for path in PATHS]

    def resharding(self, target_is_one_process: bool) -> list:
        """The resharding runs resuming in one process, or on 8 ranks; where the optimizer
        state cannot move, first the refused attempt (Megatron path), then --no-load-optim."""
        runs = []
        for pair, (source, target, moves_optimizer) in RESHARDING.items():
            if (target == "one_process") != target_is_one_process:
                continue
            if not moves_optimizer:
                runs.append(self.resumed("megatron", source, f"{pair}_refused",
                                         *_layout(target, "megatron"),
                                         expect_error="--no-load-optim"))
            for path in PATHS:
                flags = [] if moves_optimizer else ["--no-load-optim"]
                runs.append(self.resumed(path, source, pair, *_layout(target, path), *flags))
        return runs

    def eight_ranks(self) -> list:
        runs = [self.from_initial(path, name, *_layout(name, path))
                for path in PATHS for name in (*LAYOUTS, "ep2")]
        # The distributed optimizer's state, resumed in the layout that saved it.
        runs.append(self.resumed("megatron", "ep8_distributed_optimizer",
                                 "distributed_optimizer_state_refused",
                                 *_layout("ep8_distributed_optimizer", "megatron"),
                                 expect_error="--no-load-optim"))
        # The one-process checkpoint (128 rows: 64 x TP 1) at TP 2 with Megatron's default
        # multiple of 128, which would pad it to 256 rows.
        runs.append(self.from_initial("megatron", "vocabulary_padding_refused", *TP2_SP,
                                      "--make-vocab-size-divisible-by", "128",
                                      expect_error="--make-vocab-size-divisible-by"))
        return runs + self.resharding(target_is_one_process=False)

    def one_process_last(self) -> list:
        return self.resharding(target_is_one_process=True)


def _launch(runs: list, nproc: int, root: Path, label: str) -> dict:
    plan, report = root / f"{label}_plan.json", root / f"{label}_report.json"
    plan.write_text(json.dumps({"runs": runs, "report": str(report)}))
    driver = str(Path(__file__).parent / "pretrain_runs.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), driver, str(plan)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                            env=environment)
    output = result.stdout + result.stderr
    (root / f"{label}_output.txt").write_text(output)
    assert result.returncode == 0, output[-6000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("runs the CPU harness's gloo ranks")
    root = tmp_path_factory.mktemp("layouts")
    plans = Runs(root)
    plans.reports.update(_launch(plans.one_process_first(), 1, root, "first"))
    plans.reports.update(_launch(plans.eight_ranks(), 8, root, "eight"))
    plans.reports.update(_launch(plans.one_process_last(), 1, root, "last"))
    return plans


def _assert_same_trajectory(run: dict, reference: dict, steps, loss: bool = True,
                            statistics=("real_fraction", "budget_bias")):
    """TensorBoard scalars of ``run`` equal ``reference``'s at ``steps``: the loss, and per
    layer the real fraction and the controller's bias."""
    for step in steps:
        if loss:
            assert run["lm loss"][step] == pytest.approx(reference["lm loss"][step],
                                                         rel=LOSS_RTOL), step
        for layer in LAYERS:
            for name in statistics:
                tag = f"null_moe/{name}_layer_{layer}"
                assert run[tag][step] == pytest.approx(reference[tag][step],
                                                       abs=STATISTICS_ATOL), (tag, step)


@pytest.mark.world_size(8)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_layout_trains_what_one_process_trains(runs, path, layout):
    reference = scalars(runs.directory(path, "one_process"))
    assert reference["null_moe/budget_bias_layer_01"][2] != 0  # the controller's state loaded
    trained = scalars(runs.directory(path, layout))
    assert sorted(trained["lm loss"]) == [2, 3, 4, 5]
    _assert_same_trajectory(trained, reference, range(2, 6))


@pytest.mark.world_size(8)
@pytest.mark.parametrize("pair", RESHARDING)
@pytest.mark.parametrize("path", PATHS)
def test_checkpoint_resumes_in_another_layout(runs, path, pair):
    """The resumed run continues the one-process trajectory.

    With the optimizer state: iterations 4 and 5 equal, and at iteration 5 the router (null
    row, selection bias, its integral) and the optimizer's moments of it too. Without
    (--no-load-optim, where Megatron cannot move it): iteration 4 equals (the weights and the
    null row decide its loss and routing, the selection bias is the bias it logs), and so
    does the bias of iteration 5, which the controller computed from iteration 4's routing
    and the loaded integral; past that a fresh optimizer takes another path.
    """
    source_name, _, moves_optimizer = RESHARDING[pair]
    source, resumed = runs.directory(path, source_name), runs.directory(path, pair)
    reference = runs.directory(path, "one_process")
    expected = scalars(reference)
    _assert_same_trajectory(scalars(source), expected, range(2, 6))
    continued = scalars(resumed)
    assert sorted(continued["lm loss"]) == [4, 5]
    if not moves_optimizer:
        _assert_same_trajectory(continued, expected, (4,))
        _assert_same_trajectory(continued, expected, (5,), loss=False,
                                statistics=("budget_bias",))
        return
    _assert_same_trajectory(continued, expected, (4, 5))
    saved = _checkpoint_tensors(reference / "ckpt", 5)
    loaded = _checkpoint_tensors(resumed / "ckpt", 5)
    compared = [key for key in saved if "mlp.router." in key]
    assert {"decoder.layers.mlp.router.null_bias_integral",
            "decoder.layers.mlp.router.expert_bias",
            "optimizer.state.exp_avg.decoder.layers.mlp.router.null_weight"} <= set(compared)
    # Relative to each tensor's largest entry: measured at most 1.5e-6 (fp32, other orders of
    # summation, 4 Adam steps); Adam moments that restarted at iteration 4 are O(1) apart.
    for key in compared:
        scale = float(saved[key].abs().max())
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=1e-4 * scale, msg=key)


@pytest.mark.world_size(8)
@pytest.mark.parametrize("pair", [pair for pair, (*_, moves) in RESHARDING.items()
                                  if not moves])
def test_optimizer_state_refused_across_expert_groups(runs, pair):
    error = runs.reports[f"megatron/{pair}_refused"]["error"]
    assert error.startswith(ONE_LINE_REFUSAL), error
    assert "cannot load optimizer state across that change" in error, error
    assert "--no-load-optim" in error


@pytest.mark.world_size(8)
def test_distributed_optimizer_state_refused_without_apex_or_transformer_engine(runs):
    error = runs.reports["megatron/distributed_optimizer_state_refused"]["error"]
    assert error.startswith(ONE_LINE_REFUSAL), error
    assert "--use-distributed-optimizer: without apex or Transformer Engine" in error, error
    assert "--no-load-optim" in error


@pytest.mark.world_size(8)
def test_vocabulary_padded_to_other_rows_refused_naming_the_multiple_that_keeps_it(runs):
    error = runs.reports["megatron/vocabulary_padding_refused"]["error"]
    assert error.startswith(ONE_LINE_REFUSAL), error
    assert "has a vocabulary of 128 rows" in error and "pads it to 256" in error, error
    assert error.endswith("allowed: --make-vocab-size-divisible-by 64 (the largest of the 7 "
                          "values that keep it)."), error
