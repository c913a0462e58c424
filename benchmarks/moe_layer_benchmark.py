"""Time the MoE layer forward + backward: upstream Megatron-Core and the plugin's two expert
paths, side by side.

    python benchmarks/moe_layer_benchmark.py                       # GPU: the issue's shapes
    python benchmarks/moe_layer_benchmark.py --preset cpu-smoke    # CPU: tiny shapes

Every configuration runs in this one process on the same inputs: router, dispatch, experts
and combine, forward and backward. Paths: "upstream" (Megatron-Core's MoELayer), "plugin"
(null experts, Megatron's experts: TEGroupedMLP on the GPU, SequentialMLP on the CPU),
"lean" (null experts, --moe-null-expert-path lean). Times are medians over --repeats after
--warmup steps: GPU time by CUDA events and host time by the wall clock until the step has
been issued (perf_counter on the CPU, where both are the same). Per step it also counts
host-device synchronisations (CUDA's sync debug mode; on the CPU the calls that would
synchronise), GPU kernels (torch.profiler) and, on the lean path, FP8 grouped GEMMs (an FP8
lean row whose FP8 kernel did not run is an error, not a BF16 time). The JSON is rewritten
after every configuration, so a run that is killed keeps what it measured. Prints a table
with ratios against upstream K4 rho=1 and K8 rho=1 and the issue's targets, and writes JSON.
Ratios are the result; absolute times only compare within one run.
"""

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

# (name, topk, rho, path)
CONFIGS = [
    ("upstream K4 rho=1", 4, 1.0, "upstream"),
    ("upstream K8 rho=1", 8, 1.0, "upstream"),
    ("upstream K2 rho=1", 2, 1.0, "upstream"),
    ("plugin K4 rho=1", 4, 1.0, "plugin"),
    ("plugin K8 rho=1", 8, 1.0, "plugin"),
    ("plugin K8 rho=0.5", 8, 0.5, "plugin"),
    ("plugin K2 rho=1", 2, 1.0, "plugin"),
    ("plugin K4 rho=0.5", 4, 0.5, "plugin"),
    ("lean K4 rho=1", 4, 1.0, "lean"),
    ("lean K8 rho=1", 8, 1.0, "lean"),
    ("lean K8 rho=0.5", 8, 0.5, "lean"),
    ("lean K2 rho=1", 2, 1.0, "lean"),
    ("lean K4 rho=0.5", 4, 0.5, "lean"),
]
PATHS = ("upstream", "plugin", "lean")
PRESETS = {  # hidden, experts, expert FFN (GLU), token counts, precisions
    "h100": dict(hidden=2048, experts=128, ffn=768, tokens=[16384, 65536], precisions=["bf16", "fp8"]),
    "cpu-smoke": dict(hidden=64, experts=8, ffn=32, tokens=[256], precisions=["fp32"]),
}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop starting new configurations after this long (they are "
                             "listed as skipped), so that a run fits a time limit")
    parser.add_argument("--output", type=Path, default=Path("outputs/moe_layer_benchmark.json"))
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 3:
        parser.error("--warmup must be >= 1 and --repeats >= 3")
    args.paths = [path for path in args.paths.split(",") if path]
    if not args.paths or any(path not in PATHS for path in args.paths):
        parser.error(f"--paths: choose from {', '.join(PATHS)}")
    if "upstream" not in args.paths:
        parser.error("--paths must include upstream: ratios are taken against it")
    if args.preset != "cpu-smoke" and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset} needs CUDA; use --preset cpu-smoke here")
    return args


def build_layer(shape, topk, rho, path, precision, on_gpu):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_null_moe import NullExpertConfig, with_null_experts

    settings = dict(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=16,
        num_moe_experts=shape["experts"], moe_ffn_hidden_size=shape["ffn"],
        ffn_hidden_size=4 * shape["hidden"], moe_router_topk=topk, gated_linear_unit=True,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, moe_router_dtype="fp32",
        moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss",
        use_cpu_initialization=not on_gpu, moe_grouped_gemm=on_gpu, moe_permute_fusion=on_gpu,
    )
    if precision in ("bf16", "fp8"):
        settings.update(bf16=True, params_dtype=torch.bfloat16)
    if precision == "fp8":
        # The lean experts scale per row themselves; Megatron's pad each expert's tokens.
        settings.update(fp8="hybrid", fp8_recipe="tensorwise",
                        moe_router_padding_for_quantization=path != "lean")
    config = TransformerConfig(**settings)
    if on_gpu:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=shape["experts"],
                                                          moe_grouped_gemm=True)
    else:
        spec = get_gpt_layer_local_spec(num_experts=shape["experts"], moe_grouped_gemm=False)
    if path != "upstream":
        expert_path = "lean" if path == "lean" else "megatron"
        spec = with_null_experts(spec, NullExpertConfig(real_fraction=rho),
                                 expert_path=expert_path)
    torch.manual_seed(0)
    layer = spec.submodules.mlp(config=config)
    layer.set_layer_number(1)
    if on_gpu:
        layer = layer.cuda()
    if precision in ("bf16", "fp8"):
        layer = layer.to(torch.bfloat16)
    return layer.train(), config


