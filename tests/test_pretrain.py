"""The entry point on Megatron's own training loop, on the CPU: train, save, resume, log."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_null_moe.process_groups import free_port

TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--num-experts", "4", "--moe-router-topk", "2",  # the dispatcher: alltoall by default
    "--moe-null-expert-rho", "0.5", "--moe-null-balance-scope", "global",
    "--moe-aux-loss-coeff", "2e-2", "--moe-z-loss-coeff", "1e-3",
    "--disable-bias-linear", "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--ckpt-format", "torch_dist", "--seed", "1",
]


def run_pretrain(log_dir: Path, *extra: str, nproc: int = 1) -> str:
    """Run the entry point (torchrun for several ranks); returns its output."""
    module = ["-m", "megatron_null_moe.pretrain_gpt", *TINY_GPT, "--tensorboard-dir",
              str(log_dir / "tb"), *extra]
    if nproc == 1:
        command = [sys.executable, *module]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                   str(nproc), "--master-port", str(free_port()), *module]
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=environment)
    output = result.stdout + result.stderr
    (log_dir / "output.txt").write_text(output)
    assert result.returncode == 0, output[-4000:]
    return output


def scalars(log_dir: Path) -> dict:
    """TensorBoard scalars: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((log_dir / "tb").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, {}).update(
                {event.step: event.value for event in accumulator.Scalars(tag)}
            )
    return values


def _resume_equals_uninterrupted(tmp_path, nproc, *parallel):
    """Megatron's default dropout (0.1) and the budget controller on: the resumed run's
    losses, statistics and controller biases equal the uninterrupted run's."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    checkpoint = str(tmp_path / "checkpoint")
    output = run_pretrain(straight, "--train-iters", "6", "--save", checkpoint,
                          "--save-interval", "3", "--moe-null-budget-controller", *parallel,
                          nproc=nproc)
    assert "null real fraction" in output  # Megatron's log line carries the statistics
    assert "; dispatcher alltoall (chosen for null experts: Megatron's default, allgather, " \
           "would send null slots too)." in output  # the start-up line
    run_pretrain(resumed, "--train-iters", "6", "--load", checkpoint, "--ckpt-step", "3",
                 "--moe-null-budget-controller", *parallel, nproc=nproc)
    first, second = scalars(straight), scalars(resumed)
    assert sorted(second["lm loss"]) == [4, 5, 6]
    assert first["null_moe/budget_bias_layer_01"][4] != 0  # the controller has moved it
    for tag in ("lm loss", "null real fraction", "null zero-real tokens", "null budget bias",
                "null_moe/budget_bias_layer_01", "null_moe/budget_bias_layer_02",
                "null busiest expert / mean", "null busiest expert / mean per step",
                "null_moe/interval_real_fraction_layer_01", "null_moe/real_logit_spread_layer_02"):
        for step in (4, 5, 6):
            assert second[tag][step] == pytest.approx(first[tag][step], rel=1e-5, abs=1e-7), (
                tag, step)
    return first


def _assert_load_figures(tensorboard, expert_parallel_size=1):
    """Per layer and step, the busiest expert over the mean (>= 1), the log line's worst
    layer, and under EP the busiest EP rank over the mean, at most the expert figure."""
    figures = {"expert_load_max_over_mean": "null busiest expert / mean",
               "expert_load_max_over_mean_per_step": "null busiest expert / mean per step"}
    if expert_parallel_size > 1:
        figures["ep_rank_load_max_over_mean"] = "null busiest EP rank / mean"
        figures["ep_rank_load_max_over_mean_per_step"] = "null busiest EP rank / mean per step"
    for figure, line in figures.items():
        layers = [tensorboard[f"null_moe/{figure}_layer_{layer}"] for layer in ("01", "02")]
        assert sorted(tensorboard[line]) == sorted(layers[0]) == sorted(layers[1])
        for step, worst in tensorboard[line].items():
            assert worst == max(layer[step] for layer in layers) >= 1, (figure, step)
    for layer in ("01", "02") if expert_parallel_size > 1 else ():
        experts = tensorboard[f"null_moe/expert_load_max_over_mean_layer_{layer}"]
        ranks = tensorboard[f"null_moe/ep_rank_load_max_over_mean_layer_{layer}"]
        assert all(1 <= ranks[step] <= experts[step] for step in experts), layer
    if expert_parallel_size == 1:
        assert not any("ep_rank_load" in tag or "EP rank" in tag for tag in tensorboard)


def test_single_process_trains_saves_and_resumes_exactly(tmp_path):
    tensorboard = _resume_equals_uninterrupted(tmp_path, 1)
    for tag in ("null real experts/token", "null expected real experts/token",
                "null real fraction", "null zero-real tokens", "global_load_balancing_loss",
                "z_loss", "null_moe/real_fraction_layer_01", "null_moe/real_fraction_layer_02",
                "null_moe/zero_real_fraction_layer_01", "null budget bias",
                "null worst layer real fraction error"):
        assert tag in tensorboard, tag
    assert set(tensorboard["null expected real experts/token"].values()) == {1.0}
    _assert_load_figures(tensorboard)


def test_sigmoid_scores_expert_bias_and_groups_train_save_and_resume_exactly(tmp_path):
    """Sigmoid scores, Megatron's per-expert bias flag and two groups of experts (each token's
    real experts from one), with null experts and the controller: the flags are accepted,
    the bias moves in Megatron's own buffer, is saved, and the resumed run continues."""
    flags = ("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
             "--moe-router-bias-update-rate", "1e-2", "--moe-router-num-groups", "2",
             "--moe-router-group-topk", "1")
    _resume_equals_uninterrupted(tmp_path, 1, *flags)
    assert "per-expert bias on (rate 0.01)" in (tmp_path / "straight" / "output.txt").read_text()
    bias = _checkpoint_tensors(tmp_path / "checkpoint", 6)["decoder.layers.mlp.router.expert_bias"]
    assert bias.shape == (2, 4) and bias.abs().sum() > 0
    assert bias.mean(dim=-1).abs().max() < 1e-6  # re-centred: the null bias sets the budget


