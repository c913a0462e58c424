"""Shared fixtures: Megatron's process groups on the CPU (gloo) inside the package's harness."""

import pytest
import torch

from megatron_null_moe.cpu import cpu_harness, destroy_cpu_parallel_state, init_cpu_parallel_state


def pytest_configure(config):
    # Test models are tiny: on 2 cores a second OpenMP thread makes each matmul ~100x slower.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def parallel_state():
    """Single-process model-parallel state on the CPU; yields Megatron's default groups."""
    if torch.cuda.is_available():
        pytest.skip("CPU-harness tests run only where CUDA is absent")
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    with cpu_harness():
        init_cpu_parallel_state()
        try:
            yield get_default_pg_collection()
        finally:
            destroy_cpu_parallel_state()