class Timer:
    """Median milliseconds of a step: (device time, host time to issue it)."""

    def __init__(self, on_gpu):
        self.on_gpu = on_gpu

    def measure(self, step, warmup, repeats):
        for _ in range(warmup):
            step()
        device, host = [], []
        for _ in range(repeats):
            if self.on_gpu:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            began = time.perf_counter()
            step()
            host.append((time.perf_counter() - began) * 1e3)
            if self.on_gpu:
                end.record()
                end.synchronize()
                device.append(start.elapsed_time(end))
        host_ms = statistics.median(host)
        return (statistics.median(device) if self.on_gpu else host_ms), host_ms


def count_syncs(step, on_gpu):
    """Host-device synchronisations in one step (on the CPU: calls that would synchronise)."""
    from megatron_null_moe.host_syncs import count_cuda_syncs, count_sync_ops

    return count_cuda_syncs(step) if on_gpu else len(count_sync_ops(step))


def count_kernels(step, on_gpu):
    """(GPU kernels, device-to-host copies) of one step (None on the CPU)."""
    if not on_gpu:
        return None, None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize()
    device_events = [event.name for event in profiler.events()
                     if event.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(name.startswith("Memcpy DtoH") for name in device_events)
    return sum(not name.startswith(("Memcpy", "Memset")) for name in device_events), copies


def count_lean_fp8_gemms(step):
    """Calls of the lean path's FP8 grouped linear in one step (forward: fc1 and fc2)."""
    from megatron_null_moe.lean import grouped_gemm

    original, calls = grouped_gemm.fp8_grouped_linear, []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    grouped_gemm.fp8_grouped_linear = counted
    try:
        step()
    finally:
        grouped_gemm.fp8_grouped_linear = original
    return len(calls)


def measure_config(shape, config_row, precision, hidden, grad, timer, args, on_gpu):
    """One configuration's row; its layer is freed when this returns."""
    name, topk, rho, path = config_row
    layer, config = build_layer(shape, topk, rho, path, precision, on_gpu)
    context = contextlib.nullcontext
    if precision == "fp8":
        from megatron.core.fp8_utils import get_fp8_context

        context = functools.partial(get_fp8_context, config)
    x = hidden.clone().requires_grad_(True)

    def layer_step():
        with context():
            output, _ = layer(x)
        output.backward(grad)

    def router_step():
        probs, _ = layer.router(x)
        probs.float().sum().backward()

    fp8_gemms = count_lean_fp8_gemms(layer_step) if path == "lean" else None
    if precision == "fp8" and path == "lean" and not fp8_gemms:
        raise RuntimeError("the lean FP8 grouped GEMM did not run: this would time BF16")
    layer_ms, host_ms = timer.measure(layer_step, args.warmup, args.repeats)
    try:
        kernels, copies = count_kernels(layer_step, on_gpu)
    except Exception:  # a profiler problem must not cost the timings
        traceback.print_exc()
        kernels = copies = None
    return {
        "precision": precision, "tokens": hidden.shape[0], "config": name, "path": path,
        "layer_ms": layer_ms, "host_ms": host_ms,
        "router_ms": timer.measure(router_step, args.warmup, args.repeats)[0],
        "syncs_per_step": count_syncs(layer_step, on_gpu),
        "router_syncs_per_step": count_syncs(router_step, on_gpu),
        "kernels_per_step": kernels, "dtoh_copies_per_step": copies,
        "lean_fp8_gemms_per_step": fp8_gemms,
    }


def benchmark(args, save=lambda rows: None):
    """All rows; ``save(rows)`` after each configuration."""
    on_gpu = args.preset != "cpu-smoke"
    shape = PRESETS[args.preset]
    timer = Timer(on_gpu)
    device = "cuda" if on_gpu else "cpu"
    configs = [row for row in CONFIGS if row[3] in args.paths]
    began, rows = time.monotonic(), []
    for precision in shape["precisions"]:
        dtype = torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32
        for tokens in shape["tokens"]:
            hidden = torch.randn(tokens, 1, shape["hidden"], device=device, dtype=dtype)
            grad = torch.randn_like(hidden)
            for config_row in configs:
                base = {"precision": precision, "tokens": tokens, "config": config_row[0],
                        "path": config_row[3]}
                if args.max_seconds is not None and time.monotonic() - began > args.max_seconds:
                    rows.append(dict(base, error=f"skipped: --max-seconds {args.max_seconds}"))
                    continue
                try:
                    rows.append(measure_config(shape, config_row, precision, hidden, grad,
                                               timer, args, on_gpu))
                except Exception as error:  # one failing configuration must not end the run
                    traceback.print_exc()
                    rows.append(dict(base, error=f"{type(error).__name__}: {error}"))
                if on_gpu:
                    torch.cuda.empty_cache()
                add_ratios(rows)
                save(rows)
    return rows


def add_ratios(rows):
    """Each row's time over upstream K4 rho=1 and K8 rho=1 at its precision and size."""
    for row in rows:
        for reference in ("upstream K4 rho=1", "upstream K8 rho=1"):
            base = _layer_ms(rows, row["precision"], row["tokens"], reference)
            row[f"vs {reference}"] = (row["layer_ms"] / base if "layer_ms" in row and base
                                      else None)


def _layer_ms(rows, precision, tokens, config):
    return next((r.get("layer_ms") for r in rows if (r["precision"], r["tokens"], r["config"])
                 == (precision, tokens, config)), None)


def targets(rows):
    """The issue's targets, for each null-expert path: (target, measured, met)."""
    results = []
    largest = max(row["tokens"] for row in rows)
    for path in ("plugin", "lean"):
        config = f"{path} K8 rho=0.5"
        for precision in sorted({row["precision"] for row in rows}):
            ms = functools.partial(_layer_ms, rows, precision)
            checks = [(f"{config} <= 1.00x upstream K4 rho=1 at {tokens} tokens",
                       ms(tokens, config), ms(tokens, "upstream K4 rho=1"), 1.00)
                      for tokens in sorted({row["tokens"] for row in rows})]
            checks.append((f"{config} <= 0.55x upstream K8 rho=1 at {largest} tokens",
                           ms(largest, config), ms(largest, "upstream K8 rho=1"), 0.55))
            for target, value, base, limit in checks:
                ratio = value / base if value and base else None
                results.append({"target": f"{precision}: {target}", "measured": ratio,
                                "met": None if ratio is None else ratio <= limit})
        smallest = min(row["tokens"] for row in rows)
        stretch = _layer_ms(rows, "bf16", smallest, config)
        results.append({"target": f"stretch: {config} bf16 at {smallest} tokens in 10 ms",
                        "measured": stretch, "met": None if stretch is None else stretch <= 10})
        fp8, bf16 = (_layer_ms(rows, p, largest, config) for p in ("fp8", "bf16"))
        ratio = fp8 / bf16 if fp8 and bf16 else None
        results.append({"target": f"{config} fp8 faster than bf16 at {largest} tokens",
                        "measured": ratio, "met": None if ratio is None else ratio < 1})
    return results


def _cell(value, width, digits=2):
    if value is None:
        return f"{'n/a':>{width}}"
    if isinstance(value, float):
        return f"{value:{width}.{digits}f}"
    return f"{value:>{width}}"


def table(rows, target_rows=()):
    header = (f"{'precision':9} {'tokens':>6} {'config':18} {'layer ms':>8} {'host ms':>8} "
              f"{'router':>7} {'/up K4':>7} {'/up K8':>7} {'syncs':>5} {'kernels':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        start = f"{r['precision']:9} {r['tokens']:>6} {r['config']:18} "
        if "error" in r:
            lines.append(start + r["error"][:80])
            continue
        lines.append(start + " ".join([
            _cell(r["layer_ms"], 8), _cell(r["host_ms"], 8), _cell(r["router_ms"], 7),
            _cell(r["vs upstream K4 rho=1"], 7, 3), _cell(r["vs upstream K8 rho=1"], 7, 3),
            _cell(r["syncs_per_step"], 5), _cell(r["kernels_per_step"], 7)]))
    for target in target_rows:
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"target {target['target']}: {_cell(target['measured'], 0, 3).strip()} "
                     f"-> {met}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    warnings.filterwarnings("ignore")
    from megatron_null_moe.process_groups import single_process_parallel_state

    on_cpu = args.preset == "cpu-smoke"
    if on_cpu:
        torch.set_num_threads(1)
    meta = {"preset": args.preset, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "warmup": args.warmup, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d")}
    meta.update(_versions())
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save(rows, complete=False):
        # CPU smoke times say nothing about GPU speed: no targets there.
        target_rows = targets(rows) if not on_cpu else []
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(json.dumps({"meta": dict(meta, complete=complete), "rows": rows,
                                       "targets": target_rows}, indent=2))
        partial.replace(args.output)  # a kill mid-write leaves the previous JSON whole
        return target_rows

    with single_process_parallel_state("cpu" if on_cpu else "cuda"):
        rows = benchmark(args, save)
    target_rows = save(rows, complete=True)
    print(" ".join(f"{key}={value}" for key, value in meta.items()))
    print(table(rows, target_rows))
    print(f"json: {args.output}", file=sys.stderr)
    return rows


def _versions():
    import megatron.core

    versions = {"megatron_core": megatron.core.__version__}
    try:
        import transformer_engine

        versions["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        versions["transformer_engine"] = None
    return versions


if __name__ == "__main__":
    # Exit status 1 when a configuration failed (skipped for time is not a failure).
    sys.exit(any(not row.get("error", "skipped").startswith("skipped") for row in main()))