def test_the_bias_from_a_checkpoint_saved_without_it(tmp_path):
    """Megatron's default strictness stops at the missing bias: one error line naming the
    flag that starts it at zero, with which the run trains on."""
    checkpoint = str(tmp_path / "checkpoint")
    run_pretrain(tmp_path, "--train-iters", "1", "--save", checkpoint, "--save-interval", "1")
    command = [sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *TINY_GPT,
               "--train-iters", "2", "--load", checkpoint, "--moe-router-enable-expert-bias"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith(
        "megatron_null_moe.pretrain_gpt: error: ")]
    assert "has no per-expert bias" in line and "--dist-ckpt-strictness log_all" in line
    output = run_pretrain(tmp_path, "--train-iters", "2", "--load", checkpoint,
                          "--moe-router-enable-expert-bias", "--dist-ckpt-strictness", "log_all",
                          "--override-opt_param-scheduler")
    assert "per-expert bias on" in output and "iteration        2/" in output


@pytest.mark.world_size(2)
def test_expert_parallel_two_ranks_trains_saves_and_resumes_exactly(tmp_path):
    tensorboard = _resume_equals_uninterrupted(tmp_path, 2, "--expert-model-parallel-size", "2",
                                               "--distributed-backend", "gloo")
    # All-to-all bytes per rank and step (log interval 1): in the dispatch one rank receives
    # what the other sends; the busier rank is at least the mean.
    assert "all-to-all per rank, MoE layer and step" in (tmp_path / "straight" / "output.txt"
                                                         ).read_text()
    for layer in ("01", "02"):
        sent, received = (tensorboard[f"null_moe/alltoall_dispatch_{direction}_bytes_mean_layer_"
                                      f"{layer}"] for direction in ("sent", "received"))
        assert sent == received and sorted(sent) == list(range(1, 7)) and min(sent.values()) > 0
        most = tensorboard[f"null_moe/alltoall_dispatch_sent_bytes_max_layer_{layer}"]
        assert all(most[step] >= value for step, value in sent.items())
        assert tensorboard[f"null_moe/alltoall_sent_bytes_mean_layer_{layer}"][1] > sent[1]
    _assert_load_figures(tensorboard, expert_parallel_size=2)


