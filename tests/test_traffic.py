"""All-to-all traffic: the dispatchers count exactly the real assignments that cross ranks."""

import importlib
from pathlib import Path

import pytest
import torch

from megatron_null_moe.cpu_ranks import run_on_ranks
from megatron_null_moe.traffic import AllToAllTraffic, alltoall_bytes
from traffic_workers import group_limited_traffic, layer_traffic

PROBS_BYTES = 4  # routing weights cross the dispatch all-to-all in fp32


def test_alltoall_bytes_leave_out_the_rows_a_rank_keeps():
    # Rank 1 sends 3, 0, 5 rows and receives 2, 0, 7 rows; 16-byte rows.
    assert alltoall_bytes([3, 0, 5], [2, 0, 7], rank=1, row_bytes=16) == (128, 144, 0)
    assert alltoall_bytes([3, 4, 5], [2, 4, 7], rank=1, row_bytes=2) == (16, 18, 8)


def test_backward_is_counted_when_autograd_runs_it():
    traffic = AllToAllTraffic()
    received = torch.zeros(5, 3, requires_grad=True)  # 5 rows of 3 fp32 from ranks 0 and 1
    traffic.record("combine", [4, 1], [2, 3], 0, [received])
    assert traffic.bytes_by_phase["combine"] == [1 * 12, 3 * 12, 4 * 12]
    assert traffic.bytes_by_phase["combine backward"] == [0, 0, 0]
    (received * 2).sum().backward()  # gradients go back: 3 rows out, 1 row in
    assert traffic.bytes_by_phase["combine backward"] == [3 * 12, 1 * 12, 2 * 12]
    traffic.reset()
    assert traffic.sent == traffic.received == traffic.kept == 0


CASES = [("megatron", 0.5, torch.float32), ("lean", 0.5, torch.bfloat16),
         ("megatron", 1.0, torch.float32), ("lean", 1.0, torch.float32)]


@pytest.mark.world_size(4)
def test_counts_equal_the_real_assignments_crossing_ranks_under_ep4():
    world = 4
    results = run_on_ranks(layer_traffic, world, CASES)
    for index, (path, real_fraction, dtype) in enumerate(CASES):
        case = [result[index] for result in results]
        for rank, result in enumerate(case):
            row = result["hidden_bytes"]
            to_others = sum(result["rows_to"]) - result["rows_to"][rank]
            from_others = sum(result["rows_from"]) - result["rows_from"][rank]
            kept = result["rows_to"][rank]
            # Dispatch carries each real assignment's row and its routing weight; combine the
            # expert outputs back; each backward the gradients the other way.
            expected = {
                "dispatch": [to_others * (row + PROBS_BYTES), from_others * (row + PROBS_BYTES),
                             kept * (row + PROBS_BYTES)],
                "combine": [from_others * row, to_others * row, kept * row],
                "dispatch backward": [from_others * (row + PROBS_BYTES),
                                      to_others * (row + PROBS_BYTES), kept * (row + PROBS_BYTES)],
                "combine backward": [to_others * row, from_others * row, kept * row],
            }
            assert result["by_phase"] == expected, (path, real_fraction, rank)
            # The same bytes as the all-to-alls really moved: tokens, routing weights and
            # outputs forward, their gradients backward.
            assert len(result["wire"]) == 6 and to_others > 0 and from_others > 0
            wire = [sum(call[i] for call in result["wire"]) for i in range(3)]
            assert wire == [result["sent"], result["received"], result["kept"]]
            if real_fraction == 1.0:  # upstream's traffic: every token's K rows
                assert sum(result["rows_to"]) == result["slots"]
            else:
                assert sum(result["rows_to"]) < result["slots"]
        assert sum(r["sent"] for r in case) == sum(r["received"] for r in case)
        # Over a step every rank sends what it receives: combine and backward mirror dispatch.
        assert all(r["sent"] == r["received"] for r in case)
        # Collected over the ranks: maxima, sums and the number of ranks holding the layer.
        per_rank = [[r["by_phase"]["dispatch"][0], r["by_phase"]["dispatch"][1], r["sent"],
                     r["received"]] for r in case]
        collected = case[0]["collected"]
        assert all(r["collected"] == collected for r in case)
        assert collected == [max(column) for column in zip(*per_rank)] + \
            [sum(column) for column in zip(*per_rank)] + [world]


