"""python -m megatron_null_moe.demo: does rho < 1 beat rho = 1 at matched expert FLOPs?

Trains each configuration from each seed on the bundled digit-and-caption task, then writes
report.md (with PNG plots), summary.json, runs.json and TensorBoard logs to --output.
"""

import argparse
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_null_moe.demo.train import DemoModel, RoutingSetup, train_run
from megatron_null_moe.process_groups import single_process_parallel_state

DEFAULT_CONFIGS = ["K2_1.0", "K4_0.5", "K4_1.0", "K8_0.5"]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_null_moe.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"),
                        help="folder for report.md, plots, summary.json, tensorboard/")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="K<topk>_<rho>, e.g. K2_1.0 K4_0.5 (pairs with equal K*rho are "
                             "compared at matched FLOPs)")
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
    return args


class ProgressBar:
    """One line on stderr: done/total steps, the run in progress, time left."""

    def __init__(self, total: int):
        self.total, self.done, self.start, self.label = total, 0, time.monotonic(), ""

    def step(self) -> None:
        self.done += 1
        if self.done % 5 and self.done != self.total:
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        filled = int(30 * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                         f"steps | {self.label} | {elapsed:.0f} s, ~{left:.0f} s left   ")
        sys.stderr.flush()


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    from megatron_null_moe.demo.report import write_report

    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: more threads only add waiting
    model_shape = DemoModel()
    args.output.mkdir(parents=True, exist_ok=True)
    progress = ProgressBar(len(args.setups) * len(args.seeds) * args.steps)
    started = time.monotonic()
    results = {}
    from torch.utils.tensorboard import SummaryWriter

    with single_process_parallel_state(args.device), \
            SummaryWriter(str(args.output / "tensorboard")) as writer:
        for setup in args.setups:
            for seed in args.seeds:
                progress.label = f"{setup.name} seed {seed}"
                results.setdefault(setup.name, []).append(train_run(
                    setup, seed, args.steps, model_shape, torch.device(args.device),
                    on_step=progress.step, log_writer=writer))
    sys.stderr.write("\n")
    meta = {"steps": args.steps, "seeds": len(args.seeds), "device": args.device,
            "wall_seconds": time.monotonic() - started, "model": asdict(model_shape),
            "configs": [s.name for s in args.setups], "torch": torch.__version__}
    summary = write_report(args.output, results, args.setups, meta,
                           window=max(1, args.steps // 10))
    for pair in summary["matched_flops"]:
        print(f"{pair['contender']} vs {pair['baseline']}: {pair['verdict']}")
    for name, modality in summary["modality"].items():
        print(f"{name}: {modality['verdict']}")
    print(f"report: {args.output / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
