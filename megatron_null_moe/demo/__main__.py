"""python -m megatron_null_moe.demo: does rho < 1 beat rho = 1 at matched expert FLOPs, and
does the budget hold?

Trains each configuration from each seed on the bundled digit-and-caption task, then writes
report.md (with PNG plots), summary.json, runs.json and TensorBoard logs to --output.
"""

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

from megatron_null_moe.cli import quiet_if_command

quiet_if_command(__name__)  # before Megatron is imported (workers: runs.train_all)

import torch  # noqa: E402

from megatron_null_moe.cli import environment_line  # noqa: E402
from megatron_null_moe.demo.runs import train_all  # noqa: E402
from megatron_null_moe.demo.train import DemoModel, RoutingSetup  # noqa: E402

DEFAULT_CONFIGS = ["K2_1.0", "K4_0.5", "K4_0.5+budget", "K4_1.0", "K8_0.5", "K8_0.5+budget"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_null_moe.demo",
        description="Does rho < 1 beat rho = 1 at matched expert FLOPs, and does the budget "
                    "hold? Trains each configuration from each seed on the bundled "
                    "digit-and-caption task, then writes report.md (with PNG plots), "
                    "summary.json, runs.json and TensorBoard logs to --output.")
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"),
                        help="Folder for report.md, the plots, summary.json, runs.json and "
                             "tensorboard/ (default: outputs/demo).")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="Where to train; auto (the default) takes cuda when it is "
                             "available, else cpu.")
    parser.add_argument("--steps", type=int, default=300,
                        help="Training steps per run, at least 10 (default: 300).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Distinct non-negative seeds; every configuration trains once "
                             "from each (default: 0 1 2).")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="Configurations named K<topk>_<rho>[+budget], e.g. K2_1.0 K4_0.5 "
                             "K4_0.5+budget. Pairs with equal K*rho are compared at matched "
                             "FLOPs; +budget runs the budget controller.")
    parser.add_argument("--workers", type=int, default=None,
                        help="Runs trained side by side, one process each (default: the CPU "
                             "cores, at most 2, on the CPU; 1 on a GPU).")
    return parser


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps must be at least 10 (got {args.steps})")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct non-negative integers (got {args.seeds})")
    if len(set(args.configs)) != len(args.configs):
        parser.error(f"--configs has duplicates: {args.configs}")
    try:
        args.setups = [RoutingSetup.parse(name, DemoModel().num_experts) for name in args.configs]
    except ValueError as error:
        parser.error(str(error))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu)")
    if args.workers is None:
        args.workers = min(2, os.cpu_count() or 1) if args.device == "cpu" else 1
    if args.workers < 1 or (args.device == "cuda" and args.workers != 1):
        parser.error(f"--workers must be at least 1 (and 1 with --device cuda); "
                     f"got {args.workers}")
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    from megatron_null_moe.demo.report import write_report

    args.output.mkdir(parents=True, exist_ok=True)
    line = environment_line(args.device == "cuda", precision="fp32", layers="local layers")
    if line:
        print(line)
    started = time.monotonic()
    results = train_all(args)
    meta = {"steps": args.steps, "seeds": len(args.seeds), "device": args.device,
            "workers": args.workers, "wall_seconds": time.monotonic() - started,
            "model": asdict(DemoModel()), "configs": [s.name for s in args.setups],
            "torch": torch.__version__}
    summary = write_report(args.output, results, args.setups, meta,
                           window=max(1, args.steps // 10))
    for pair in summary["matched_flops"]:
        print(f"{pair['contender']} vs {pair['baseline']}: {pair['verdict']}")
    for name, budget in summary["budget"].items():
        print(f"{name}: {budget['verdict']}")
    for name, modality in summary["modality"].items():
        print(f"{name}: {modality['verdict']}")
    print(f"report: {args.output / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
