"""The demo at a tiny size: report, plots, JSON and TensorBoard are produced and agree."""

import json

import pytest
import torch

from megatron_null_moe.demo.__main__ import main, parse_arguments
from megatron_null_moe.demo.data import IMAGE_TYPE, NUM_PATCHES, TEXT_TYPE, make_batch


def test_tiny_demo_writes_a_consistent_report(tmp_path):
    main(["--output", str(tmp_path), "--steps", "12", "--seeds", "0", "1",
          "--configs", "K2_1.0", "K4_0.5", "K4_0.5+budget", "--device", "cpu"])
    report = (tmp_path / "report.md").read_text()
    for plot in ("loss_vs_expert_flops.png", "real_fraction_budget.png",
                 "compute_intensity_by_modality.png", "real_experts_per_token.png",
                 "patch_compute.png"):
        assert f"]({plot})" in report
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    summary = json.loads((tmp_path / "summary.json").read_text())
    baseline, contender = summary["configs"]["K2_1.0"], summary["configs"]["K4_0.5"]
    # Same expected expert FLOPs (rho*K = 2); rho = 1 spends exactly what it expects.
    assert baseline["expected_expert_flops"]["per_seed"] == contender["expected_expert_flops"][
        "per_seed"]
    assert baseline["measured_expert_flops"]["per_seed"] == baseline["expected_expert_flops"][
        "per_seed"]
    pairs = [(p["baseline"], p["contender"], p["kind"]) for p in summary["matched_flops"]]
    assert pairs == [("K2_1.0", "K4_0.5", "same expected expert FLOPs"),
                     ("K2_1.0", "K4_0.5+budget", "same expected expert FLOPs"),
                     ("K4_0.5", "K4_0.5+budget",
                      "same configuration, without and with the budget controller")]
    for pair in summary["matched_flops"]:
        assert len(pair["train_loss_difference_at_matched_flops"]["per_seed"]) == 2
        assert pair["verdict"] in report
    assert summary["modality"]["K4_0.5"]["verdict"] in report
    budget = summary["budget"]["K4_0.5+budget"]
    assert budget["verdict"] in report and budget["warmup_steps"] == 2
    assert sorted(budget["per_seed"]) == ["0", "1"]  # JSON keys
    for per_seed in budget["per_seed"].values():
        assert len(per_seed["layer_real_fraction"]) == 2
        assert per_seed["flops_ratio"] > 0 and per_seed["flops_ratio_after_warmup"] > 0

    runs = json.loads((tmp_path / "runs.json").read_text())
    assert all(bias == [0.0, 0.0] for run in runs["K4_0.5"] for bias in run["selection_bias"])
    assert any(bias != [0.0, 0.0] for bias in runs["K4_0.5+budget"][0]["selection_bias"][1:])
    for run in runs["K4_0.5"]:
        assert run["steps"] == list(range(1, 13))
        flops = run["expert_flops"]
        assert all(b > a for a, b in zip(flops, flops[1:]))  # cumulative
        assert len(run["example_patch_compute"]) == NUM_PATCHES


def test_runs_do_not_depend_on_the_number_of_workers(tmp_path):
    """Each run is a pure function of its configuration and seed."""
    losses = []
    for workers in ("1", "2"):
        output = tmp_path / workers
        main(["--output", str(output), "--steps", "10", "--seeds", "3", "--configs", "K2_1.0",
              "K4_0.5+budget", "--device", "cpu", "--workers", workers])
        runs = json.loads((output / "runs.json").read_text())
        losses.append({name: [run["train_loss"] for run in value] for name, value in runs.items()})
    assert losses[0] == losses[1]


@pytest.mark.parametrize("argv,message", [
    (["--configs", "K4"], "is not K<topk>_<rho>"),
    (["--configs", "K4_0.5+pi"], "is not K<topk>_<rho>"),
    (["--configs", "K2_1.0+budget"], "rho = 1 has no null experts to control"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--configs", "K4_0.3"], "not a whole number"),
    (["--configs", "K40_0.5"], "exceeds the pool"),
    (["--steps", "3"], "--steps must be at least 10"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--configs", "K2_1.0", "K2_1.0"], "duplicates"),
])
def test_bad_options_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_arguments(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_refused_without_cuda(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_task_loss_is_on_text_only_and_images_are_patch_tokens():
    batch = make_batch(8, torch.Generator().manual_seed(0))
    assert torch.all(batch.loss_mask[batch.token_types == IMAGE_TYPE] == 0)
    assert (batch.token_types == IMAGE_TYPE).sum(1).eq(NUM_PATCHES).all()
    text_positions = batch.token_types == TEXT_TYPE
    assert torch.all(batch.loss_mask <= text_positions.float())  # loss only at text inputs
    again = make_batch(8, torch.Generator().manual_seed(0))
    assert torch.equal(batch.tokens, again.tokens)  # generated deterministically
