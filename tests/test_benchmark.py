"""The MoE layer benchmark runs on the CPU at a tiny size and reports side-by-side ratios."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).parent.parent / "benchmarks" / "moe_layer_benchmark.py"
_spec = importlib.util.spec_from_file_location("moe_layer_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_cpu_smoke_run_reports_every_path_and_config_with_ratios(tmp_path, capsys):
    output = tmp_path / "bench.json"
    rows = benchmark.main(["--preset", "cpu-smoke", "--warmup", "1", "--repeats", "3",
                           "--output", str(output)])
    assert [r["config"] for r in rows] == [c.name for c in benchmark.CONFIGS]
    by_name = {r["config"]: r for r in rows}
    assert by_name["upstream K4 rho=1"]["vs upstream K4 rho=1"] == 1.0
    assert by_name["upstream K8 rho=1"]["vs upstream K8 rho=1"] == 1.0
    for row in rows:
        assert row["layer_ms"] > 0 and row["router_ms"] > 0
        assert row["vs upstream K8 rho=1"] == pytest.approx(
            row["layer_ms"] / by_name["upstream K8 rho=1"]["layer_ms"])
        # Other tools read these fields.
        assert {"config", "path", "topk", "rho", "realised_real_fraction", "layer_ms",
                "ops_per_step", "syncs_per_step"} <= set(row)
        # At the budget in the timed steps; each rho < 1 row got a calibrated bias.
        assert abs(row["realised_real_fraction"] - row["rho"]) <= 0.01
        assert row["real_experts_per_token"] == pytest.approx(
            row["realised_real_fraction"] * row["topk"])
        assert ("null_selection_bias" in row) == (row["rho"] < 1)
    saved = json.loads(output.read_text())
    assert saved["rows"] == rows and saved["targets"] == []  # no targets at tiny shapes
    assert saved["meta"]["complete"] is True and "calibrate_null_offset" in saved["meta"]["budget"]
    assert saved["meta"]["cpu_allocator"] == "cached"  # glibc here; restored after the run
    upstream_ops = by_name["upstream K4 rho=1"]["ops_per_step"]
    for row in rows:
        if row["path"] == "lean":
            # auto is real-rows on the CPU: its one host read is the real count.
            reads = {"real-rows": 1, "worst-case": 0}[row["lean_buffer"]]
            assert row["syncs_per_step"] == row["router_syncs_per_step"] + reads
            assert row["lean_buffer"] == ("worst-case" if "worst-case" in row["config"]
                                          else "real-rows")
            assert row["lean_fp8_gemms_per_step"] is None  # FP32 here
            assert row["ops_per_step"] < upstream_ops
        else:
            assert row["syncs_per_step"] > row["router_syncs_per_step"]
    out = capsys.readouterr().out
    assert "lean K8 rho=0.5" in out and "budget=null selection bias calibrated" in out


def test_lean_ops_per_step_at_most_a_quarter_of_upstreams_at_32_experts():
    """The --preset cpu shape's expert count (upstream's SequentialMLP dispatches ops per
    expert; the lean path's count does not grow with experts), tiny otherwise."""
    from megatron_null_moe.process_groups import single_process_parallel_state

    shape = dict(hidden=64, experts=32, ffn=32)
    hidden = torch.randn(64, 1, 64)
    ops = {}
    with single_process_parallel_state("cpu"):
        for config in (benchmark.CONFIGS[0],
                       benchmark.Config("lean K8 rho=0.5", 8, 0.5, "lean"),
                       benchmark.Config("lean", 8, 0.5, "lean", "worst-case")):
            layer, _ = benchmark.build_layer(shape, config, "fp32", on_gpu=False)
            x = hidden.clone().requires_grad_(True)
            ops[config.lean_buffer if config.path == "lean" else "upstream"] = \
                benchmark.count_aten_ops(lambda: layer(x)[0].sum().backward())
    assert ops["auto"] <= 0.25 * ops["upstream"] and ops["worst-case"] <= 0.25 * ops["upstream"]


def test_a_row_off_the_budget_is_an_error_not_a_time(tmp_path, monkeypatch):
    """Without the calibrated bias (here: one that makes every slot real) the row is refused."""

    def wrong_bias(router, hidden):
        router.null_selection_bias.fill_(-1e4)
        return -1e4

    monkeypatch.setattr(benchmark, "hold_budget", wrong_bias)
    monkeypatch.setattr(benchmark, "CONFIGS", [benchmark.CONFIGS[0], benchmark.Config(
        "lean K8 rho=0.5", 8, 0.5, "lean")])
    rows = benchmark.main(["--preset", "cpu-smoke", "--warmup", "1", "--repeats", "3",
                           "--output", str(tmp_path / "bench.json")])
    assert "layer_ms" not in rows[1]
    assert rows[1]["error"].startswith("BudgetError: realised real fraction 1.0000 is off "
                                       "rho=0.5 by more than 0.01")


