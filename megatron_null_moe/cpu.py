"""Run Megatron-Core's real code on the CPU over gloo, in one process or several.

Megatron-Core 0.19.2 assumes CUDA throughout: tensors are created on ``device='cuda'``, the RNG
tracker forks CUDA generator states, streams and events order device copies, and the training
loop asserts that CUDA exists. The tests and demos of this package run Megatron's own MoELayer,
GPTModel and ``pretrain`` on machines without a GPU, so ``cpu_harness()`` stands in for each of
those touch points (numbered as in the shared CPU.md) while it is active and puts every original
back on exit. It is strictly opt-in: importing this module changes nothing, and entering the
harness where CUDA is available raises unless ``force=True``.

Entries are reference counted: a nested ``cpu_harness()`` shares the outermost installation, and
the last exit restores. The CUDA-to-CPU device mode (item 3) covers the thread that entered.

    with cpu_harness():
        init_cpu_parallel_state(expert_model_parallel_size=1)
        ...  # build and run Megatron modules
        destroy_cpu_parallel_state()

    results = run_on_ranks(module_level_fn, 2)  # fn(rank, world_size) in 2 gloo processes
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.parallel_state as parallel_state
import megatron.core.tensor_parallel.random as tensor_parallel_random
import megatron.core.transformer.moe.moe_logging as moe_logging
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

from megatron_null_moe.process_groups import free_port

_CPU = torch.device("cpu")
_TORCH_CUDA_OWNERS = (torch.cuda, torch.cuda.random)

Undo = Callable[[], None]


def _as_cpu(device: Any) -> Any:
    """`device` with a CUDA device (name, torch.device or bare index) replaced by the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return _CPU
    return device


class _CUDAToCPU(TorchFunctionMode):
    """Every torch call asking for a CUDA device gets the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _as_cpu(kwargs["device"])}
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _as_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """torch.cuda.Stream on the CPU: work is synchronous, so every wait is already satisfied."""

    def __init__(self, device=None, priority=0, **kwargs):
        self.priority = priority

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event: _Event | None = None) -> _Event:
        event = event or _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    """torch.cuda.Event on the CPU: records wall-clock time, never waits."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self._recorded_at = time.perf_counter()

    def record(self, stream=None) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: _Event) -> float:
        return (end_event._recorded_at - self._recorded_at) * 1000.0


class _CPURNGStatesTracker(tensor_parallel_random.CudaRNGStatesTracker):
    """Megatron's RNG tracker with each named state kept as a CPU generator state.

    On the CPU the generator every random op draws from is the CPU default generator, so
    ``fork(name)`` swaps that generator's state for the tracked one and back. The states are
    plain CPU ByteTensors: ``get_states``/``set_states`` checkpoint and resume them exactly.
    """

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG tracker already holds name {name!r} or seed {seed}")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = tensor_parallel_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise KeyError(f"RNG tracker state {name!r} was never added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _set_attribute(owner: Any, name: str, value: Any) -> Undo:
    """Set ``owner.name = value``; return a function restoring exactly what was there."""
    missing = object()
    previous = vars(owner).get(name, missing)
    setattr(owner, name, value)

    def undo() -> None:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)

    return undo


def _megatron_modules() -> list:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "megatron" or name.startswith("megatron."))
    ]


def _swap_bindings(pairs: list[tuple[Any, Any]]) -> None:
    """In every loaded megatron module, rebind each name bound to ``old`` to ``new``."""
    by_id = {id(old): (old, new) for old, new in pairs}
    for module in _megatron_modules():
        for name, value in list(vars(module).items()):
            old, new = by_id.get(id(value), (None, None))
            if old is not None and value is old:
                setattr(module, name, new)


def _rebind(pairs: list[tuple[Any, Any]]) -> Undo:
    """Replace functions Megatron imports by name; the undo also reaches modules loaded since."""
    _swap_bindings(pairs)
    return lambda: _swap_bindings([(new, old) for old, new in pairs])


def _within(context: contextlib.AbstractContextManager, function: Callable) -> Callable:
    @functools.wraps(function)
    def call(*args, **kwargs):
        with context:
            return function(*args, **kwargs)

    return call


