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
    assert [r["config"] for r in rows] == [c[0] for c in benchmark.CONFIGS]
    by_name = {r["config"]: r for r in rows}
    assert by_name["upstream K4 rho=1"]["vs upstream K4 rho=1"] == 1.0
    assert by_name["upstream K8 rho=1"]["vs upstream K8 rho=1"] == 1.0
    for row in rows:
        assert row["layer_ms"] > 0 and row["router_ms"] > 0
        assert row["vs upstream K8 rho=1"] == pytest.approx(
            row["layer_ms"] / by_name["upstream K8 rho=1"]["layer_ms"])
    saved = json.loads(output.read_text())
    assert saved["rows"] == rows and saved["targets"] == []  # targets only on a GPU preset
    assert saved["meta"]["complete"] is True
    for row in rows:
        if row["path"] == "lean":
            # Nothing after the router reads back to the host.
            assert row["syncs_per_step"] == row["router_syncs_per_step"]
            assert row["lean_fp8_gemms_per_step"] == 0  # FP32 here
        else:
            assert row["syncs_per_step"] > row["router_syncs_per_step"]
    assert "lean K8 rho=0.5" in capsys.readouterr().out


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