def test_upstream_comparable_run_logs_the_expert_load_over_the_log_interval(tmp_path):
    """--moe-null-expert-rho 1 (no null copies: Megatron's top-K) gets the load figures too;
    with --log-interval 2 they are written at iteration 2 only, over both steps, and the log
    line prints the worst layer's figure itself (not Megatron's mean over the steps)."""
    output = run_pretrain(tmp_path, "--train-iters", "2", "--log-interval", "2",
                          "--moe-null-expert-rho", "1")
    logged = scalars(tmp_path)
    _assert_load_figures(logged)
    assert sorted(logged["null busiest expert / mean"]) == [2]
    (line,) = [line for line in output.splitlines() if "iteration        2/" in line]
    printed = float(line.split("null busiest expert / mean: ")[1].split(" ")[0])
    assert printed == pytest.approx(logged["null busiest expert / mean"][2], rel=1e-6)
    per_step = float(line.split("null busiest expert / mean per step: ")[1].split(" ")[0])
    assert per_step == pytest.approx(logged["null busiest expert / mean per step"][2], rel=1e-6)


def test_real_fraction_tracks_target(tmp_path):
    """With the global balance loss (coefficient 0.1) the real fraction, 0.65-0.85 at the
    start, is within 0.05 of rho = 0.5 on average over iterations 51-60 (measured on the
    CPU: about 0.53)."""
    run_pretrain(tmp_path, "--train-iters", "60", "--lr", "1e-2", "--moe-aux-loss-coeff", "0.1")
    real = scalars(tmp_path)["null real fraction"]
    late = [real[step] for step in range(51, 61)]
    assert abs(sum(late) / len(late) - 0.5) < 0.05, late
    assert real[1] > 0.6


def test_budget_controller_holds_every_layer_on_target(tmp_path):
    """--moe-null-budget-controller at its default rate, the paper's balance coefficient:
    each layer's real fraction averaged over iterations 21-60 is within 0.01 of rho = 0.5
    (measured on the CPU: 0.500 and 0.501; without the controller 0.66 and 0.69), and the
    measured expert FLOPs are within 2% of the expected."""
    output = run_pretrain(tmp_path, "--train-iters", "60", "--moe-null-budget-controller")
    assert "budget controller on (rate 1)" in output
    logged = scalars(tmp_path)
    for layer in ("01", "02"):
        real = logged[f"null_moe/real_fraction_layer_{layer}"]
        late = [real[step] for step in range(21, 61)]
        assert abs(sum(late) / len(late) - 0.5) < 0.01, (layer, late)
    measured = logged["null real experts/token"]
    expected = logged["null expected real experts/token"]
    ratio = sum(measured[s] for s in range(21, 61)) / sum(expected[s] for s in range(21, 61))
    assert abs(ratio - 1) < 0.02, ratio


def test_capacity_drops_are_logged_apart_from_null_choices(tmp_path):
    """--moe-expert-capacity-factor: the real fraction is what the routing chose; the dropped
    real assignments get their own log value and per-layer scalar."""
    output = run_pretrain(tmp_path, "--train-iters", "2", "--moe-expert-capacity-factor", "0.5")
    assert "null dropped real assignments" in output
    logged = scalars(tmp_path)
    assert logged["null dropped real assignments"][1] > 0
    assert logged["null_moe/dropped_fraction_layer_01"][1] > 0
    assert logged["null real fraction"][1] > 0.5  # chosen, before the drops


