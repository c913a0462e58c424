"""All-to-all traffic of the MoE token dispatchers: the bytes each rank sends and receives.

With null experts only real assignments cross the expert-parallel all-to-all, so its traffic
is what null slots save. The alltoall dispatchers (``dispatcher.py``, ``lean/dispatcher.py``)
record every all-to-all they run from the split sizes they already hold on the host: no
extra host-device sync, and nothing at EP = 1 (there is no all-to-all). The backward of each
all-to-all (the same splits reversed, gradients instead of activations) is recorded when
autograd runs it, by a hook on the tensor the forward received.

Four phases per MoE layer: dispatch (token rows and their routing weights to the experts'
ranks), combine (expert outputs back), and the backward of each. Per phase, bytes sent to
other ranks, received from other ranks, and kept: the rows a rank sends to itself, a local
copy inside the all-to-all that crosses no link.
"""

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

PHASES = ("dispatch", "combine", "dispatch backward", "combine backward")


def alltoall_bytes(send_rows: Sequence[int], receive_rows: Sequence[int], rank: int,
                   row_bytes: int) -> Tuple[int, int, int]:
    """(sent, received, kept) bytes of one all-to-all seen from ``rank``.

    send_rows[j]: rows this rank sends to rank j (the input split sizes); receive_rows[j]:
    rows it receives from rank j (the output split sizes); row_bytes: bytes of one row.
    """
    sent = sum(int(rows) for rows in send_rows) - int(send_rows[rank])
    received = sum(int(rows) for rows in receive_rows) - int(receive_rows[rank])
    return sent * row_bytes, received * row_bytes, int(send_rows[rank]) * row_bytes


def row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one row (first dimension) of ``tensor``; metadata only, no sync."""
    return math.prod(tensor.shape[1:]) * tensor.element_size()


@dataclass
class AllToAllTraffic:
    """Bytes one MoE layer's all-to-alls moved on this rank since the last reset.

    bytes_by_phase[phase] = [sent, received, kept] for each of PHASES.
    """

    bytes_by_phase: Dict[str, List[int]] = field(
        default_factory=lambda: {phase: [0, 0, 0] for phase in PHASES})

    def record(self, phase: str, send_rows: Sequence[int], receive_rows: Sequence[int],
               rank: int, received: Sequence[torch.Tensor]) -> None:
        """One all-to-all per tensor in ``received`` (its output, rows first), and its backward
        when autograd runs it."""
        send_rows = tuple(int(rows) for rows in send_rows)
        receive_rows = tuple(int(rows) for rows in receive_rows)
        for tensor in received:
            self._add(phase, send_rows, receive_rows, rank, tensor)
            if tensor.requires_grad:
                tensor.register_hook(functools.partial(
                    self._add, f"{phase} backward", receive_rows, send_rows, rank))

    def _add(self, phase, send_rows, receive_rows, rank, tensor) -> None:
        counts = alltoall_bytes(send_rows, receive_rows, rank, row_bytes(tensor))
        totals = self.bytes_by_phase[phase]
        for index, count in enumerate(counts):
            totals[index] += count

    def add(self, other: "AllToAllTraffic") -> None:
        """Add ``other``'s bytes to these."""
        for phase, totals in other.bytes_by_phase.items():
            mine = self.bytes_by_phase[phase]
            mine[:] = [a + b for a, b in zip(mine, totals)]

    def reset(self) -> None:
        for totals in self.bytes_by_phase.values():
            totals[:] = [0, 0, 0]

    @property
    def sent(self) -> int:
        """Bytes sent to other ranks, all phases."""
        return sum(totals[0] for totals in self.bytes_by_phase.values())

    @property
    def received(self) -> int:
        """Bytes received from other ranks, all phases."""
        return sum(totals[1] for totals in self.bytes_by_phase.values())

    @property
    def kept(self) -> int:
        """Bytes of the rows a rank sent to itself, all phases."""
        return sum(totals[2] for totals in self.bytes_by_phase.values())


def alltoall_traffic(model: torch.nn.Module) -> Dict[int, AllToAllTraffic]:
    """Global layer number -> traffic counter of every MoE layer in ``model`` whose
    dispatcher counts (the null-aware alltoall and the lean one)."""
    counters = {}
    for module in model.modules():
        traffic = getattr(getattr(module, "token_dispatcher", None), "alltoall_traffic", None)
        if traffic is not None:
            counters[module.router.global_layer_number] = traffic
    return counters


TRAFFIC_COLUMNS = ("dispatch_sent", "dispatch_received", "sent", "received")
"""What collect_alltoall_traffic reduces per rank: the forward dispatch's bytes to and from
other ranks (a rank's own tokens' real assignments out, its experts' load in), and all four
phases'. Over a training step all four send what they receive: combine and the backward
mirror the dispatch."""


def rank_traffic(traffic: AllToAllTraffic) -> List[int]:
    """This rank's TRAFFIC_COLUMNS."""
    dispatch = traffic.bytes_by_phase["dispatch"]
    return [dispatch[0], dispatch[1], traffic.sent, traffic.received]


def collect_alltoall_traffic(counters: Dict[int, AllToAllTraffic], num_layers: int,
                             group=None) -> torch.Tensor:
    """[layers, 9] float64 on the host over the ranks of ``group`` (default: all). Row l is
    global layer l+1; columns 0-3: the maxima over ranks of TRAFFIC_COLUMNS, 4-7: their sums,
    8: the number of ranks that hold the layer (sums / ranks = means over them).

    Two all-reduces of [layers, 4] and [layers, 5] numbers (max, sum); float64 holds the
    counts exactly.
    """
    device = torch.device("cuda", torch.cuda.current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")
    maxima = torch.zeros(num_layers, 4, dtype=torch.float64)
    sums = torch.zeros(num_layers, 5, dtype=torch.float64)
    for layer, traffic in counters.items():
        values = rank_traffic(traffic)
        maxima[layer - 1] = torch.tensor(values, dtype=torch.float64)
        sums[layer - 1] = torch.tensor(values + [1], dtype=torch.float64)
    maxima, sums = maxima.to(device), sums.to(device)
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(sums, group=group)
    return torch.cat([maxima, sums], dim=1).cpu()


@contextlib.contextmanager
def wire_log() -> Iterator[List[Tuple[int, int, int]]]:
    """Every all_to_all_single this process runs while inside, as (sent, received, kept)
    bytes from the tensors and split sizes it is handed, in call order: what the counters
    above must equal, measured apart from them (tests, benchmarks/alltoall_traffic.py)."""
    calls = []
    original = torch.distributed.all_to_all_single

    def logged(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
               **kwargs):
        rank = torch.distributed.get_rank(group)
        row = input[0].numel() * input.element_size() if input.shape[0] else 0
        kept = input_split_sizes[rank] * row
        calls.append((input.numel() * input.element_size() - kept,
                      output.numel() * output.element_size() - kept, kept))
        return original(output, input, output_split_sizes=output_split_sizes,
                        input_split_sizes=input_split_sizes, group=group, **kwargs)

    torch.distributed.all_to_all_single = logged
    try:
        yield calls
    finally:
        torch.distributed.all_to_all_single = original
