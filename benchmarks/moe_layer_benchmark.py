"""Time the MoE layer forward + backward: upstream Megatron-Core and the plugin's two expert
paths, side by side, with every rho < 1 router held at its budget.

    python benchmarks/moe_layer_benchmark.py                       # GPU: Qwen3-30B-A3B's layer
    python benchmarks/moe_layer_benchmark.py --preset cpu          # CPU: compute-bound, < 5 min
    python benchmarks/moe_layer_benchmark.py --preset cpu-smoke    # CPU: tiny shapes

Every configuration runs in this one process on the same inputs: router, dispatch, experts
and combine, forward and backward. Paths: "upstream" (Megatron-Core's MoELayer), "plugin"
(null experts, Megatron's experts: TEGroupedMLP on the GPU, SequentialMLP on the CPU),
"lean" (null experts, --moe-null-expert-path lean; its buffer setting in the name, else
auto: real rows on the CPU, the worst case on a GPU).

At the budget: a fresh router routes far more than rho real (its null row is one more random
row), so before timing each rho < 1 router gets the null selection bias that a trained run's
budget controller holds: calibrated by bisection on the benchmark's own tokens
(``upcycle.router_init.calibrate_null_offset``). Each row reports the realised real fraction
and real experts per token of its timed steps; a row off rho by more than 0.01 is an error,
not a time.

Times are medians over --repeats after --warmup steps: GPU time by CUDA events and host time
by the wall clock until the step has been issued (perf_counter on the CPU, where both are the
same). On the CPU, freed memory stays in the process (--cpu-allocator cached), as CUDA's
caching allocator keeps it: glibc would otherwise unmap every buffer over 32 MiB and
page-fault it anew at each step, a cost of the CPU alone that falls on the largest buffers. Per step it also counts the aten ops dispatched (``ops_per_step``, forward and
backward: a device-independent proxy for kernel launches), host-device synchronisations
(CUDA's sync debug mode; on the CPU the calls that would synchronise), GPU kernels
(torch.profiler) and, for FP8 lean rows, FP8 grouped GEMMs (an FP8 lean row whose FP8 kernel
did not run is an error, not a BF16 time). The JSON is rewritten after every configuration,
so a run that is killed keeps what it measured. Prints a table with ratios against upstream
K4 rho=1 and K8 rho=1 and the targets of the preset, and writes JSON. Ratios are the result;
absolute times only compare within one run.
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
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Config(NamedTuple):
    name: str
    topk: int
    rho: float
    path: str
    lean_buffer: str = "auto"


CONFIGS = [
    Config("upstream K4 rho=1", 4, 1.0, "upstream"),
    Config("upstream K8 rho=1", 8, 1.0, "upstream"),
    Config("upstream K2 rho=1", 2, 1.0, "upstream"),
    Config("plugin K4 rho=1", 4, 1.0, "plugin"),
    Config("plugin K8 rho=1", 8, 1.0, "plugin"),
    Config("plugin K8 rho=0.5", 8, 0.5, "plugin"),
    Config("plugin K2 rho=1", 2, 1.0, "plugin"),
    Config("plugin K4 rho=0.5", 4, 0.5, "plugin"),
    Config("lean K4 rho=1", 4, 1.0, "lean"),
    Config("lean K8 rho=1", 8, 1.0, "lean"),
    Config("lean K8 rho=0.5", 8, 0.5, "lean"),
    Config("lean K2 rho=1", 2, 1.0, "lean"),
    Config("lean K4 rho=0.5", 4, 0.5, "lean"),
    # Both buffer settings, whichever auto picks on this device (last: skipped first for time).
    Config("lean K8 rho=0.5 real-rows", 8, 0.5, "lean", "real-rows"),
    Config("lean K8 rho=0.5 worst-case", 8, 0.5, "lean", "worst-case"),
]
PATHS = ("upstream", "plugin", "lean")
PRESETS = {  # hidden, experts, expert FFN (GLU), token counts, precisions, device, steps
    "h100": dict(hidden=2048, experts=128, ffn=768, tokens=[16384, 65536],
                 precisions=["bf16", "fp8"], device="cuda", warmup=5, repeats=20),
    "cpu": dict(hidden=512, experts=32, ffn=256, tokens=[4096], precisions=["fp32"],
                device="cpu", warmup=2, repeats=9),
    "cpu-smoke": dict(hidden=64, experts=8, ffn=32, tokens=[256], precisions=["fp32"],
                      device="cpu", warmup=5, repeats=20, threads=1),
}
CPU_ALLOCATORS = ("cached", "system")
BUDGET_TOLERANCE = 0.01
BUDGET_METHOD = (
    "null selection bias calibrated by bisection on the benchmark's tokens "
    "(megatron_null_moe.upcycle.router_init.calibrate_null_offset), as the budget controller "
    f"holds it; realised real fraction of the timed steps within +-{BUDGET_TOLERANCE} of rho")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the MoE layer forward + backward: upstream Megatron-Core and the "
                    "plugin's two expert paths, side by side, with every rho < 1 router held "
                    "at its budget. Prints a table of ratios and writes JSON.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100",
                        help="Shapes, precisions and device: h100 (the default; a GPU, hidden "
                             "2048, 128 experts of FFN 768, BF16 and FP8), cpu (hidden 512, 32 "
                             "experts, FP32) or cpu-smoke (tiny shapes).")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"A comma-separated subset of {', '.join(PATHS)} (default: all).")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Steps before timing (default: the preset's).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Timed steps, of which the median is taken (default: the "
                             "preset's).")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="Stop starting new configurations after this long (they are "
                             "listed as skipped), so that a run fits a time limit.")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="cached",
                        help="CPU presets: cached (the default) keeps freed memory in the "
                             "process, as CUDA's caching allocator does; system leaves glibc as "
                             "it is, which maps and page-faults every buffer over 32 MiB anew "
                             "at each step, a cost no GPU has.")
    parser.add_argument("--output", type=Path, default=Path("outputs/moe_layer_benchmark.json"),
                        help="The JSON file, rewritten after every configuration (default: "
                             "outputs/moe_layer_benchmark.json).")
    return parser


def parse_arguments(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    args.repeats = preset["repeats"] if args.repeats is None else args.repeats
    if args.warmup < 1 or args.repeats < 3:
        parser.error("--warmup must be >= 1 and --repeats >= 3")
    args.paths = [path for path in args.paths.split(",") if path]
    if not args.paths or any(path not in PATHS for path in args.paths):
        parser.error(f"--paths: choose from {', '.join(PATHS)}")
    if "upstream" not in args.paths:
        parser.error("--paths must include upstream: ratios are taken against it")
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset} needs CUDA; use --preset cpu or cpu-smoke here")
    return args


def build_layer(shape, config_row, precision, on_gpu):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_null_moe import NullExpertConfig, with_null_experts

    path = config_row.path
    settings = dict(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=16,
        num_moe_experts=shape["experts"], moe_ffn_hidden_size=shape["ffn"],
        ffn_hidden_size=4 * shape["hidden"], moe_router_topk=config_row.topk,
        gated_linear_unit=True, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
        moe_router_dtype="fp32", moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", use_cpu_initialization=not on_gpu,
        moe_grouped_gemm=on_gpu, moe_permute_fusion=on_gpu,
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
        null_config = NullExpertConfig(real_fraction=config_row.rho,
                                       lean_buffer=config_row.lean_buffer)
        spec = with_null_experts(spec, null_config, expert_path=expert_path)
    torch.manual_seed(0)
    layer = spec.submodules.mlp(config=config)
    layer.set_layer_number(1)
    if on_gpu:
        layer = layer.cuda()
    if precision in ("bf16", "fp8"):
        layer = layer.to(torch.bfloat16)
    return layer.train(), config


def hold_budget(router, hidden_SBH) -> float:
    """Set a rho < 1 router's null selection bias so that it routes its target real fraction
    of these tokens (what the budget controller holds in training); returns the bias."""
    from megatron_null_moe.upcycle.router_init import calibrate_null_offset

    inputs_TH = hidden_SBH.detach().reshape(-1, hidden_SBH.shape[-1]).float()
    with torch.no_grad():
        bias = calibrate_null_offset(inputs_TH, router.weight, router.null_weight,
                                     router.num_null_copies, router.topk,
                                     router.target_real_fraction, **router.selection_options)
        router.null_selection_bias.fill_(bias)
    router.null_bias_in_use = True  # as after a controller step: the losses see no bias
    return bias


# glibc's mallopt parameters and their defaults (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextlib.contextmanager
def cpu_malloc_cache():
    """glibc without mmap for large blocks and without trimming, for the duration: freed
    buffers are reused, as CUDA's caching allocator reuses them, instead of being unmapped
    and page-faulted anew at every step (yields whether it applied: glibc only)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield False
        return
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    try:
        yield applied
    finally:
        for parameter, value in _GLIBC_DEFAULTS.items():
            mallopt(parameter, value)


