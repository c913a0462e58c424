"""Where the plugin meets Megatron's training loop, in one place.

Megatron's loop has no callback for per-step metrics, controllers or FLOPs, so three module
attributes of ``megatron.training.training`` and one of ``megatron.training.checkpointing``
are wrapped while ``null_expert_training()`` is active (the entry point and the patched
Megatron-LM ``pretrain_gpt.py`` both enter it):

- ``train_step``: after each step (optimizer step included), the routing counters of every
  MoE layer, the real assignments per expert among them, are summed over all ranks (one
  all-reduce of [layers, K+5+N] numbers and one device-to-host copy per step) and, with
  ``--moe-null-budget-controller``, each layer's budget controller takes its step
  (budget.py).
- ``num_floating_point_operations``: Megatron counts K routed experts per token; with null
  experts the computed count is measured, so FLOPs (and TFLOP/s, MFU) use the measured mean.
- ``training_log``: adds the null statistics to the losses Megatron prints and sends to
  TensorBoard, and writes per-layer scalars at each log interval, among them the load
  balance over the experts (and the expert-parallel ranks) over the interval's steps; under
  expert parallelism with the alltoall dispatcher it also prints the all-to-all bytes per
  rank, layer and step (traffic.py: counted on the host, collected over all ranks once per
  log interval).
- ``checkpointing._load_base_checkpoint``: refuses to load the distributed optimizer's state
  saved on the other expert path (``--moe-null-expert-path``), and optimizer state Megatron
  cannot load: across expert groups (EP 1 and EP > 1), and the distributed optimizer's
  without apex or Transformer Engine, or across TP, PP or EP sizes in its default layout.

Also: the wheel ships the compiled dataset helper but not its Makefile, so Megatron's
compile step would exit; it is skipped when the helper imports. Without CUDA the CPU
harness is entered (gloo).
"""

import contextlib
import copy
import inspect
import os
from typing import Dict, Optional

import torch

from megatron_null_moe.arguments import DISPATCHER_CHOSEN, expert_path_of
from megatron_null_moe.budget import budget_controlled, update_null_budgets
from megatron_null_moe.cli import environment_line
from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.expert_bias import update_expert_biases
from megatron_null_moe.metrics import RoutingStatistics, expert_load_figures, null_expert_routers
from megatron_null_moe.process_groups import free_port, is_rank_zero
from megatron_null_moe.traffic import (
    TRAFFIC_COLUMNS,
    AllToAllTraffic,
    alltoall_traffic,
    collect_alltoall_traffic,
)


def _print_rank_0(message: str) -> None:
    if is_rank_zero():
        print(f"> megatron_null_moe: {message}", flush=True)


