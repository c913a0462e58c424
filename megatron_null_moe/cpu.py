"""Run Megatron-Core's real code on the CPU over gloo, in one process or several.

Megatron-Core 0.19.2 assumes CUDA throughout: tensors are created on ``device='cuda'``, the RNG
tracker forks CUDA generator states, streams and events order device copies, and the training
loop asserts that CUDA exists. The tests and demos of this package run Megatron's own MoELayer,
GPTModel and ``pretrain`` on machines without a GPU, so ``cpu_harness()`` stands in for each of
those touch points (numbered as in the shared CPU.md), and for what gloo lacks next to NCCL
(all-gather and reduce-scatter of unequal lengths), while it is active and puts every original
back on exit. It is strictly opt-in: importing this module changes nothing, and entering the
harness where CUDA is available raises unless ``force=True``.

Entries are reference counted: a nested ``cpu_harness()`` shares the outermost installation, and
the last exit restores. The CUDA-to-CPU device mode (item 3) covers the thread that entered.

    with cpu_harness():
        init_cpu_parallel_state(expert_model_parallel_size=1)
        ...  # build and run Megatron modules
        destroy_cpu_parallel_state()

Several gloo processes: ``megatron_null_moe.cpu_ranks.run_on_ranks``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.parallel_state as parallel_state
import megatron.core.tensor_parallel.random as tensor_parallel_random
import megatron.core.transformer.moe.moe_logging as moe_logging
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
from megatron.core.transformer.torch_norm import WrappedTorchNorm

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


def _cuda_type(tensor: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs):
    """``Tensor.type``: a CPU tensor reports the CUDA type name it stands for (Megatron's
    optimizers accept only 'torch.cuda.FloatTensor' and its kin), and a CUDA type name
    converts to the CPU type of that name."""
    if dtype is None:
        name = tensor.type()
        return name.replace("torch.", "torch.cuda.", 1) if tensor.device.type == "cpu" else name
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.", 1)
    return tensor.type(dtype, non_blocking, **kwargs)


class _CUDAToCPU(TorchFunctionMode):
    """Every torch call asking for a CUDA device gets the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type:  # the distributed optimizer checks parameters' type()
            return _cuda_type(*args, **kwargs)
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


class _SequenceParallelTorchNorm:
    """Megatron's torch norm (``WrappedTorchNorm``) that also runs with sequence parallelism.

    Megatron's local spec refuses sequence parallelism in its torch norm (only apex's and
    Transformer Engine's norms take it), yet a norm acts on each token alone, so each TP rank
    normalises its slice of the sequence unchanged. The parameters are marked
    ``sequence_parallel`` as apex's FusedLayerNorm marks them, so ``finalize_model_grads``
    sums their gradients over the TP group.
    """

    wrapped: ClassVar[Callable] = WrappedTorchNorm

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> torch.nn.Module:
        unmarked = copy.copy(config)
        unmarked.sequence_parallel = False
        norm = cls.wrapped(unmarked, hidden_size, eps, **kwargs)
        for parameter in norm.parameters():
            setattr(parameter, "sequence_parallel", config.sequence_parallel)
        return norm


def _set_environment(name: str, value: str) -> Undo:
    """Set the environment variable; return a function restoring what was there."""
    previous = os.environ.get(name)
    os.environ[name] = value

    def undo() -> None:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous

    return undo


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


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def _uneven_all_gather(original: Callable) -> Callable:
    """torch.distributed.all_gather also for tensors of different lengths, which NCCL takes
    and gloo refuses (Megatron's expert-TP dispatch gathers each rank's token count): the
    tensors are gathered padded to the longest and cut back."""

    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or len({t.shape for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = [t.new_empty((rows, *t.shape[1:])) for t in tensor_list]
        original(padded, _padded_rows(tensor, rows), group=group)
        for output, gathered in zip(tensor_list, padded):
            output.copy_(gathered[:output.shape[0]])

    return all_gather


def _uneven_reduce_scatter(original: Callable) -> Callable:
    """torch.distributed.reduce_scatter also for inputs of different lengths (the backward of
    the gather above), padded and cut back as there."""

    @functools.wraps(original)
    def reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None,
                       async_op=False):
        if async_op or len({t.shape for t in input_list}) <= 1:
            return original(output, input_list, op=op, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in input_list)
        padded_output = output.new_empty((rows, *output.shape[1:]))
        original(padded_output, [_padded_rows(t, rows) for t in input_list], op=op, group=group)
        output.copy_(padded_output[:output.shape[0]])

    return reduce_scatter


class _DeviceGenerator:
    """The CUDA default generator's stand-in: a generator state of its own.

    On a GPU, dropout draws from the CUDA generator while the host's (data loaders, dataset
    shuffling) draw from the CPU one, so a checkpoint's CUDA RNG state resumes the model's
    random stream exactly. On the CPU every op draws from the CPU default generator; the
    harness therefore runs Megatron's training step and evaluation inside ``drawing()``,
    which swaps this state in, and ``torch.cuda.get_rng_state``/``set_rng_state``/
    ``manual_seed`` read and write it.
    """

    def __init__(self):
        self._state = torch.Generator().get_state()
        self._drawing = False

    def get_state(self, device="cuda") -> torch.Tensor:
        return torch.default_generator.get_state() if self._drawing else self._state.clone()

    def set_state(self, new_state: torch.Tensor, device="cuda", graph_safe=False) -> None:
        if self._drawing:
            torch.default_generator.set_state(new_state)
        else:
            self._state = new_state.clone()

    def manual_seed(self, seed: int) -> None:
        self.set_state(torch.Generator().manual_seed(int(seed)).get_state())

    @contextlib.contextmanager
    def drawing(self):
        """Random ops inside draw from this generator instead of the CPU default one."""
        if self._drawing:
            yield
            return
        host_state = torch.default_generator.get_state()
        torch.default_generator.set_state(self._state)
        self._drawing = True
        try:
            yield
        finally:
            self._drawing = False
            self._state = torch.default_generator.get_state()
            torch.default_generator.set_state(host_state)


def _drawing_from(generator: _DeviceGenerator, function: Callable) -> Callable:
    @functools.wraps(function)
    def call(*args, **kwargs):
        with generator.drawing():
            return function(*args, **kwargs)

    return call


def _torch_cuda_stand_ins(generator: _DeviceGenerator) -> dict[str, Any]:
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
        "get_rng_state": generator.get_state,
        "set_rng_state": generator.set_state,
        "manual_seed": generator.manual_seed,
        "manual_seed_all": generator.manual_seed,
    }