def test_json_is_kept_up_to_date_when_the_run_is_killed(tmp_path, monkeypatch):
    """A kill (here: an interrupt after two configurations) keeps the rows measured so far."""
    measured = []

    def fake_measure(shape, config_row, precision, hidden, *rest):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(config_row[0])
        return {"precision": precision, "tokens": hidden.shape[0], "config": config_row[0],
                "path": config_row[3], "layer_ms": 1.0}

    monkeypatch.setattr(benchmark, "measure_config", fake_measure)
    output = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--preset", "cpu-smoke", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert [r["config"] for r in saved["rows"]] == measured
    assert saved["meta"]["complete"] is False


def test_lean_fp8_gemms_are_counted(monkeypatch):
    from megatron_null_moe.lean import fp8, grouped_gemm

    monkeypatch.setattr(fp8.Fp8GroupedLinear, "apply", lambda *args: None)
    step = lambda: [grouped_gemm.fp8_grouped_linear(None, None, None) for _ in range(2)]
    assert benchmark.count_lean_fp8_gemms(step) == 2
    assert grouped_gemm.fp8_grouped_linear.__name__ == "fp8_grouped_linear"  # restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_preset_refused_without_cuda(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(["--preset", "h100"])
    assert "needs CUDA" in capsys.readouterr().err


def test_targets_follow_the_issue():
    rows = [{"precision": "bf16", "tokens": tokens, "config": config, "layer_ms": ms}
            for tokens, config, ms in [(16384, "upstream K4 rho=1", 20.0),
                                       (16384, "upstream K8 rho=1", 25.0),
                                       (16384, "lean K8 rho=0.5", 9.0),
                                       (65536, "upstream K4 rho=1", 30.0),
                                       (65536, "upstream K8 rho=1", 50.0),
                                       (65536, "lean K8 rho=0.5", 30.0)]]
    met = {t["target"]: t["met"] for t in benchmark.targets(rows)}
    assert met["bf16: lean K8 rho=0.5 <= 1.00x upstream K4 rho=1 at 16384 tokens"] is True
    assert met["bf16: lean K8 rho=0.5 <= 1.00x upstream K4 rho=1 at 65536 tokens"] is True
    assert met["bf16: lean K8 rho=0.5 <= 0.55x upstream K8 rho=1 at 65536 tokens"] is False
    assert met["stretch: lean K8 rho=0.5 bf16 at 16384 tokens in 10 ms"] is True
    assert met["lean K8 rho=0.5 fp8 faster than bf16 at 65536 tokens"] is None
    assert met["bf16: plugin K8 rho=0.5 <= 1.00x upstream K4 rho=1 at 16384 tokens"] is None


def test_cpu_preset_targets_follow_issue_14():
    ms = {"upstream K4 rho=1": 400.0, "upstream K8 rho=1": 750.0, "plugin K8 rho=0.5": 430.0,
          "lean K4 rho=1": 330.0, "lean K8 rho=1": 640.0, "lean K8 rho=0.5": 350.0,
          "lean K8 rho=0.5 worst-case": 450.0}
    rows = [{"precision": "fp32", "tokens": 4096, "config": config, "layer_ms": value,
             "path": config.split()[0], "ops_per_step": 1100 if "upstream" in config else 250,
             "syncs_per_step": 0 if "upstream" not in config else 7,
             **({"lean_buffer": "worst-case"} if "worst-case" in config else {})}
            for config, value in ms.items()]
    found = {t["target"].removeprefix("fp32 4096 tokens: "): t
             for t in benchmark.targets(rows, "cpu")}
    assert found["lean K8 rho=0.5 <= 1.10x lean K4 rho=1"]["met"] is True  # 1.06
    assert found["lean K8 rho=0.5 <= 1.10x lean K4 rho=1"]["measured"] == pytest.approx(350 / 330)
    assert found["lean K8 rho=0.5 <= 1.00x upstream K4 rho=1"]["met"] is True
    assert found["lean K8 rho=1 <= 1.00x upstream K8 rho=1"]["met"] is True
    assert found["plugin K8 rho=0.5 <= 1.05x upstream K4 rho=1"]["met"] is False  # 1.075
    ops = found["lean ops per step <= 0.25x upstream K4 rho=1 (every lean row)"]
    assert ops["met"] is True and ops["measured"] == pytest.approx(250 / 1100)
    assert found["lean worst-case buffer: 0 host syncs per step"]["met"] is True
    assert not any("upstream K8 rho=1 at" in target for target in found)  # GPU targets apart
    assert benchmark.targets(rows, "cpu-smoke") == []