class NullExpertMonitor:
    """The routing counts of every null-expert router, once per step, over all ranks."""

    def __init__(self, on_cpu: bool = False):
        self.on_cpu = on_cpu
        self.null_config: Optional[NullExpertConfig] = None
        self.expected_real_experts: Optional[float] = None  # rho * K, set by configure()
        self._routers: Dict[int, torch.nn.Module] = {}
        self._iteration = None
        self.counters = None  # [layers, K+5] on the host, see collect_layer_counters
        # [layers, K+5+N] counters on the host (collect_layer_counters), the real assignments
        # per expert among them: summed since the last log interval ended, and over the last
        # one (with the step that ended it).
        self._interval_counters = None
        self.interval_counters = None
        self._interval_iteration = None
        # (layer, figure) -> [sum, steps] of each step's load figures since the last log
        # interval ended, and their means over the last one.
        self._interval_step_figures: Dict[tuple, list] = {}
        self.step_load_figures: Dict[int, Dict[str, float]] = {}
        self._dispatcher_traffic: Dict[int, AllToAllTraffic] = {}  # the layers' counters
        self._interval_traffic: Dict[int, AllToAllTraffic] = {}  # training steps since a log
        self._interval_steps = 0
        self.traffic = None  # [layers, 9] bytes per step, see collect_alltoall_traffic
        self.traffic_steps = 0  # the training steps self.traffic averages over

    def configure(self, args) -> Optional[NullExpertConfig]:
        """After Megatron parsed ``args``: check the null-expert flags, say at start-up what
        they mean, and return the NullExpertConfig (None when null experts are off)."""
        from megatron_null_moe.arguments import (
            null_expert_config_from_args,
            take_over_expert_bias,
            warn_where_the_flags_lose,
        )

        if self.on_cpu and args.distributed_backend != "gloo":
            _print_rank_0(f"--distributed-backend {args.distributed_backend} needs CUDA; "
                          "using gloo")
            args.distributed_backend = "gloo"
        self.null_config = null_expert_config_from_args(args)
        if self.null_config is not None:
            take_over_expert_bias(args)
        warn_where_the_flags_lose(args, self.null_config)
        if args.num_experts:
            rho = self.null_config.pool_real_fraction(args.num_experts) if self.null_config \
                else 1.0
            self.expected_real_experts = rho * args.moe_router_topk
        if self.null_config is not None:
            _print_rank_0(start_up_summary(self.null_config, args))
        return self.null_config

    @property
    def controlled(self) -> bool:
        return self.null_config is not None and self.null_config.budget_control_rate is not None

    def watch(self, model_chunks) -> None:
        """Remember the routers of the model chunks a training step runs."""
        for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
            for _, router in null_expert_routers(chunk):
                self._routers.setdefault(id(router), router)
            self._dispatcher_traffic.update(alltoall_traffic(chunk))

    def start_of_step(self) -> None:
        """Forget the all-to-all traffic since the last step (evaluation's)."""
        for traffic in self._dispatcher_traffic.values():
            traffic.reset()

    @property
    def routers(self):
        return list(self._routers.values())

    def end_of_step(self, args) -> None:
        """Sum this step's counts over all ranks; step the budget controllers and the
        per-expert biases.

        Every rank runs it at the same point of the loop, so the collectives match.
        """
        if self.null_config is None:
            return
        num_layers = args.num_layers + (args.mtp_num_layers or 0)
        topk = args.moe_router_topk
        # The real assignments per expert ride in the same all-reduce: no collective or host
        # sync of their own.
        counters = collect_layer_counters(self.routers, num_layers, topk,
                                          num_experts=args.num_experts)
        self.counters = counters[:, :topk + 5]
        self._iteration = args.curr_iteration
        assignments = counters[:, topk + 5:]
        self._add_step_counters(args, counters)
        if self.controlled:
            update_null_budgets(self.routers, self.layer_statistics(args))
        update_expert_biases(self.routers, {index + 1: row for index, row in
                                            enumerate(assignments)})
        if args.expert_model_parallel_size > 1 and args.moe_token_dispatcher_type == "alltoall":
            self._add_step_traffic(args, num_layers)

    def _add_step_counters(self, args, counters: torch.Tensor) -> None:
        """Add this step's counters [layers, K+5+N] (host) and its load figures; at a log
        iteration, keep the interval's sums and the figures' means."""
        if self._interval_counters is None:
            self._interval_counters = torch.zeros_like(counters)
        self._interval_counters += counters
        for index, row in enumerate(counters[:, args.moe_router_topk + 5:]):
            for name, value in expert_load_figures(row, args.expert_model_parallel_size).items():
                total = self._interval_step_figures.setdefault((index + 1, name), [0.0, 0])
                total[0] += value
                total[1] += 1
        if (args.curr_iteration + 1) % args.log_interval == 0:
            self.interval_counters, self._interval_counters = self._interval_counters, None
            self._interval_iteration = args.curr_iteration
            self.step_load_figures = {}
            for (layer, name), (total, steps) in self._interval_step_figures.items():
                self.step_load_figures.setdefault(layer, {})[f"{name}_per_step"] = total / steps
            self._interval_step_figures = {}

    def interval_load_figures(self, args) -> Dict[int, Dict[str, float]]:
        """Global layer number -> expert_load_figures over the log interval that ended at this
        step (real assignments summed over its steps and all ranks), and each figure of every
        step's own assignments, averaged over the interval's steps (``..._per_step``: what a
        step waits for, which a selection bias that moves every step can hide from the sum);
        {} at other steps."""
        if self.interval_counters is None or self._interval_iteration != args.curr_iteration:
            return {}
        expert_parallel = args.expert_model_parallel_size
        assignments = self.interval_counters[:, args.moe_router_topk + 5:]
        return {index + 1: {**figures, **self.step_load_figures.get(index + 1, {})}
                for index, row in enumerate(assignments)
                if (figures := expert_load_figures(row, expert_parallel))}

    def interval_layer_statistics(self, args) -> Dict[int, RoutingStatistics]:
        """Global layer number -> the statistics over the log interval that ended at this step
        (all its steps' tokens together: whether each layer holds the budget on average,
        which one step of a small batch cannot say); {} at other steps."""
        if self.interval_counters is None or self._interval_iteration != args.curr_iteration:
            return {}
        statistics = {}
        for index, row in enumerate(self.interval_counters[:, :args.moe_router_topk + 5]):
            layer = statistics_from_counters(row, self._target(args))
            if layer.num_tokens:
                statistics[index + 1] = layer
        return statistics

    def _add_step_traffic(self, args, num_layers: int) -> None:
        """Add this step's all-to-all bytes; at a log iteration, collect them over all ranks."""
        for layer, traffic in self._dispatcher_traffic.items():
            self._interval_traffic.setdefault(layer, AllToAllTraffic()).add(traffic)
            traffic.reset()
        self._interval_steps += 1
        if (args.curr_iteration + 1) % args.log_interval == 0:
            self.traffic = collect_alltoall_traffic(self._interval_traffic, num_layers)
            self.traffic[:, :8] /= self._interval_steps
            self.traffic_steps, self._interval_steps = self._interval_steps, 0
            for traffic in self._interval_traffic.values():
                traffic.reset()

    def _target(self, args) -> float:
        return (self.expected_real_experts or args.moe_router_topk) / args.moe_router_topk

    def layer_statistics(self, args) -> Dict[int, RoutingStatistics]:
        """Global layer number -> this step's statistics, for the layers that routed tokens."""
        if self.counters is None or self._iteration != args.curr_iteration:
            return {}
        statistics = {}
        for index, row in enumerate(self.counters):
            layer = statistics_from_counters(row, self._target(args))
            if layer.num_tokens:
                statistics[index + 1] = layer
        return statistics

    def layer_biases(self, args) -> Dict[int, float]:
        """Global layer number -> the null selection bias the layer used this step."""
        if self.counters is None or self._iteration != args.curr_iteration:
            return {}
        return {index + 1: float(row[-2] / row[-1]) for index, row in enumerate(self.counters)
                if row[-1] > 0}

    def iteration_statistics(self, args) -> RoutingStatistics:
        """This step's statistics over all MoE layers and ranks (empty before a step ran)."""
        if self.counters is None or self._iteration != args.curr_iteration:
            return RoutingStatistics((0,) * (args.moe_router_topk + 1), self._target(args))
        return statistics_from_counters(self.counters.sum(dim=0), self._target(args))

    def mean_computed_experts(self, args) -> Optional[float]:
        """Measured expert computations per token over all MoE layers (None: none routed)."""
        statistics = self.iteration_statistics(args)
        return statistics.mean_computed_experts if statistics.num_tokens else None