class BudgetError(RuntimeError):
    """A row whose realised real fraction is off its rho: its time would be the wrong work."""


def realised_real_fraction(router, rho, steps, tokens) -> float:
    """The real fraction the router chose over its last ``steps`` steps (counters popped)."""
    statistics_ = router.pop_routing_statistics()
    if statistics_.num_tokens != steps * tokens:
        raise BudgetError(f"routing statistics counted {statistics_.num_tokens} tokens, "
                          f"expected {steps} steps of {tokens}")
    fraction = statistics_.real_fraction
    if abs(fraction - rho) > BUDGET_TOLERANCE:
        raise BudgetError(f"realised real fraction {fraction:.4f} is off rho={rho} by more than "
                          f"{BUDGET_TOLERANCE}: not timed")
    return fraction


class Timer:
    """Median milliseconds of a step: (time the step took on the GPU, or the CPU; host time
    to issue it)."""

    def __init__(self, on_gpu):
        self.on_gpu = on_gpu

    def measure(self, step, warmup, repeats, after_warmup=lambda: None):
        for _ in range(warmup):
            step()
        after_warmup()
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


class AtenOpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (forward and the autograd engine's backward alike)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(step) -> int:
    with AtenOpCounter() as counter:
        step()
    return counter.count


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


def lean_buffer_used(layer, device) -> str:
    """The buffer a lean layer's dispatcher fills at EP = 1 on ``device``."""
    real = layer.token_dispatcher.holds_real_rows_only(torch.device(device))
    return "real-rows" if real else "worst-case"


def row_identity(precision, tokens, config_row) -> dict:
    """What names a row (JSON ``rows``), measured, failed or skipped alike."""
    return {"precision": precision, "tokens": tokens, "config": config_row.name,
            "path": config_row.path, "topk": config_row.topk, "rho": config_row.rho}


def measure_config(shape, config_row, precision, hidden, grad, timer, args, on_gpu):
    """One configuration's row; its layer is freed when this returns."""
    layer, config = build_layer(shape, config_row, precision, on_gpu)
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

    row = row_identity(precision, hidden.shape[0], config_row)
    null_router = config_row.path != "upstream"
    if config_row.path == "lean":
        row["lean_buffer"] = lean_buffer_used(layer, hidden.device)
    if null_router and layer.router.num_null_copies > 0:
        row["null_selection_bias"] = hold_budget(layer.router, x)
    fp8_gemms = None
    if precision == "fp8" and config_row.path == "lean":
        fp8_gemms = count_lean_fp8_gemms(layer_step)
        if not fp8_gemms:
            raise RuntimeError("the lean FP8 grouped GEMM did not run: this would time BF16")
    tokens = hidden.shape[0]

    def check_warmup_budget():
        if null_router:
            realised_real_fraction(layer.router, config_row.rho,
                                   args.warmup + (fp8_gemms is not None), tokens)

    layer_ms, host_ms = timer.measure(layer_step, args.warmup, args.repeats,
                                      after_warmup=check_warmup_budget)
    realised = (realised_real_fraction(layer.router, config_row.rho, args.repeats, tokens)
                if null_router else 1.0)  # upstream: K real experts per token by construction
    try:
        kernels, copies = count_kernels(layer_step, on_gpu)
    except Exception:  # a profiler problem must not cost the timings
        traceback.print_exc()
        kernels = copies = None
    row.update({
        "realised_real_fraction": realised, "real_experts_per_token": realised * config_row.topk,
        "layer_ms": layer_ms, "host_ms": host_ms,
        "router_ms": timer.measure(router_step, args.warmup, args.repeats)[0],
        "ops_per_step": count_aten_ops(layer_step),
        "syncs_per_step": count_syncs(layer_step, on_gpu),
        "router_syncs_per_step": count_syncs(router_step, on_gpu),
        "kernels_per_step": kernels, "dtoh_copies_per_step": copies,
        "lean_fp8_gemms_per_step": fp8_gemms,
    })
    return row


def benchmark(args, save=lambda rows: None):
    """All rows; ``save(rows)`` after each configuration."""
    shape = PRESETS[args.preset]
    on_gpu = shape["device"] == "cuda"
    timer = Timer(on_gpu)
    configs = [row for row in CONFIGS if row.path in args.paths]
    began, rows = time.monotonic(), []
    for precision in shape["precisions"]:
        dtype = torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32
        for tokens in shape["tokens"]:
            generator = torch.Generator().manual_seed(tokens)
            hidden = torch.randn(tokens, 1, shape["hidden"], generator=generator).to(
                shape["device"], dtype)
            grad = torch.randn(hidden.shape, generator=generator).to(shape["device"], dtype)
            for config_row in configs:
                base = row_identity(precision, tokens, config_row)
                if args.max_seconds is not None and time.monotonic() - began > args.max_seconds:
                    rows.append(dict(base, error=f"skipped: --max-seconds {args.max_seconds}"))
                    continue
                try:
                    rows.append(measure_config(shape, config_row, precision, hidden, grad,
                                               timer, args, on_gpu))
                except Exception as error:  # one failing configuration must not end the run
                    if not isinstance(error, BudgetError):
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
            base = _value(rows, row["precision"], row["tokens"], reference)
            row[f"vs {reference}"] = (row["layer_ms"] / base if "layer_ms" in row and base
                                      else None)


def _value(rows, precision, tokens, config, key="layer_ms"):
    return next((r.get(key) for r in rows if (r["precision"], r["tokens"], r["config"])
                 == (precision, tokens, config)), None)


def _check(target, value, base, limit):
    ratio = value / base if value is not None and base else None
    return {"target": target, "measured": ratio, "met": None if ratio is None else ratio <= limit}


def targets(rows, preset="h100"):
    """The targets of the preset: (target, measured, met). cpu-smoke has none (tiny shapes)."""
    if preset == "cpu-smoke" or not rows:
        return []
    results = []
    for precision in sorted({row["precision"] for row in rows}):
        for tokens in sorted({row["tokens"] for row in rows}):
            at = f"{precision} {tokens} tokens: "
            results += _kept_properties(rows, precision, tokens, at)
            ms = functools.partial(_value, rows, precision, tokens)
            if preset == "cpu":
                results += [_check(at + target, ms(config), ms(base), limit)
                            for target, config, base, limit in CPU_TARGETS]
    if preset == "h100":
        results += _gpu_targets(rows)
    return results


# The CPU targets (--preset cpu): (target, config, against, at most).
CPU_TARGETS = [
    ("lean K8 rho=0.5 <= 1.10x lean K4 rho=1", "lean K8 rho=0.5", "lean K4 rho=1", 1.10),
    ("lean K8 rho=0.5 <= 1.00x upstream K4 rho=1", "lean K8 rho=0.5", "upstream K4 rho=1", 1.00),
    ("lean K8 rho=1 <= 1.00x upstream K8 rho=1", "lean K8 rho=1", "upstream K8 rho=1", 1.00),
    ("plugin K8 rho=0.5 <= 1.05x upstream K4 rho=1", "plugin K8 rho=0.5", "upstream K4 rho=1",
     1.05),
]


def _kept_properties(rows, precision, tokens, at):
    """On every device: the lean path's aten ops at most 0.25x upstream's, and no host sync
    with the worst-case buffer (what makes it CUDA-graph capturable)."""
    mine = [r for r in rows if (r["precision"], r["tokens"]) == (precision, tokens)
            and "layer_ms" in r]
    lean_ops = [r["ops_per_step"] for r in mine
                if r.get("path") == "lean" and r.get("ops_per_step") is not None]
    upstream_ops = _value(rows, precision, tokens, "upstream K4 rho=1", "ops_per_step")
    worst_case = [r["syncs_per_step"] for r in mine if r.get("lean_buffer") == "worst-case"]
    syncs = max(worst_case) if worst_case else None
    return [
        _check(at + "lean ops per step <= 0.25x upstream K4 rho=1 (every lean row)",
               max(lean_ops) if lean_ops else None, upstream_ops, 0.25),
        {"target": at + "lean worst-case buffer: 0 host syncs per step", "measured": syncs,
         "met": None if syncs is None else syncs == 0},
    ]


def _gpu_targets(rows):
    """The GPU targets (h100 preset, ratios within the same run), evaluated at the budget."""
    results = []
    largest = max(row["tokens"] for row in rows)
    for path in ("plugin", "lean"):
        config = f"{path} K8 rho=0.5"
        for precision in sorted({row["precision"] for row in rows}):
            ms = functools.partial(_value, rows, precision)
            checks = [(f"{config} <= 1.00x upstream K4 rho=1 at {tokens} tokens",
                       ms(tokens, config), ms(tokens, "upstream K4 rho=1"), 1.00)
                      for tokens in sorted({row["tokens"] for row in rows})]
            checks.append((f"{config} <= 0.55x upstream K8 rho=1 at {largest} tokens",
                           ms(largest, config), ms(largest, "upstream K8 rho=1"), 0.55))
            results += [_check(f"{precision}: {target}", value, base, limit)
                        for target, value, base, limit in checks]
        smallest = min(row["tokens"] for row in rows)
        stretch = _value(rows, "bf16", smallest, config)
        results.append({"target": f"stretch: {config} bf16 at {smallest} tokens in 10 ms",
                        "measured": stretch, "met": None if stretch is None else stretch <= 10})
        fp8, bf16 = (_value(rows, p, largest, config) for p in ("fp8", "bf16"))
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
    header = (f"{'precision':9} {'tokens':>6} {'config':26} {'layer ms':>8} {'host ms':>8} "
              f"{'router':>7} {'/up K4':>6} {'/up K8':>6} {'real fr':>7} {'real/tok':>8} "
              f"{'ops':>5} {'syncs':>5} {'kernels':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        start = f"{r['precision']:9} {r['tokens']:>6} {r['config']:26} "
        if "error" in r:
            lines.append(start + r["error"][:100])
            continue
        lines.append(start + " ".join([
            _cell(r["layer_ms"], 8), _cell(r["host_ms"], 8), _cell(r["router_ms"], 7),
            _cell(r["vs upstream K4 rho=1"], 6), _cell(r["vs upstream K8 rho=1"], 6),
            _cell(r.get("realised_real_fraction"), 7, 4),
            _cell(r.get("real_experts_per_token"), 8, 3), _cell(r.get("ops_per_step"), 5),
            _cell(r["syncs_per_step"], 5), _cell(r["kernels_per_step"], 7)]))
    for target in target_rows:
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"target {target['target']}: {_cell(target['measured'], 0, 3).strip()} "
                     f"-> {met}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    warnings.filterwarnings("ignore")
    from megatron_null_moe.cli import environment_line, silence_fallback_warnings

    silence_fallback_warnings()  # torch's CUDA probe logs, which the filter above misses
    from megatron_null_moe.process_groups import single_process_parallel_state

    preset = PRESETS[args.preset]
    on_cpu = preset["device"] == "cpu"
    line = environment_line(not on_cpu, layers="local layers" if on_cpu else None)
    if line:
        print(line)
    if "threads" in preset:
        torch.set_num_threads(preset["threads"])
    meta = {"preset": args.preset, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if not on_cpu else "cpu",
            "threads": torch.get_num_threads(), "warmup": args.warmup,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
            "budget": BUDGET_METHOD}
    meta.update(_versions())
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save(rows, complete=False):
        target_rows = targets(rows, args.preset)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(json.dumps({"meta": dict(meta, complete=complete), "rows": rows,
                                       "targets": target_rows}, indent=2))
        partial.replace(args.output)  # a kill mid-write leaves the previous JSON whole
        return target_rows

    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if on_cpu and args.cpu_allocator == "cached":
            cached = stack.enter_context(cpu_malloc_cache())
            meta["cpu_allocator"] = "cached" if cached else "system (no glibc)"
        elif on_cpu:
            meta["cpu_allocator"] = "system"
        stack.enter_context(single_process_parallel_state("cpu" if on_cpu else "cuda"))
        rows = benchmark(args, save)
    meta["seconds"] = round(time.monotonic() - began)
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
