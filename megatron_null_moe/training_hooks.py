"""Where the plugin meets Megatron's training loop, in one place.

Megatron's loop has no callback for per-step metrics or FLOPs, so two module attributes of
``megatron.training.training`` are wrapped while ``null_expert_training()`` is active:

- ``num_floating_point_operations``: Megatron counts K routed experts per token; with null
  experts the real count is measured, so FLOPs (and TFLOP/s, MFU) use the measured mean.
- ``training_log``: adds the null statistics to the losses Megatron prints and sends to
  TensorBoard, and writes per-layer scalars at each log interval.

Also: the wheel ships the compiled dataset helper but not its Makefile, so Megatron's
compile step would exit; it is skipped when the helper imports. Without CUDA the CPU
harness is entered (gloo).
"""

import contextlib
import copy
import os
from typing import Dict, Optional

import torch

from megatron_null_moe.metrics import RoutingStatistics
from megatron_null_moe.process_groups import free_port
from megatron_null_moe.router import NullExpertRouter


class NullExpertMonitor:
    """Collects every null-expert router's counts once per iteration, over all ranks."""

    def __init__(self):
        self._routers: Dict[int, NullExpertRouter] = {}
        self._iteration = None
        self.histogram = None  # [layers, K+1]: tokens with r real experts, all ranks
        self.expected_real_experts: Optional[float] = None  # rho * K, set once args are known

    def watch(self, model) -> None:
        """Remember the routers of a model chunk (called from the forward step)."""
        for module in model.modules():
            if isinstance(module, NullExpertRouter):
                self._routers.setdefault(id(module), module)

    @property
    def routers(self):
        return list(self._routers.values())

    def iteration_histogram(self, args) -> torch.Tensor:
        """This iteration's global histogram, collected at the first call of the iteration.

        Every rank calls it at the same points of the loop, so the all-reduce matches.
        """
        if self._iteration == args.curr_iteration and self.histogram is not None:
            return self.histogram
        num_layers = args.num_layers + (args.mtp_num_layers or 0)
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        histogram = torch.zeros(num_layers, args.moe_router_topk + 1, dtype=torch.int64,
                                device=device)
        for router in self.routers:
            layer = router.layer_number + (args.num_layers if router.is_mtp_layer else 0)
            histogram[layer - 1] += router.real_experts_histogram.sum(dim=0).to(device)
            router.real_experts_histogram.zero_()
        torch.distributed.all_reduce(histogram)
        # Host copy: FLOPs and log values are Python numbers.
        self.histogram, self._iteration = histogram.cpu(), args.curr_iteration
        return self.histogram

    def iteration_statistics(self, args) -> RoutingStatistics:
        """This iteration's statistics over all MoE layers and ranks."""
        target = (self.expected_real_experts or args.moe_router_topk) / args.moe_router_topk
        return RoutingStatistics.from_histogram(self.iteration_histogram(args).sum(dim=0), target)

    def mean_real_experts(self, args) -> Optional[float]:
        """Measured real experts per token over all MoE layers this iteration (None: none)."""
        statistics = self.iteration_statistics(args)
        return statistics.mean_real_experts if statistics.num_tokens else None


def null_expert_flops(original, measure_real_experts):
    """Megatron's FLOPs with K routed experts replaced by the measured mean real experts.

    measure_real_experts(args) -> mean real experts per token, or None to keep Megatron's K.
    """

    def num_floating_point_operations(args, batch_size, *more, **kwargs):
        measured = measure_real_experts(args) if args.num_experts else None
        if measured is None:
            return original(args, batch_size, *more, **kwargs)
        effective = copy.copy(args)
        effective.moe_router_topk = measured
        return original(effective, batch_size, *more, **kwargs)

    return num_floating_point_operations


def layer_scalars(histogram_layers: torch.Tensor) -> Dict[int, Dict[str, float]]:
    """Per MoE layer (1-based) that routed tokens: real fraction and zero-real fraction."""
    scalars = {}
    for index, histogram in enumerate(histogram_layers):
        statistics = RoutingStatistics.from_histogram(histogram, target_real_fraction=1.0)
        if statistics.num_tokens:
            scalars[index + 1] = {"real_fraction": statistics.real_fraction,
                                  "zero_real_fraction": statistics.zero_real_fraction}
    return scalars


def null_expert_training_log(original, monitor: NullExpertMonitor):
    """Megatron's training_log with the null statistics among the logged losses."""

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *more, **kwargs):
        from megatron.training import get_args, get_tensorboard_writer

        args = get_args()
        statistics = monitor.iteration_statistics(args)
        if statistics.num_tokens:
            device = next(iter(loss_dict.values())).device if loss_dict else "cpu"
            loss_dict = dict(loss_dict)
            for key, value in (("null real experts/token", statistics.mean_real_experts),
                               ("null expected real experts/token",
                                monitor.expected_real_experts),
                               ("null real fraction", statistics.real_fraction),
                               ("null zero-real tokens", statistics.zero_real_fraction)):
                loss_dict[key] = torch.tensor([value], device=device)
        report = original(loss_dict, total_loss_dict, learning_rate, iteration, *more, **kwargs)
        writer = get_tensorboard_writer()
        if writer is not None and iteration % args.log_interval == 0:
            for layer, values in layer_scalars(monitor.iteration_histogram(args)).items():
                for name, value in values.items():
                    writer.add_scalar(f"null_moe/{name}_layer_{layer:02d}", value, iteration)
        return report

    return training_log


@contextlib.contextmanager
def _attribute(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def _compile_helpers_unless_shipped(original):
    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original()

    return compile_helpers


def single_process_environment() -> None:
    """The variables torchrun would set, for a plain ``python -m`` single-process run."""
    if "RANK" in os.environ:
        return
    port = free_port()
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def null_expert_training(on_cpu: bool):
    """Everything Megatron's loop needs for null experts; yields the NullExpertMonitor."""
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.training as training

    from megatron_null_moe.cpu import cpu_harness

    monitor = NullExpertMonitor()
    with contextlib.ExitStack() as stack:
        if on_cpu:
            print("> megatron_null_moe: no CUDA, running on the CPU through the CPU harness "
                  "(gloo)", flush=True)
            stack.enter_context(cpu_harness())
        stack.enter_context(_attribute(
            dataset_utils, "compile_helpers",
            _compile_helpers_unless_shipped(dataset_utils.compile_helpers)))
        stack.enter_context(_attribute(
            training, "num_floating_point_operations",
            null_expert_flops(training.num_floating_point_operations,
                              monitor.mean_real_experts)))
        stack.enter_context(_attribute(
            training, "training_log", null_expert_training_log(training.training_log, monitor)))
        yield monitor