def start_up_summary(null_config: NullExpertConfig, args) -> str:
    """One line: pool, target, the range of real experts per token, what holds the budget."""
    num_experts, topk = args.num_experts, args.moe_router_topk
    fewest, most = null_config.real_experts_range(num_experts, topk)
    rho = null_config.pool_real_fraction(num_experts)
    holder = (f"budget controller on (rate {null_config.budget_control_rate:g})"
              if null_config.budget_control_rate is not None else "budget controller off")
    if null_config.expert_bias_rate is not None:
        holder += f"; per-expert bias on (rate {null_config.expert_bias_rate:g})"
    path = expert_path_of(args)
    buffers = f"lean buffers {null_config.lean_buffer}; " if path == "lean" else ""
    dispatcher = f"dispatcher {args.moe_token_dispatcher_type}"
    if getattr(args, DISPATCHER_CHOSEN, False):
        dispatcher += (" (chosen for null experts: Megatron's default, allgather, would send "
                       "null slots too)")
    return (f"null experts: N={num_experts} real + M={null_config.null_copies_for(num_experts)} "
            f"null copies, top-{topk}; target real fraction {rho:.4g} ({rho * topk:.4g} real "
            f"experts per token on average, each token between {fewest} and {most}); {holder}; "
            f"{buffers}expert path {path}; {dispatcher}.")


