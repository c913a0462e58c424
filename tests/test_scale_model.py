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
    scale_model.main(["model", "--statistics", str(statistics), "--group-topk", "1"])
    printed = capsys.readouterr().out
    assert "| 2 (1) | 1 (binds nothing: 1 node) |" in printed and "| 4 (2) | 1 |" in printed


def test_the_page_shows_what_the_committed_statistics_give(capsys):
    scale_model.main(["model"])
    printed = capsys.readouterr().out
    page = (_ROOT / "docs" / "scale_model.md").read_text()
    for line in printed.splitlines():
        if line.startswith("| "):
            assert line in page, line


# ---- node-limited routing (--group-topk) --------------------------------------------------

def _committed_rows(group_topk=None):
    measured = json.loads(scale_model.STATISTICS.read_text())
    hardware = scale_model.hardware_of(scale_model.parse_arguments(["model"]))
    return scale_model.model_rows(measured["configs"], dict(scale_model.QWEN3_30B_A3B, tokens=4096),
                                  hardware, group_topk, measured["how"]["gpus_per_node"])


def test_node_limit_charges_a_share_of_the_inter_node_rows_to_nvlink():
    share = scale_model.remote_node_share
    assert share(8.0, 1, 8) == 1 / 8 and share(4.05, 2, 8) == 2 / 4.05
    assert share(4.0, 1, 2) == 0.5  # a token's 4 real rows reach at most the 2 nodes
    assert share(8.0, 8, 8) == share(3.0, 4, 8) == 1.0  # binds nothing
    statistics = {f"{name}_{which}": value for which, scale in (("mean", 1.0), ("max", 1.5))
                  for name, value in (("expert_rows", 4.0 * scale), ("nvlink_rows", 0.5 * scale),
                                      ("infiniband_rows", 3.5 * scale),
                                      ("exchanged_rows", 8.0 * scale))}
    limited = scale_model.node_limited(statistics, 1, 8)  # share 1/4 (4 real rows, mean)
    for which in ("mean", "max"):
        remote = statistics[f"infiniband_rows_{which}"]
        assert limited[f"infiniband_rows_{which}"] == pytest.approx(remote / 4)
        assert limited[f"nvlink_rows_{which}"] == pytest.approx(
            statistics[f"nvlink_rows_{which}"] + remote * 3 / 4)
        for name in ("expert_rows", "exchanged_rows"):
            assert limited[f"{name}_{which}"] == statistics[f"{name}_{which}"]
    assert scale_model.node_limited(statistics, 8, 8) == statistics


def test_node_limit_off_or_binding_nothing_changes_no_number(capsys):
    off = scale_model.main(["model"])
    printed_off = capsys.readouterr().out
    by_limit = scale_model.main(["model", "--group-topk", "8,4"])
    printed = capsys.readouterr().out
    assert printed.startswith(printed_off)  # the tables without the limit, unchanged
    assert by_limit[None] == off and by_limit[8] == off  # g = nodes of every EP group
    page = (_ROOT / "docs" / "scale_model.md").read_text()
    assert printed[len(printed_off):].strip().splitlines()[0] in page  # the table's header
    for group_topk in (1, 2, 4):  # EP 8, 16, 32: 1, 2, 4 nodes
        limited = _committed_rows(group_topk)
        assert [row for row in limited if row["ep"] <= 8 * group_topk] == \
            [row for row in off if row["ep"] <= 8 * group_topk]


def test_smaller_node_limits_cut_inter_node_bytes_and_never_slow_a_step():
    off = _committed_rows()
    previous = off
    for group_topk in range(8, 0, -1):
        limited = _committed_rows(group_topk)
        for row, before, unlimited in zip(limited, previous, off):
            assert (row["ep"], row["config"]) == (before["ep"], before["config"])
            for which in ("mean", "max"):
                for key in ("infiniband_bytes", "alltoall_seconds", "seconds"):
                    assert row[which][key] <= before[which][key] * (1 + 1e-12)
                assert row[which]["expert_flops"] == unlimited[which]["expert_flops"]
            # EP 16-64, the limit binds: fewer nodes than the group's and than a token's
            # real rows (4 to 8) reach
            if group_topk < min(row["ep"] // 8, 4):
                assert row["max"]["infiniband_bytes"] < 0.99 * unlimited["max"]["infiniband_bytes"]
                assert row["max"]["seconds"] < 0.99 * unlimited["max"]["seconds"]
        previous = limited


@pytest.mark.parametrize("value", ["0", "9", "1,9", "two", "-1", "1.5"])
def test_node_limits_outside_one_to_the_nodes_are_refused(value, capsys):
    with pytest.raises(SystemExit) as refused:
        scale_model.main(["model", f"--group-topk={value}"])
    assert str(refused.value) == (
        f"error: --group-topk {value}: each value must be a whole number from 1 to 8 "
        "(the nodes of EP 64 at 8 GPUs per node)")
    assert capsys.readouterr().out == ""