def test_bad_flags_fail_at_start_up(tmp_path):
    command = [sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *TINY_GPT,
               "--moe-router-score-function", "sqrtsoftplus", "--train-iters", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode != 0
    assert "--moe-router-score-function" in result.stderr
    assert "allowed: 'softmax', 'sigmoid'" in result.stderr


def test_explicit_allgather_is_kept_with_its_warning(tmp_path):
    output = run_pretrain(tmp_path, "--train-iters", "1", "--moe-token-dispatcher-type",
                          "allgather")
    assert "; dispatcher allgather." in output  # the start-up line, nothing chosen
    assert "null slots save no communication; use alltoall or flex" in output


def _checkpoint_tensors(directory: Path, iteration: int | None = None) -> dict:
    """The tensors of the checkpoint at ``iteration`` (default: the only one) in
    ``directory``, by name."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if iteration is None:
        (saved,) = sorted(p for p in directory.glob("iter_*") if p.is_dir())  # not the .pt
    else:
        saved = directory / f"iter_{iteration:07d}"
    converted = directory / f"{saved.name}.pt"
    dcp_to_torch_save(str(saved), str(converted))
    return torch.load(converted, weights_only=False)


def test_ordinary_moe_checkpoint_loads_into_null_expert_model(tmp_path):
    """The recipe of docs/training.md: --finetune --no-load-optim --dist-ckpt-strictness
    log_all; the null row starts at the mean of the trained real rows (lr 0 keeps it
    visible)."""
    ordinary = [a for a in TINY_GPT if a not in ("--moe-null-expert-rho", "0.5",
                                                 "--moe-null-balance-scope", "global")]
    moe_dir, null_dir = tmp_path / "moe", tmp_path / "null"
    for directory in (moe_dir, null_dir):
        directory.mkdir()
    command = [sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *ordinary,
               "--train-iters", "2", "--save", str(moe_dir / "ckpt"), "--save-interval", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "null busiest expert" not in result.stdout  # without null experts: Megatron's log
    run_pretrain(null_dir, "--train-iters", "1", "--lr", "0", "--min-lr", "0",
                 "--load", str(moe_dir / "ckpt"), "--finetune", "--no-load-optim",
                 "--dist-ckpt-strictness", "log_all",
                 "--save", str(null_dir / "ckpt"), "--save-interval", "1")
    trained = _checkpoint_tensors(moe_dir / "ckpt")["decoder.layers.mlp.router.weight"]
    loaded = _checkpoint_tensors(null_dir / "ckpt")
    assert "decoder.layers.mlp.router.null_weight" not in _checkpoint_tensors(moe_dir / "ckpt")
    null_row = loaded["decoder.layers.mlp.router.null_weight"]  # [layers, 1, hidden]
    assert float((null_row - trained.mean(dim=1, keepdim=True)).abs().max()) < 1e-6
    assert float((loaded["decoder.layers.mlp.router.weight"] - trained).abs().max()) == 0.0


def test_lean_expert_path_equals_the_megatron_path_and_resumes_its_checkpoint(tmp_path):
    """--moe-null-expert-path lean on Megatron's loop: the same first loss as the Megatron
    path (same initial weights; the worst-case buffer); a Megatron-path checkpoint of iteration 2 resumed on the
    lean path (weights and Megatron's default optimizer state carry across) gives the
    uninterrupted run's losses at iterations 3 and 4; the lean path saves the experts in
    SequentialMLP's layout."""
    megatron, fresh, resumed = tmp_path / "megatron", tmp_path / "fresh", tmp_path / "resumed"
    for directory in (megatron, fresh, resumed):
        directory.mkdir()
    run_pretrain(megatron, "--train-iters", "4", "--save", str(megatron / "ckpt"),
                 "--save-interval", "2")
    output = run_pretrain(fresh, "--moe-null-expert-path", "lean", "--moe-null-lean-buffer",
                          "worst-case", "--train-iters", "1")  # the resumed run: auto
    assert "null real fraction" in output
    assert "; lean buffers worst-case; expert path lean; dispatcher alltoall" in output
    (megatron / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    run_pretrain(resumed, "--train-iters", "4", "--load", str(megatron / "ckpt"),
                 "--moe-null-expert-path", "lean", "--save", str(resumed / "ckpt"),
                 "--save-interval", "4")
    expected = scalars(megatron)["lm loss"]
    assert scalars(fresh)["lm loss"][1] == pytest.approx(expected[1], rel=1e-5)
    losses = scalars(resumed)["lm loss"]
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
    tensors = _checkpoint_tensors(resumed / "ckpt")
    # [layers, experts, FFN, hidden]
    assert tuple(tensors["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape) == (
        2, 4, 256, 64)


def test_upcycling_refused_clearly(tmp_path):
    command = [sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *TINY_GPT,
               "--moe-use-upcycling", "--save", str(tmp_path), "--save-interval", "1",
               "--load", str(tmp_path), "--train-iters", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode != 0
    assert "--moe-use-upcycling is broken in megatron-core 0.19.2" in result.stderr
    assert "python -m megatron_null_moe.upcycle" in result.stderr