def collect_layer_counters(routers, num_layers: int, topk: int, group=None,
                           num_experts: int = 0) -> torch.Tensor:
    """[layers, K+5] float64 on the host, summed over ``group`` (default: every rank); the
    routers' counters are reset. Row l is global layer l+1; columns: 0..K tokens whose routing
    chose r real experts, K+1 real assignments dropped over capacity, K+2 the sum of the
    tokens' real-logit spreads, K+3 the sum of the replicas' null selection biases, K+4 the
    number of replicas with a controlled bias (their mean is the bias: replicas agree). With
    num_experts N: [layers, K+5+N], columns K+5.. the real assignments per expert (before
    drops; they sum to the real assignments of columns 0..K).

    Every token is routed on one rank only (TP ranks route their sequence-parallel slices,
    a layer lives on one pipeline stage), so the sums count each token once; under EP each
    rank counts its own tokens over all N experts, and the sum is the global count.
    float64 holds the integer counts exactly (below 2**53) and lets one all-reduce carry all.
    """
    device = torch.device("cuda", torch.cuda.current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")
    counters = torch.zeros(num_layers, topk + 5 + num_experts, dtype=torch.float64,
                           device=device)
    for router in routers:
        row = counters[router.global_layer_number - 1]
        row[:topk + 1] += router.real_experts_histogram.sum(dim=0).to(device)
        row[topk + 1] += router.dropped_assignments.sum().to(device)
        row[topk + 2] += router.real_logit_spread_sum.to(device)[0]
        if budget_controlled(router):
            row[topk + 3] += router.null_selection_bias.to(device)[0]
            row[topk + 4] += 1
        if num_experts:
            row[topk + 5:] += router.real_assignments_per_expert.to(device)
        router.reset_routing_counters()
    torch.distributed.all_reduce(counters, group=group)
    return counters.cpu()  # host copy: FLOPs, the controller's error and logs are Python numbers


def statistics_from_counters(row: torch.Tensor, target_real_fraction: float
                             ) -> RoutingStatistics:
    """RoutingStatistics of one row of collect_layer_counters (a layer, or their sum)."""
    topk = row.numel() - 5
    return RoutingStatistics.from_histogram(row[:topk + 1].round().long(), target_real_fraction,
                                            int(row[topk + 1]), float(row[topk + 2]))


def null_expert_train_step(original, monitor: NullExpertMonitor):
    """Megatron's train_step, then the step's routing counts and controller update."""
    signature = inspect.signature(original)

    def train_step(*args, **kwargs):
        monitor.watch(signature.bind(*args, **kwargs).arguments["model"])
        monitor.start_of_step()
        result = original(*args, **kwargs)
        from megatron.training import get_args

        monitor.end_of_step(get_args())
        return result

    train_step.null_expert_monitor = monitor  # marks Megatron's loop as hooked
    return train_step


def null_expert_flops(original, measure_computed_experts):
    """Megatron's FLOPs with K routed experts replaced by the measured expert computations.

    measure_computed_experts(args) -> mean experts computed per token, or None to keep K.
    """

    def num_floating_point_operations(args, batch_size, *more, **kwargs):
        measured = measure_computed_experts(args) if args.num_experts else None
        if measured is None:
            return original(args, batch_size, *more, **kwargs)
        effective = copy.copy(args)
        effective.moe_router_topk = measured
        return original(effective, batch_size, *more, **kwargs)

    return num_floating_point_operations


def layer_scalars(monitor: NullExpertMonitor, args) -> Dict[int, Dict[str, float]]:
    """Per MoE layer (1-based) that routed tokens this step: its TensorBoard scalars."""
    biases = monitor.layer_biases(args) if monitor.controlled else {}
    scalars = {}
    for layer, statistics in monitor.layer_statistics(args).items():
        scalars[layer] = {"real_fraction": statistics.real_fraction,
                          "zero_real_fraction": statistics.zero_real_fraction}
        if statistics.dropped_real_slots:
            scalars[layer]["dropped_fraction"] = statistics.dropped_fraction
        if layer in biases:
            scalars[layer]["budget_bias"] = biases[layer]
    return scalars


def log_line_values(monitor: NullExpertMonitor, args) -> Dict[str, float]:
    """What the null experts add to Megatron's log line (and its TensorBoard losses)."""
    statistics = monitor.iteration_statistics(args)
    if not statistics.num_tokens:
        return {}
    values = {"null real experts/token": statistics.mean_real_experts,
              "null expected real experts/token": monitor.expected_real_experts,
              "null real fraction": statistics.real_fraction,
              "null zero-real tokens": statistics.zero_real_fraction}
    if args.moe_expert_capacity_factor is not None:
        values["null dropped real assignments"] = statistics.dropped_fraction
    if monitor.controlled:
        target = statistics.target_real_fraction
        biases = monitor.layer_biases(args)
        values["null budget bias"] = sum(biases.values()) / max(len(biases), 1)
        values["null worst layer real fraction error"] = max(
            abs(layer.real_fraction - target) for layer in monitor.layer_statistics(args).values())
    return values


# The load figures of interval_load_figures on the log line: the worst MoE layer's.
LOAD_LOG_LINE = {"expert_load_max_over_mean": "null busiest expert / mean",
                 "ep_rank_load_max_over_mean": "null busiest EP rank / mean",
                 "expert_load_max_over_mean_per_step": "null busiest expert / mean per step",
                 "ep_rank_load_max_over_mean_per_step": "null busiest EP rank / mean per step"}


def worst_layer_load_values(figures_by_layer: Dict[int, Dict[str, float]]) -> Dict[str, float]:
    """Log line name -> the largest of each load figure over the MoE layers."""
    values = {}
    for figures in figures_by_layer.values():
        for name, value in figures.items():
            key = LOAD_LOG_LINE[name]
            values[key] = max(values.get(key, value), value)
    return values


def print_as_is(total_loss_dict: dict, values: Dict[str, float], skipped_iter) -> None:
    """Megatron's log line prints total_loss_dict[key] / the interval's advanced iterations
    (the mean of the steps' values); set the sums so that it prints each value itself (and
    forget the last interval's load figures where this one has none)."""
    advanced = total_loss_dict.get("advanced iterations", 0) + (0 if skipped_iter else 1)
    for key in LOAD_LOG_LINE.values():
        total_loss_dict.pop(key, None)
    for key, value in values.items():
        total_loss_dict[key] = torch.tensor([value * max(advanced, 1)], dtype=torch.float64)


def traffic_summary(traffic: torch.Tensor, iteration: int, steps: int) -> Optional[str]:
    """One line: the all-to-all bytes per rank, MoE layer and step over the last ``steps``,
    mean over the ranks and the busiest rank (None when no rank holds a counting layer)."""
    per_layer = traffic[traffic[:, 8] > 0]
    if not len(per_layer):
        return None
    means = (per_layer[:, 4:8] / per_layer[:, 8:9]).mean(dim=0).tolist()
    maxima = per_layer[:, :4].mean(dim=0).tolist()
    mb = [f"{mean / 1e6:.4g} MB (busiest rank {most / 1e6:.4g})"
          for mean, most in zip(means, maxima)]
    return (f"all-to-all per rank, MoE layer and step, to and from other ranks (iterations "
            f"{iteration - steps + 1}-{iteration}, mean over {len(per_layer)} layers): "
            f"dispatch sends {mb[0]}, receives {mb[1]}; dispatch and combine, forward and "
            f"backward send {mb[2]}, receive {mb[3]}")


def traffic_scalars(traffic: torch.Tensor) -> Dict[int, Dict[str, float]]:
    """Per MoE layer (1-based): its all-to-all TensorBoard scalars, bytes per rank and step
    (``alltoall_{column}_bytes_{max,mean}`` for each of TRAFFIC_COLUMNS)."""
    scalars = {}
    for index, row in enumerate(traffic.tolist()):
        ranks = row[8]
        if ranks:
            scalars[index + 1] = {}
            for column, name in enumerate(TRAFFIC_COLUMNS):
                scalars[index + 1][f"alltoall_{name}_bytes_max"] = row[column]
                scalars[index + 1][f"alltoall_{name}_bytes_mean"] = row[4 + column] / ranks
    return scalars


def null_expert_training_log(original, monitor: NullExpertMonitor):
    """Megatron's training_log with the null statistics among the logged losses, and at each
    log interval the load figures over the interval's steps."""
    signature = inspect.signature(original)

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *more, **kwargs):
        from megatron.training import get_args, get_tensorboard_writer

        args = get_args()
        values = log_line_values(monitor, args)
        if values:
            device = next(iter(loss_dict.values())).device if loss_dict else "cpu"
            loss_dict = dict(loss_dict)
            for key, value in values.items():
                loss_dict[key] = torch.tensor([value], device=device)
        loads = monitor.interval_load_figures(args)
        load_values = worst_layer_load_values(loads)
        if monitor.null_config is not None and iteration % args.log_interval == 0:
            bound = signature.bind(loss_dict, total_loss_dict, learning_rate, iteration, *more,
                                   **kwargs)
            print_as_is(total_loss_dict, load_values, bound.arguments.get("skipped_iter", 0))
        report = original(loss_dict, total_loss_dict, learning_rate, iteration, *more, **kwargs)
        writer = get_tensorboard_writer()
        if writer is not None and iteration % args.log_interval == 0 and values:
            for layer, scalars in layer_scalars(monitor, args).items():
                for name, value in scalars.items():
                    writer.add_scalar(f"null_moe/{name}_layer_{layer:02d}", value, iteration)
            for layer, statistics in monitor.interval_layer_statistics(args).items():
                for name, value in (("interval_real_fraction", statistics.real_fraction),
                                    ("real_logit_spread", statistics.real_logit_spread)):
                    writer.add_scalar(f"null_moe/{name}_layer_{layer:02d}", value, iteration)
        if writer is not None:
            for key, value in load_values.items():
                writer.add_scalar(key, value, iteration)
            for layer, figures in loads.items():
                for name, value in figures.items():
                    writer.add_scalar(f"null_moe/{name}_layer_{layer:02d}", value, iteration)
        traffic = monitor.traffic
        summary = traffic_summary(traffic, iteration, monitor.traffic_steps) \
            if traffic is not None and iteration % args.log_interval == 0 and values else None
        if summary:
            _print_rank_0(summary)
        for layer, scalars in (traffic_scalars(traffic).items() if summary and writer else ()):
            for name, value in scalars.items():
                writer.add_scalar(f"null_moe/{name}_layer_{layer:02d}", value, iteration)
        return report

    return training_log


