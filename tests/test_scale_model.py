"""The scale model's script: its load arithmetic, its cost formulas, a tiny measurement, and
the page's tables regenerated from the committed statistics."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("scale_model",
                                               _ROOT / "benchmarks" / "scale_model.py")
scale_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_model)


def test_rank_loads_equal_a_loop_over_every_assignment():
    generator = torch.Generator().manual_seed(3)
    counts_RN = torch.randint(0, 9, (6, 12), generator=generator)  # 6 ranks' tokens, 12 experts
    ep, per_node = 4, 2  # ranks 0-3 on nodes 0, 0, 1, 1; rank j holds experts 3j..3j+2
    loads = scale_model.rank_loads(counts_RN, ep, per_node)
    expected = {name: [0] * ep for name in loads}
    for source in range(ep):
        for expert in range(12):
            rows, target = int(counts_RN[source, expert]), expert // 3
            expected["expert_rows"][target] += rows
            expected["real"][source] += rows
            if target != source:
                link = "nvlink" if source // per_node == target // per_node else "infiniband"
                expected[f"{link}_sent"][source] += rows
                expected[f"{link}_received"][target] += rows
    assert {name: values.tolist() for name, values in loads.items()} == expected
    with pytest.raises(ValueError, match="EP 5"):
        scale_model.rank_loads(counts_RN, 5, per_node)


def test_balanced_upstream_costs_follow_the_formulas():
    # EP 8 on one node, every token's 8 rows spread evenly: 7 of 8 leave the rank.
    statistics = {f"{name}_{which}": value for which in ("mean", "max") for name, value in
                  (("expert_rows", 8.0), ("nvlink_rows", 7.0), ("infiniband_rows", 0.0),
                   ("exchanged_rows", 14.0))}
    shape = dict(scale_model.QWEN3_30B_A3B, tokens=4096)
    hardware = dict(gemm_flops=400e12, nvlink_bps=350e9, infiniband_bps=40e9,
                    activation_bytes=2, routing_weight_bytes=4)
    costs = scale_model.step_costs(statistics, shape, hardware)["max"]
    flops = 4096 * 8 * 18 * 2048 * 768 * 48
    assert costs["expert_flops"] == pytest.approx(flops)
    assert costs["gemm_seconds"] == pytest.approx(flops / 400e12)
    row_bytes = (2048 * 2 + 4) + 2048 * 2  # dispatch row and routing weight, combine row
    assert costs["alltoall_bytes"] == pytest.approx(14 * 4096 * 48 * row_bytes)
    assert costs["alltoall_seconds"] == pytest.approx(2 * 7 * 4096 * 48 * row_bytes / 350e9)


def test_tiny_measurement_and_model(tmp_path, capsys):
    statistics = tmp_path / "measured.json"
    scale_model.main(["measure", "--steps", "2", "--batch-size", "4", "--experts", "16",
                      "--expert-hidden", "8", "--ranks", "4", "--samples-per-rank", "2",
                      "--repeats", "1", "--calibration-ranks", "2", "--ep", "2,4",
                      "--gpus-per-node", "2", "--statistics", str(statistics)])
    measured = json.loads(statistics.read_text())
    assert set(measured["configs"]) == set(scale_model.CONFIGS)
    for name, config in measured["configs"].items():
        assert set(config["by_ep"]) == {"2", "4"}
        if "rho=1" in name:
            assert config["real_fraction"] == 1.0
    rows = scale_model.main(["model", "--statistics", str(statistics)])
    assert [(row["ep"], row["config"]) for row in rows] == [
        (ep, name) for ep in (2, 4) for name in scale_model.CONFIGS]
    for row in rows:
        if row["config"] == "upstream K8 rho=1":
            assert row["vs upstream K8 rho=1"] == 1.0
            k4 = next(r for r in rows if r["ep"] == row["ep"] and "K4" in r["config"])
            assert k4["mean"]["expert_flops"] == pytest.approx(row["mean"]["expert_flops"] / 2)
    assert "| 4 (2) | null K8 rho=0.5 |" in capsys.readouterr().out


def test_the_page_shows_what_the_committed_statistics_give(capsys):
    scale_model.main(["model"])
    printed = capsys.readouterr().out
    page = (_ROOT / "docs" / "scale_model.md").read_text()
    for line in printed.splitlines():
        if line.startswith("| "):
            assert line in page, line