def _with_one_device(function: Callable) -> Callable:
    """Run ``function`` while torch.cuda.device_count() reports one device."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        undo = _set_attribute(torch.cuda, "device_count", lambda: 1)
        try:
            return function(*args, **kwargs)
        finally:
            undo()

    return call


def _move_to_cpu(original: Callable) -> Callable:
    @functools.wraps(original)
    def move(tensor, as_numpy: bool = False, record_stream: bool = False):
        moved = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return moved.numpy() if as_numpy and torch.is_tensor(moved) else moved

    return move


def _clip_without_cuda_assert(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
        if use_decoupled_grad:
            return original(parameters, max_norm, total_norm, use_decoupled_grad)
        # Same rule as Megatron's: scale by max_norm / (total_norm + 1e-6) when that is below 1.
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, torch.as_tensor(total_norm))

    return clip


def _get_device_rng_state(device="cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_device_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.default_generator.set_state(new_state)


def _seed_device(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _torch_cuda_stand_ins() -> dict[str, Any]:
    default_stream = _Stream()
    return {
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_stats": lambda device=None: {},
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "memory_reserved": lambda device=None: 0,
        "max_memory_reserved": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "set_device": lambda device: None,
        "current_device": lambda: 0,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda device=None: default_stream,
        "default_stream": lambda device=None: default_stream,
        "stream": contextlib.nullcontext,
        # On the CPU the device generator is the CPU generator that every random op draws from.
        "get_rng_state": _get_device_rng_state,
        "set_rng_state": _set_device_rng_state,
        "manual_seed": _seed_device,
        "manual_seed_all": _seed_device,
    }


def _install() -> list[Undo]:
    import megatron.training.initialize as training_initialize
    import megatron.training.utils.common_utils as training_utils

    undo: list[Undo] = []
    # Item 3: CUDA device arguments and .cuda() land on the CPU.
    mode = _CUDAToCPU()
    mode.__enter__()
    undo.append(lambda: mode.__exit__(None, None, None))
    # A mode is off while its own handler runs, and it handles Tensor.backward: re-enter it
    # around the engine so Megatron's autograd functions and hooks see it in backward too.
    engine = torch.autograd._engine_run_backward
    undo.append(_set_attribute(torch.autograd, "_engine_run_backward", _within(mode, engine)))
    undo.append(_set_attribute(torch.Tensor, "cuda", lambda self, *args, **kwargs: self))
    undo.append(_set_attribute(torch.nn.Module, "cuda", lambda self, device=None: self))
    # Item 4: plain torch.cuda calls, also where Megatron reaches them via torch.cuda.random.
    for name, stand_in in _torch_cuda_stand_ins().items():
        for owner in _TORCH_CUDA_OWNERS:
            if name in vars(owner):
                undo.append(_set_attribute(owner, name, stand_in))
    undo.append(_set_attribute(torch.Tensor, "record_stream", lambda self, stream: None))
    # The alltoall dispatcher caches its torch.cuda.Stream on the class: start from none, and
    # drop the stand-in on exit.
    alltoall = token_dispatcher.MoEAlltoAllTokenDispatcher
    undo.append(_set_attribute(alltoall, "cuda_dtoh_stream", None))
    # Item 5: swapping the tracker object reaches every module that imported
    # get_cuda_rng_tracker by name, and model_parallel_cuda_manual_seed, which uses the global.
    tracker = _CPURNGStatesTracker()
    undo.append(_set_attribute(tensor_parallel_random, "_CUDA_RNG_STATE_TRACKER", tracker))
    undo.append(_set_attribute(tensor_parallel_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True))
    undo.append(
        _rebind(
            [
                # Item 6: split sizes come back as numpy on the CPU too.
                (
                    moe_utils.maybe_move_tensor_to_cpu,
                    _move_to_cpu(moe_utils.maybe_move_tensor_to_cpu),
                ),
                # Item 8: gradient clipping without the torch.cuda.FloatTensor assert.
                (
                    clip_grads.clip_grad_by_total_norm_fp32,
                    _clip_without_cuda_assert(clip_grads.clip_grad_by_total_norm_fp32),
                ),
                # Item 1: initialize_megatron without its CUDA assert.
                (
                    training_initialize.initialize_megatron,
                    functools.partial(training_initialize.initialize_megatron, allow_no_cuda=True),
                ),
                # Item 2: build the model-parallel groups (and seed the tracker) without a GPU;
                # 0.19.2 hands device_id only to the NCCL-only inprocess-restart path, not gloo.
                (
                    training_initialize._initialize_distributed,
                    _with_one_device(training_initialize._initialize_distributed),
                ),
                (
                    training_initialize._set_random_seed,
                    _with_one_device(training_initialize._set_random_seed),
                ),
                # Item 9: no device architecture on the CPU.
                (training_utils.get_device_arch_version, lambda: 0),
            ]
        )
    )
    return undo


class CPUHarness:
    """Context manager installing the CPU stand-ins; see the module docstring.

    Args:
        force: enter even where ``torch.cuda.is_available()`` (otherwise a RuntimeError).
    """

    _depth: ClassVar[int] = 0
    _undo: ClassVar[list[Undo]] = []

    def __init__(self, force: bool = False):
        self.force = force

    @classmethod
    def is_active(cls) -> bool:
        return cls._depth > 0

    def __enter__(self) -> CPUHarness:
        if CPUHarness._depth == 0:
            if torch.cuda.is_available() and not self.force:
                raise RuntimeError(
                    "cpu_harness() replaces CUDA with the CPU, but CUDA is available here; "
                    "pass force=True to run Megatron on the CPU anyway"
                )
            CPUHarness._undo = _install()
        CPUHarness._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        CPUHarness._depth -= 1
        if CPUHarness._depth == 0:
            undo, CPUHarness._undo = CPUHarness._undo, []
            for restore in reversed(undo):
                restore()


def cpu_harness(force: bool = False) -> CPUHarness:
    """``with cpu_harness(): ...`` runs Megatron-Core on the CPU (see CPUHarness)."""
    return CPUHarness(force=force)


_owned_process_group = False


def init_cpu_parallel_state(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """Megatron's model-parallel groups and RNG states over gloo; call inside the harness.

    Uses the process group already initialised (e.g. by ``run_on_ranks``), else creates a
    single-process gloo group that ``destroy_cpu_parallel_state`` later destroys.
    """
    global _owned_process_group
    if not CPUHarness.is_active():
        raise RuntimeError("init_cpu_parallel_state() must be called inside cpu_harness()")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
        _owned_process_group = True
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
        )
    except BaseException:
        destroy_cpu_parallel_state()
        raise
    # Megatron's own seeding runs as is: the tracker and torch.cuda.manual_seed are stand-ins.
    tensor_parallel_random.model_parallel_cuda_manual_seed(seed)


def destroy_cpu_parallel_state() -> None:
    """Undo ``init_cpu_parallel_state``, destroying the process group only if it created it.

    Also drops Megatron's process-wide MoE metrics, whose per-layer buffers are sized by the
    first model that recorded into them, so the next session starts clean.
    """
    global _owned_process_group
    moe_logging.destroy_moe_metrics_tracker()
    parallel_state.destroy_model_parallel()
    if _owned_process_group:
        torch.distributed.destroy_process_group()
        _owned_process_group = False


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