class CheckpointRefusal(ValueError):
    """What --load holds that this run cannot load as asked. Raised while Megatron loads the
    checkpoint, after the model is built; the entry point prints it as one error line."""


def _loads_optimizer_state(checkpoint_args, args, release: bool) -> bool:
    return not (release or args.finetune or args.no_load_optim
                or getattr(checkpoint_args, "no_save_optim", False))


def refuse_optimizer_state_across_expert_paths(checkpoint_args, args, release: bool) -> None:
    """The distributed optimizer stores its state in buckets laid out by parameter, and the
    two expert paths hold the experts in different parameters (one stacked tensor per linear
    vs one per expert), so that state would load into the wrong places or not at all. The
    model weights (and the non-distributed optimizer's state, tested) carry across."""
    saved, wanted = expert_path_of(checkpoint_args), expert_path_of(args)
    loads_optimizer = _loads_optimizer_state(checkpoint_args, args, release)
    if saved != wanted and loads_optimizer and args.use_distributed_optimizer:
        raise CheckpointRefusal(
            f"--moe-null-expert-path {wanted}: the checkpoint at --load was saved with "
            f"--moe-null-expert-path {saved}, and the distributed optimizer's state does not "
            f"carry across expert paths; allowed: --moe-null-expert-path {saved}, or "
            "--no-load-optim (the weights load, the optimizer state starts fresh).")


