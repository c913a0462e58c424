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


def test_cpu_smoke_run_reports_every_config_with_ratios(tmp_path, capsys):
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
    assert json.loads(output.read_text())["rows"] == rows
    assert "plugin K8 rho=0.5" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_preset_refused_without_cuda(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(["--preset", "h100"])
    assert "needs CUDA" in capsys.readouterr().err