# (expert path, dtype, group_topk): one group per EP rank (device-limited routing), and the
# same layer without the limit.
GROUPED_CASES = [(path, dtype, group_topk)
                 for path, dtype in (("megatron", torch.float32), ("lean", torch.bfloat16))
                 for group_topk in (1, 2, None)]


@pytest.mark.world_size(4)
def test_device_limited_routing_sends_each_token_to_at_most_group_topk_ranks():
    # N = 16 experts, 4 per rank, K = 4, rho 0.5 (M = 16) at EP = 4: group_topk = 1 and 2
    # divide K with K / group_topk <= 4 experts per group.
    world = 4
    results = run_on_ranks(group_limited_traffic, world, GROUPED_CASES)
    most_ranks = {}  # (path, group_topk) -> most ranks one token's rows went to
    for index, (path, _, group_topk) in enumerate(GROUPED_CASES):
        case = [result[index] for result in results]
        total_real, total_sent_and_kept, total_combined = 0, 0, 0
        ranks_per_token = []
        for rank, result in enumerate(case):
            label = (path, group_topk, rank)
            assert result["same_routing"], label
            expected = torch.tensor(result["expected_TE"])  # [tokens, ranks] real assignments
            # The rows that left for each rank are, token by token, its real assignments
            # to that rank's experts; the dispatcher split and counted the same.
            assert result["wire_TE"] == result["expected_TE"], label
            rows_to = expected.sum(dim=0).tolist()
            assert result["wire_splits"] == result["input_splits"] == rows_to, label
            row = result["hidden_bytes"] + PROBS_BYTES
            to_others = sum(rows_to) - rows_to[rank]
            from_others = sum(result["rows_from"]) - result["rows_from"][rank]
            assert result["by_phase"]["dispatch"] == [
                to_others * row, from_others * row, rows_to[rank] * row], label
            assert result["by_phase"]["combine"] == [
                from_others * result["hidden_bytes"], to_others * result["hidden_bytes"],
                rows_to[rank] * result["hidden_bytes"]], label
            ranks_per_token += (torch.tensor(result["wire_TE"]) > 0).sum(dim=1).tolist()
            # Only real assignments cross: fewer rows than the K slots of the tokens.
            assert sum(rows_to) == result["real_slots"] < result["slots"], label
            total_real += result["real_slots"]
            total_sent_and_kept += sum(result["by_phase"]["dispatch"][::2])
            total_combined += sum(result["by_phase"]["combine"][::2])
        most_ranks[path, group_topk] = max(ranks_per_token)
        if group_topk is not None:
            assert most_ranks[path, group_topk] <= group_topk, (path, group_topk)
        # Over the ranks: the hidden rows of the real assignments, no null slot's (and in the
        # dispatch their routing weights).
        hidden_bytes = case[0]["hidden_bytes"]
        assert total_combined == total_real * hidden_bytes, (path, group_topk)
        assert total_sent_and_kept == total_real * (hidden_bytes + PROBS_BYTES), path
        assert sum(sum(r["by_phase"]["dispatch"][1:]) for r in case) == total_sent_and_kept
    # Same weights and tokens without the limit: some token's rows reach more ranks.
    for path, _, group_topk in GROUPED_CASES:
        if group_topk is not None:
            assert most_ranks[path, None] > group_topk, (path, group_topk, most_ranks)


@pytest.mark.world_size(2)
def test_traffic_table_script_runs_and_agrees_with_the_counters(tmp_path, monkeypatch):
    # Imported by name (the spawned ranks import it too; they inherit sys.path).
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    benchmark = importlib.import_module("alltoall_traffic")
    rows = benchmark.main(["--world", "2", "--ep", "2", "--experts", "8", "--hidden", "16",
                           "--ffn", "8", "--tokens", "32", "--budget-steps", "2", "--steps", "2",
                           "--output", str(tmp_path / "traffic.json")])
    by_config = {row["config"]: row for row in rows}
    assert by_config["plugin K8 rho=0.5"]["counters_agree"] is True
    upstream = by_config["upstream K8 rho=1"]
    assert upstream["real_fraction"] == 1.0 and upstream["sent_vs_upstream_K8"] == 1.0
    # 8 experts, top-8: every token sends one row to each expert, half of them to the other rank.
    assert upstream["dispatch_sent_max"] == 32 * 4 * (16 * 2 + 4)
