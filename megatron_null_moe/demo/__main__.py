"""python -m megatron_null_moe.demo: does rho < 1 beat rho = 1 at matched expert FLOPs?

Trains each configuration from each seed on the bundled digit-and-caption task, then writes
report.md (with PNG plots), summary.json, runs.json and TensorBoard logs to --output.
"""

import argparse
import contextlib
import socket
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_null_moe.demo.train import DemoModel, RoutingSetup, train_run

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


@contextlib.contextmanager
def megatron_process_groups(device: str):
    """Megatron's process groups for one process: gloo through the CPU harness, or NCCL."""
    from megatron.core import parallel_state

    if device == "cpu":
        from megatron_null_moe.cpu import (
            cpu_harness,
            destroy_cpu_parallel_state,
            init_cpu_parallel_state,
        )

        with cpu_harness():
            init_cpu_parallel_state()
            try:
                yield
            finally:
                destroy_cpu_parallel_state()
        return
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


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

    with megatron_process_groups(args.device), \
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