_FRESH_OPTIMIZER = ("--no-load-optim (the weights and the null experts' state load, the "
                    "optimizer starts fresh)")


def _has_expert_groups(args) -> bool:
    """Megatron's rule for experts with process groups of their own (and an optimizer of
    their own, chained after the dense one): EP > 1, or expert TP other than TP."""
    tensor_parallel = getattr(args, "tensor_model_parallel_size", 1) or 1
    expert_tensor_parallel = getattr(args, "expert_tensor_parallel_size", None) or tensor_parallel
    return ((getattr(args, "expert_model_parallel_size", 1) or 1) > 1
            or expert_tensor_parallel != tensor_parallel)


def _expert_layout(args) -> str:
    return (f"--expert-model-parallel-size {getattr(args, 'expert_model_parallel_size', 1)}, "
            f"--expert-tensor-parallel-size {getattr(args, 'expert_tensor_parallel_size', None)}"
            f", --tensor-model-parallel-size {getattr(args, 'tensor_model_parallel_size', 1)}")


def refuse_optimizer_state_across_expert_groups(checkpoint_args, args, release: bool) -> None:
    """With expert groups (EP > 1, or expert TP other than TP) Megatron keeps the experts'
    optimizer state in an optimizer of its own; without them one optimizer holds all.
    megatron-core 0.19.2 loads neither layout into the other (measured on the CPU, default
    optimizer: 1 process to EP 2 "Expected 2 entries in state dict, but got 4", EP 4 to 1
    process "Could not find parameter group with key ..."). The weights, the null row and
    the controller's state reshard (tested)."""
    if not (getattr(args, "num_experts", None)
            and _loads_optimizer_state(checkpoint_args, args, release)):
        return
    saved, wanted = _has_expert_groups(checkpoint_args), _has_expert_groups(args)
    if saved != wanted:
        raise CheckpointRefusal(
            f"{_expert_layout(args)}: the checkpoint at --load was saved with "
            f"{_expert_layout(checkpoint_args)}, {'with' if saved else 'without'} the experts' "
            "own optimizer (Megatron chains one when EP > 1 or the expert TP differs from TP), "
            "and megatron-core 0.19.2 cannot load optimizer state across that change; "
            f"allowed: expert groups on both sides or on neither, or {_FRESH_OPTIMIZER}.")


# Parallel sizes that lay out the distributed optimizer's buckets: (flag, args attribute).
_BUCKET_LAYOUT_SIZES = (
    ("--tensor-model-parallel-size", "tensor_model_parallel_size"),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size"),
    ("--virtual-pipeline-model-parallel-size", "virtual_pipeline_model_parallel_size"),
    ("--expert-model-parallel-size", "expert_model_parallel_size"),
    ("--expert-tensor-parallel-size", "expert_tensor_parallel_size"),
)


