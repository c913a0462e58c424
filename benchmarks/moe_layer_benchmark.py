"""Time the MoE layer forward + backward: upstream Megatron-Core and the plugin, side by side.

    python benchmarks/moe_layer_benchmark.py                       # GPU: the issue's shapes
    python benchmarks/moe_layer_benchmark.py --preset cpu-smoke    # CPU: tiny shapes

Every configuration runs in this one process on the same inputs: router, dispatch, experts
and combine, forward and backward. Times are medians over --repeats after --warmup steps
(CUDA events on the GPU, perf_counter on the CPU). Prints a table of times, ratios against
upstream K4 rho=1 and K8 rho=1, router-only times and host-device syncs per step, and writes
JSON. Ratios are the result; absolute times only compare within one run.
"""

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

# (name, topk, rho, implementation)
CONFIGS = [
    ("upstream K4 rho=1", 4, 1.0, "upstream"),
    ("upstream K8 rho=1", 8, 1.0, "upstream"),
    ("upstream K2 rho=1", 2, 1.0, "upstream"),
    ("plugin K4 rho=1", 4, 1.0, "plugin"),
    ("plugin K8 rho=1", 8, 1.0, "plugin"),
    ("plugin K8 rho=0.5", 8, 0.5, "plugin"),
    ("plugin K2 rho=1", 2, 1.0, "plugin"),
    ("plugin K4 rho=0.5", 4, 0.5, "plugin"),
]
PRESETS = {  # hidden, experts, expert FFN (GLU), token counts, precisions
    "h100": dict(hidden=2048, experts=128, ffn=768, tokens=[16384, 65536], precisions=["bf16", "fp8"]),
    "cpu-smoke": dict(hidden=64, experts=8, ffn=32, tokens=[256], precisions=["fp32"]),
}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("outputs/moe_layer_benchmark.json"))
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 3:
        parser.error("--warmup must be >= 1 and --repeats >= 3")
    if args.preset != "cpu-smoke" and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset} needs CUDA; use --preset cpu-smoke here")
    return args


def build_layer(shape, topk, rho, implementation, precision, on_gpu):
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
        settings.update(fp8="hybrid", fp8_recipe="tensorwise",
                        moe_router_padding_for_quantization=True)
    config = TransformerConfig(**settings)
    if on_gpu:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=shape["experts"],
                                                          moe_grouped_gemm=True)
    else:
        spec = get_gpt_layer_local_spec(num_experts=shape["experts"], moe_grouped_gemm=False)
    if implementation == "plugin":
        spec = with_null_experts(spec, NullExpertConfig(real_fraction=rho))
    torch.manual_seed(0)
    layer = spec.submodules.mlp(config=config)
    layer.set_layer_number(1)
    if on_gpu:
        layer = layer.cuda()
    if precision in ("bf16", "fp8"):
        layer = layer.to(torch.bfloat16)
    return layer.train(), config


class Timer:
    """Median milliseconds of a step: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, on_gpu):
        self.on_gpu = on_gpu

    def measure(self, step, warmup, repeats):
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            if self.on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                step()
                times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)


def count_syncs(step, on_gpu):
    """Host-device synchronisations in one step (CUDA's sync debug mode; None on the CPU)."""
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def measure_config(shape, config_row, precision, hidden, grad, timer, args, on_gpu):
    """One configuration's row; its layer is freed when this returns."""
    name, topk, rho, implementation = config_row
    layer, config = build_layer(shape, topk, rho, implementation, precision, on_gpu)
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

    return {
        "precision": precision, "tokens": hidden.shape[0], "config": name,
        "layer_ms": timer.measure(layer_step, args.warmup, args.repeats),
        "router_ms": timer.measure(router_step, args.warmup, args.repeats),
        "syncs_per_step": count_syncs(layer_step, on_gpu),
    }


def benchmark(args):
    on_gpu = args.preset != "cpu-smoke"
    shape = PRESETS[args.preset]
    timer = Timer(on_gpu)
    device = "cuda" if on_gpu else "cpu"
    rows = []
    for precision in shape["precisions"]:
        dtype = torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32
        for tokens in shape["tokens"]:
            hidden = torch.randn(tokens, 1, shape["hidden"], device=device, dtype=dtype)
            grad = torch.randn_like(hidden)
            rows += [measure_config(shape, config_row, precision, hidden, grad, timer, args, on_gpu)
                     for config_row in CONFIGS]
    for row in rows:
        same = [r for r in rows if (r["precision"], r["tokens"]) == (row["precision"], row["tokens"])]
        for reference in ("upstream K4 rho=1", "upstream K8 rho=1"):
            base = next(r["layer_ms"] for r in same if r["config"] == reference)
            row[f"vs {reference}"] = row["layer_ms"] / base
    return rows


def table(rows):
    header = (f"{'precision':9} {'tokens':>7} {'config':20} {'layer ms':>9} {'router ms':>9} "
              f"{'/ up K4':>8} {'/ up K8':>8} {'syncs':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        syncs = "n/a" if r["syncs_per_step"] is None else str(r["syncs_per_step"])
        lines.append(f"{r['precision']:9} {r['tokens']:>7} {r['config']:20} {r['layer_ms']:9.2f} "
                     f"{r['router_ms']:9.2f} {r['vs upstream K4 rho=1']:8.3f} "
                     f"{r['vs upstream K8 rho=1']:8.3f} {syncs:>5}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    warnings.filterwarnings("ignore")
    from megatron_null_moe.process_groups import single_process_parallel_state

    on_cpu = args.preset == "cpu-smoke"
    if on_cpu:
        torch.set_num_threads(1)
    with single_process_parallel_state("cpu" if on_cpu else "cuda"):
        rows = benchmark(args)
    meta = {"preset": args.preset, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "warmup": args.warmup, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d")}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(table(rows))
    print(f"json: {args.output}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
