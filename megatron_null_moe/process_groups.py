"""Megatron's process groups for one process, on the CPU (gloo, via the harness) or a GPU.

For tools that run a model outside torchrun and Megatron's training loop: the demo, the
benchmark, examples and tests.
"""

import contextlib
import os
import socket

import torch


def is_rank_zero() -> bool:
    """Whether this process speaks for all: rank 0 of torch.distributed, or before it
    exists (argument parsing, start-up), torchrun's RANK (absent: a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def single_process_parallel_state(device: str, seed: int = 0):
    """World of one: gloo inside the CPU harness for 'cpu', NCCL on GPU 0 for 'cuda'."""
    from megatron.core import parallel_state

    if device == "cpu":
        from megatron_null_moe.cpu import (
            cpu_harness,
            destroy_cpu_parallel_state,
            init_cpu_parallel_state,
        )

        with cpu_harness():
            init_cpu_parallel_state(seed=seed)
            try:
                yield
            finally:
                destroy_cpu_parallel_state()
        return
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