def refuse_distributed_optimizer_state_megatron_cannot_load(checkpoint_args, args,
                                                            release: bool,
                                                            has_apex_or_te: bool) -> None:
    """What megatron-core 0.19.2 cannot load of the distributed optimizer's state, refused
    before it fails obscurely (both measured on the CPU):

    - Without apex or Transformer Engine its DistributedOptimizer runs torch's Adam and
      cannot load any saved state: it asserts on the step count of the not yet stepped
      optimizer (``DistributedOptimizer.state_dict``).
    - Its default checkpoint layout ('dp_reshardable', buckets of this rank's data-parallel
      group) reshards across data-parallel sizes only; another TP or PP size it refuses
      naming a deprecated flag, another EP size fails with a KeyError on a bucket.
      ``--dist-ckpt-optim-fully-reshardable`` saves a layout that reshards.
    """
    if not (args.use_distributed_optimizer
            and _loads_optimizer_state(checkpoint_args, args, release)):
        return
    if not has_apex_or_te:
        raise CheckpointRefusal(
            "--use-distributed-optimizer: without apex or Transformer Engine (torch's Adam) "
            "megatron-core 0.19.2 cannot load the distributed optimizer's state saved at "
            "--load (it asserts on the step count of the fresh optimizer); allowed: "
            f"{_FRESH_OPTIMIZER}, or the default optimizer (without --use-distributed-optimizer).")
    dp_reshardable = (
        getattr(checkpoint_args, "use_distributed_optimizer", False)
        and getattr(checkpoint_args, "ckpt_format", None) == "torch_dist"
        and not getattr(checkpoint_args, "dist_ckpt_optim_fully_reshardable", False))
    if not dp_reshardable:
        return
    changed = [f"{flag} {getattr(checkpoint_args, name, None)} -> {getattr(args, name, None)}"
               for flag, name in _BUCKET_LAYOUT_SIZES
               if getattr(checkpoint_args, name, None) != getattr(args, name, None)]
    if changed:
        raise CheckpointRefusal(
            "--use-distributed-optimizer: the checkpoint at --load holds the distributed "
            "optimizer's state in Megatron's default layout ('dp_reshardable'), which "
            "reshards across data-parallel sizes only, and this run changes "
            f"{', '.join(changed)}; allowed: the checkpoint's sizes, or {_FRESH_OPTIMIZER}. "
            "Saving with --dist-ckpt-optim-fully-reshardable writes a layout that reshards.")


VOCAB_DIVISIBLE_FLAG = "--make-vocab-size-divisible-by"


