"""Train the demo's runs side by side, one worker process each (spawned, so that each has
Megatron's process groups of its own), with one progress bar over all of them."""

import logging
import multiprocessing
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import torch

from megatron_null_moe.cli import call_quietly
from megatron_null_moe.demo.train import DemoModel, RoutingSetup, train_run


class ProgressBar:
    """One line on stderr: done/total steps, time left."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, count: int = 1) -> None:
        before, self.done = self.done, self.done + count
        if self.done == 0 or (self.done // 5 == before // 5 and self.done != self.total):
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        filled = int(30 * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                         f"steps | {elapsed:.0f} s, ~{left:.0f} s left   ")
        sys.stderr.flush()


# In each worker: Megatron's process groups (one process) and the shared step counter.
_worker = {}


def _start_worker(device: str, steps_done) -> None:
    from megatron_null_moe.process_groups import single_process_parallel_state

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)  # deprecation notices, once per model
    if device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: more threads only add waiting
    _worker["state"] = single_process_parallel_state(device)
    _worker["state"].__enter__()  # held for the worker's life
    _worker["steps_done"] = steps_done


def _train_in_worker(setup: RoutingSetup, seed: int, steps: int, device: str, log_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    def on_step():
        with _worker["steps_done"].get_lock():
            _worker["steps_done"].value += 1

    with SummaryWriter(log_dir, filename_suffix=f".{setup.name}.seed{seed}") as writer:
        return train_run(setup, seed, steps, DemoModel(), torch.device(device),
                         on_step=on_step, log_writer=writer)


def train_all(args) -> dict:
    """{config name: [RunResult per seed]}; each run is a pure function of (setup, seed), so
    the results do not depend on --workers."""
    jobs = [(setup, seed) for setup in args.setups for seed in args.seeds]
    progress = ProgressBar(len(jobs) * args.steps)
    context = multiprocessing.get_context("spawn")
    steps_done = context.Value("q", 0)
    log_dir = str(args.output / "tensorboard")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=call_quietly,
                             initargs=(f"{__name__}:_start_worker", args.device,
                                       steps_done)) as pool:
        futures = [pool.submit(_train_in_worker, setup, seed, args.steps, args.device, log_dir)
                   for setup, seed in jobs]
        while not all(future.done() for future in futures):
            time.sleep(0.5)
            progress.step(steps_done.value - progress.done)
        results = {}
        for (setup, _), future in zip(jobs, futures):
            results.setdefault(setup.name, []).append(future.result())
    progress.step(steps_done.value - progress.done)
    sys.stderr.write("\n")
    return results