def _install() -> list[Undo]:
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401 (binds the norm by name)
    import megatron.core.transformer.transformer_block  # noqa: F401 (binds the norm by name)
    import megatron.training.initialize as training_initialize
    import megatron.training.training as training
    import megatron.training.utils.common_utils as training_utils

    undo: list[Undo] = []
    generator = CPUHarness.device_generator = _DeviceGenerator()
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
    for name, stand_in in _torch_cuda_stand_ins(generator).items():
        for owner in _TORCH_CUDA_OWNERS:
            if name in vars(owner):
                undo.append(_set_attribute(owner, name, stand_in))
    undo.append(_set_attribute(torch.Tensor, "record_stream", lambda self, stream: None))
    # gloo's all-gather and reduce-scatter need equal lengths; NCCL's, which Megatron
    # assumes, do not.
    for name, stand_in in (("all_gather", _uneven_all_gather),
                           ("reduce_scatter", _uneven_reduce_scatter)):
        undo.append(_set_attribute(torch.distributed, name,
                                   stand_in(getattr(torch.distributed, name))))
    # Item 10: validate_args asks for one CUDA queue with TP or CP (kernel ordering on a GPU;
    # nothing to order on the CPU).
    undo.append(_set_environment("CUDA_DEVICE_MAX_CONNECTIONS", "1"))
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
                # Item 10: the local spec's norm with sequence parallelism (for TP with MoE).
                (WrappedTorchNorm, _SequenceParallelTorchNorm),
                # Item 9: no device architecture on the CPU.
                (training_utils.get_device_arch_version, lambda: 0),
                # Item 5 (resume): what a GPU draws from the CUDA generator draws from the
                # harness's device generator; activation recompute restores it.
                (training.train_step, _drawing_from(generator, training.train_step)),
                (training.evaluate, _drawing_from(generator, training.evaluate)),
                (tensor_parallel_random._set_cuda_rng_state, generator.set_state),
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
    device_generator: ClassVar[_DeviceGenerator | None] = None

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


def device_generator() -> _DeviceGenerator:
    """The active harness's stand-in for the CUDA default generator."""
    if not CPUHarness.is_active():
        raise RuntimeError("device_generator() needs an active cpu_harness()")
    return CPUHarness.device_generator


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

    Uses the process group already initialised (e.g. by ``cpu_ranks.run_on_ranks``), else creates a
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
    # As Megatron's _set_random_seed: the host generator, then the device generator and the
    # tracker (stand-ins here) through Megatron's own seeding.
    torch.manual_seed(seed)
    tensor_parallel_random.model_parallel_cuda_manual_seed(seed)


def destroy_cpu_parallel_state() -> None:
    """Undo ``init_cpu_parallel_state``, destroying the process group only if it created it.

    Also drops Megatron's process-wide MoE metrics, whose per-layer buffers are sized by the
    first model that recorded into them, so the next test or run in this process starts clean.
    """
    global _owned_process_group
    moe_logging.destroy_moe_metrics_tracker()
    parallel_state.destroy_model_parallel()
    if _owned_process_group:
        torch.distributed.destroy_process_group()
        _owned_process_group = False
