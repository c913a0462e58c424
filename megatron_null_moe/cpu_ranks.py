"""Run a function in several gloo processes on the CPU, each inside the CPU harness.

For multi-rank tests and tools: ``run_on_ranks(module_level_fn, 2)`` calls
``fn(rank, world_size)`` in 2 spawned processes and returns their results by rank; a failing
rank's traceback is raised here and the other ranks are stopped.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch

from megatron_null_moe.cpu import cpu_harness
from megatron_null_moe.process_groups import free_port


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for processes started inside; restore them after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _run_rank(rank, world_size, port, timeout_s, fn, args, kwargs, connection) -> None:
    """Body of one spawned rank: gloo group, harness, ``fn``; sends (ok, result or traceback)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))  # read by Megatron's arguments
    # Spawning made "spawn" this process's default; give DataLoader workers the platform's,
    # as under torchrun (Megatron's worker_init_fn is a local function, which spawn can't pickle).
    multiprocessing.set_start_method(None, force=True)
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        with cpu_harness():
            result = fn(rank, world_size, *args, **kwargs)
        # Pickled by value: torch's shared-memory tensor pickling needs this process alive.
        connection.send_bytes(pickle.dumps((True, result)))
    except BaseException:
        connection.send_bytes(pickle.dumps((False, traceback.format_exc())))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        connection.close()


def _stop(processes: list, grace_s: float) -> None:
    """Join the processes, terminating (then killing) any still running after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def run_on_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 300, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` gloo CPU processes.

    ``fn`` must be a module-level (picklable) function and its result picklable. Each rank runs
    single-threaded with CUDA hidden, inside ``cpu_harness()``. Returns the results ordered by
    rank. If a rank raises or dies, the others are terminated and a RuntimeError carrying that
    rank's traceback is raised; after ``timeout_s`` seconds, a TimeoutError.
    """
    if world_size < 1:
        raise ValueError(f"run_on_ranks needs world_size >= 1, got {world_size}")
    context = torch.multiprocessing.get_context("spawn")
    port = free_port()
    connections, processes, results = [], [], None
    environment = dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
    )
    try:
        with _environment(**environment):
            for rank in range(world_size):
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=_run_rank,
                    args=(rank, world_size, port, timeout_s, fn, args, kwargs, sender),
                )
                process.start()
                sender.close()
                connections.append(receiver)
                processes.append(process)
        results = _collect(connections, processes, timeout_s)
    finally:
        # Ranks that delivered a result get a moment to exit; after a failure, none.
        _stop(processes, grace_s=10 if results is not None else 0)
        for connection in connections:
            connection.close()
    return results


def _collect(connections: list, processes: list, timeout_s: float) -> list:
    """Per-rank results, or the first failure raised as soon as it is known."""
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    while len(results) < len(processes):
        pending = [rank for rank in range(len(processes)) if rank not in results]
        remaining = deadline - time.monotonic()
        waitables = [connections[rank] for rank in pending]
        waitables += [processes[rank].sentinel for rank in pending]
        if remaining <= 0 or not multiprocessing.connection.wait(waitables, timeout=remaining):
            raise TimeoutError(f"ranks {pending} did not finish within {timeout_s} s")
        for rank in pending:
            if connections[rank].poll():
                ok, payload = pickle.loads(connections[rank].recv_bytes())
                if not ok:
                    raise RuntimeError(f"rank {rank} of {len(processes)} failed:\n{payload}")
                results[rank] = payload
            elif not processes[rank].is_alive():
                raise RuntimeError(
                    f"rank {rank} of {len(processes)} exited with code "
                    f"{processes[rank].exitcode} without a result"
                )
    return [results[rank] for rank in range(len(processes))]
