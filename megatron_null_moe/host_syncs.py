"""Count the points where the host waits for the device, for tests and the benchmark.

On a GPU, ``count_cuda_syncs`` counts what CUDA's sync debug mode reports: every call that
synchronised. On the CPU nothing synchronises, so ``SyncOpCounter`` (a TorchFunctionMode)
records the calls that would on a GPU: reading values back to the host (``item``,
``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float`` of a tensor, a blocking
``to("cpu")`` with the device named as a string (a non-blocking one alone is not counted, the
read that must wait for it is), ``equal``/``allclose``) and ops whose output size depends on
tensor values (``nonzero``, ``masked_select``, ``unique``,
``bincount``, ``one_hot`` without ``num_classes``, ``repeat_interleave`` without
``output_size``, one-argument ``where``, indexing with a boolean mask). Backward passes run
inside the counter too. Not counted: copies to or from a device given as a torch.device or a
tensor (``.to(x.device)``, ``torch.tensor(..., device=x.device)``; on the CPU that device is
the host, so they cannot be told from no-ops), and host waits inside a kernel or an extension
(a C++ fallback, Transformer Engine). CUDA's sync debug mode (``count_cuda_syncs``, the GPU
tests) finds those.
"""

import warnings
from typing import Callable, List

import torch
from torch.overrides import TorchFunctionMode

_READS_TO_HOST = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.equal, torch.Tensor.equal, torch.allclose, torch.Tensor.allclose,
}
_VALUE_SIZED = {
    torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere,
    torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.unique,
    torch.unique_consecutive, torch.bincount, torch.Tensor.bincount,
}


def _has_bool_index(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices)


def _blocking_to_host(args, kwargs) -> bool:
    """Tensor.to("cpu"...), not non_blocking. Only a string names the host for sure: in the
    CPU harness every tensor's device is the host, on a GPU it would be the device."""
    if kwargs.get("non_blocking") or any(arg is True for arg in args[1:]):
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, str) and torch.device(target).type == "cpu"


def _would_sync(func, args, kwargs) -> bool:
    if func in _READS_TO_HOST or func in _VALUE_SIZED:
        return True
    if func is torch.Tensor.to:
        return _blocking_to_host(args, kwargs)
    if func is torch.nn.functional.one_hot:
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
        return _has_bool_index(args[1])
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return torch.is_tensor(repeats) and kwargs.get("output_size") is None
    if func is torch.where:
        return len(args) + len(kwargs) == 1
    return False


class SyncOpCounter(TorchFunctionMode):
    """``with SyncOpCounter() as counter: ...``; ``counter.calls`` names each would-be sync."""

    def __init__(self):
        super().__init__()
        self.calls: List[str] = []
        self._engine = None
        self._depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _would_sync(func, args, kwargs):
            self.calls.append(getattr(func, "__qualname__", repr(func)))
        return func(*args, **kwargs)

    def __enter__(self):
        if self._depth == 0:
            # A mode is off while its handler runs, and Tensor.backward goes through the
            # handler: re-enter it around the autograd engine so the backward pass's Python
            # (custom autograd functions, hooks) is counted too.
            engine = self._engine = torch.autograd._engine_run_backward

            def counted_engine(*args, **kwargs):
                with self:
                    return engine(*args, **kwargs)

            torch.autograd._engine_run_backward = counted_engine
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc_info):
        self._depth -= 1
        if self._depth == 0:
            torch.autograd._engine_run_backward, self._engine = self._engine, None
        return super().__exit__(*exc_info)


def count_sync_ops(step: Callable[[], None]) -> List[str]:
    """The would-be synchronising calls of one ``step()`` (any device)."""
    with SyncOpCounter() as counter:
        step()
    return counter.calls


def count_cuda_syncs(step: Callable[[], None]) -> int:
    """Host-device synchronisations of one ``step()`` on CUDA (sync debug mode warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