def vocabulary_multiples_keeping(padded_vocab_size: int, vocab_size: int,
                                 tensor_parallel_size: int) -> list:
    """The --make-vocab-size-divisible-by values d for which Megatron pads ``vocab_size``
    tokens to ``padded_vocab_size`` rows at this TP: ceil(V / (d*TP)) * d*TP = padded."""
    keeping = []
    for divisible_by in range(1, padded_vocab_size // tensor_parallel_size + 1):
        multiple = divisible_by * tensor_parallel_size
        if padded_vocab_size % multiple == 0 and padded_vocab_size - multiple < vocab_size:
            keeping.append(divisible_by)
    return keeping


def refuse_padded_vocabulary_change(checkpoint_args, args, vocab_size: int) -> None:
    """Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP and
    loads a checkpoint of fewer rows into the first rows of this run's embedding and output
    layer without a word: the rest stay zero, their logits join the softmax and the loss
    jumps (by about ln 2 from 128 to 256 rows). Refused, naming the value that keeps the
    checkpoint's rows at this TP."""
    saved = getattr(checkpoint_args, "padded_vocab_size", None)
    wanted = getattr(args, "padded_vocab_size", None)
    if saved is None or wanted is None or saved == wanted:
        return
    tensor_parallel = args.tensor_model_parallel_size
    saved_layout = (f"{VOCAB_DIVISIBLE_FLAG} "
                    f"{getattr(checkpoint_args, 'make_vocab_size_divisible_by', None)} at "
                    f"--tensor-model-parallel-size "
                    f"{getattr(checkpoint_args, 'tensor_model_parallel_size', None)}")
    keeping = vocabulary_multiples_keeping(saved, vocab_size, tensor_parallel)
    allowed = (f"{VOCAB_DIVISIBLE_FLAG} {max(keeping)} (the largest of the {len(keeping)} "
               "values that keep it)" if keeping else
               f"no {VOCAB_DIVISIBLE_FLAG} pads {vocab_size} tokens to {saved} rows at "
               f"--tensor-model-parallel-size {tensor_parallel}: the checkpoint's TP")
    raise CheckpointRefusal(
        f"{VOCAB_DIVISIBLE_FLAG} {args.make_vocab_size_divisible_by}: the checkpoint at --load "
        f"has a vocabulary of {saved} rows ({vocab_size} tokens padded by {saved_layout}), "
        f"this run pads it to {wanted} at --tensor-model-parallel-size {tensor_parallel}, and "
        f"Megatron would fill the extra rows with zeros that join the softmax; allowed: "
        f"{allowed}.")


def _unpadded_vocab_size(args) -> int:
    from megatron.training import get_tokenizer

    try:
        return get_tokenizer().vocab_size
    except (AssertionError, AttributeError):  # no tokenizer built (a library caller)
        return args.vocab_size


def refuse_missing_expert_bias(load_dir, error: BaseException) -> None:
    """A checkpoint saved without the per-expert bias, loaded by a run with it: Megatron's
    default strictness stops at the missing key; say which flag starts the bias at zero."""
    if "router.expert_bias from model not in state dict" in str(error):
        raise CheckpointRefusal(
            f"the checkpoint {load_dir} has no per-expert bias (router.expert_bias: it was "
            "saved without --moe-router-enable-expert-bias); allowed: --dist-ckpt-strictness "
            "log_all, which loads the rest and starts the bias at zero, or leave "
            "--moe-router-enable-expert-bias off.") from error


def null_expert_checkpoint_load(original):
    """Megatron's _load_base_checkpoint, then the checks of what it will load: a vocabulary
    padded to other rows, and optimizer state saved on the other expert path, across expert
    groups, or a distributed optimizer's state Megatron cannot load."""
    from megatron.core.optimizer import distrib_optimizer
    from torch.distributed.checkpoint.api import CheckpointException

    def _load_base_checkpoint(load_dir, args, *more, **kwargs):
        try:
            result = original(load_dir, args, *more, **kwargs)
        except (KeyError, CheckpointException) as error:  # torch's wraps each rank's KeyError
            refuse_missing_expert_bias(load_dir, error)
            raise
        state_dict, _, release, _ = result
        if state_dict and state_dict.get("args") is not None:
            saved_args = state_dict["args"]
            if (getattr(saved_args, "padded_vocab_size", None)
                    != getattr(args, "padded_vocab_size", None)):
                refuse_padded_vocabulary_change(saved_args, args, _unpadded_vocab_size(args))
            refuse_optimizer_state_across_expert_paths(state_dict["args"], args, release)
            refuse_optimizer_state_across_expert_groups(state_dict["args"], args, release)
            refuse_distributed_optimizer_state_megatron_cannot_load(
                state_dict["args"], args, release, distrib_optimizer.HAVE_APEX_OR_TE)
        return result

    return _load_base_checkpoint


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
def null_expert_training(on_cpu: Optional[bool] = None):
    """Everything Megatron's loop needs for null experts; yields the NullExpertMonitor,
    whose ``configure(args)`` the caller runs after parsing. on_cpu: default, no CUDA.

    Enter it once: the entry point and the patched Megatron-LM ``pretrain_gpt.py`` enter it
    themselves, so a second one around them is refused (RuntimeError) before anything
    changes.
    """
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.checkpointing as checkpointing
    import megatron.training.training as training

    from megatron_null_moe.cpu import cpu_harness

    if hasattr(training.train_step, "null_expert_monitor"):
        raise RuntimeError(
            "null_expert_training() is already active: python -m megatron_null_moe.pretrain_gpt "
            "and the patched Megatron-LM pretrain_gpt.py enter it themselves. Enter it once: "
            "remove the outer null_expert_training() (its hooks would run twice per step).")

    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    monitor = NullExpertMonitor(on_cpu=on_cpu)
    line = environment_line(on_cuda=not on_cpu)
    if on_cpu:
        line = f"{line}, gloo (no CUDA: running on the CPU through the CPU harness)"
    if line:
        _print_rank_0(line)  # instead of Megatron's import-time notices (cli.py)
    with contextlib.ExitStack() as stack:
        if on_cpu:
            stack.enter_context(cpu_harness())
        stack.enter_context(_attribute(
            dataset_utils, "compile_helpers",
            _compile_helpers_unless_shipped(dataset_utils.compile_helpers)))
        stack.enter_context(_attribute(
            training, "train_step", null_expert_train_step(training.train_step, monitor)))
        stack.enter_context(_attribute(
            training, "num_floating_point_operations",
            null_expert_flops(training.num_floating_point_operations,
                              monitor.mean_computed_experts)))
        stack.enter_context(_attribute(
            training, "training_log", null_expert_training_log(training.training_log, monitor)))
        stack.enter_context(_attribute(
            checkpointing, "_load_base_checkpoint",
            null_expert_checkpoint_load(checkpointing._load_base_checkpoint)))
        yield monitor
