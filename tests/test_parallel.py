"""Null-expert MoE layer across gloo processes equals one process with the same weights."""

import pytest
import torch

from megatron_null_moe.cpu import cpu_harness
from megatron_null_moe.cpu_ranks import run_on_ranks
from parallel_workers import checkpoint_interchange, global_balance_loss, initial_weights, \
    run_moe_layer

NO_AUX = dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)


def in_process(fn, *args):
    """fn as rank 0 of a world of 1, in this process."""
    with cpu_harness():
        return fn(0, 1, *args)


def _data(num_ranks, seq_per_rank, seed=11, hidden=16, batch=2):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(seq_per_rank, batch, hidden, generator=generator)
              for _ in range(num_ranks)]
    targets = [torch.randn(seq_per_rank, batch, hidden, generator=generator)
               for _ in range(num_ranks)]
    return inputs, targets


def _assert_matches_reference(results, reference):
    output = torch.cat([r["output"] for r in results], dim=0)
    torch.testing.assert_close(output, reference["output"], rtol=1e-5, atol=1e-6)
    input_grad = torch.cat([r["input_grad"] for r in results], dim=0)
    torch.testing.assert_close(input_grad, reference["input_grad"], rtol=1e-5, atol=1e-6)
    summed = {}
    for result in results:
        for name, grad in result["grads"].items():
            summed[name] = summed.get(name, 0) + grad
    assert set(summed) == set(reference["grads"])
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(summed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _run_and_compare(parallel_sizes, world_size, overrides, inputs, targets, weights,
                     expert_path="megatron"):
    """The layer on world_size ranks (on expert_path) against the Megatron path on one."""
    results = run_on_ranks(run_moe_layer, world_size, parallel_sizes, overrides, 0.5, weights,
                           inputs, targets, expert_path)
    single_rank = {k: v for k, v in overrides.items() if k != "sequence_parallel"}
    reference = in_process(run_moe_layer, {}, single_rank, 0.5, weights,
                           [torch.cat(inputs)], [torch.cat(targets)])
    _assert_matches_reference(results, reference)
    return results


@pytest.mark.world_size(4)
@pytest.mark.parametrize("expert_parallel", [2, 4])
def test_expert_parallel_equals_single_rank(expert_parallel):
    weights = in_process(initial_weights, NO_AUX, 0.5)
    inputs, targets = _data(expert_parallel, seq_per_rank=6)
    results = _run_and_compare({"expert_model_parallel_size": expert_parallel}, expert_parallel,
                               NO_AUX, inputs, targets, weights)
    for result in results:
        rows = result["rows"]
        # Only real assignments are permuted and sent, not tokens * K.
        assert rows["sent"] == rows["routed"] < rows["slots"]
    assert sum(r["rows"]["received"] for r in results) == sum(r["rows"]["sent"] for r in results)


@pytest.mark.world_size(4)
@pytest.mark.parametrize("expert_parallel", [2, 4])
def test_lean_expert_parallel_equals_single_rank_megatron_path(expert_parallel):
    weights = in_process(initial_weights, NO_AUX, 0.5)
    inputs, targets = _data(expert_parallel, seq_per_rank=6, seed=12)
    results = _run_and_compare({"expert_model_parallel_size": expert_parallel}, expert_parallel,
                               NO_AUX, inputs, targets, weights, expert_path="lean")
    for result in results:
        assert result["rows"]["sent"] == result["rows"]["routed"] < result["rows"]["slots"]
        # The one host read the all-to-all needs: the split sizes.
        assert result["host_reads"] == ["TensorBase.tolist"]


@pytest.mark.world_size(2)
def test_lean_checkpoints_interchange_with_sequential_mlp_under_expert_parallel(tmp_path):
    results = run_on_ranks(checkpoint_interchange, 2, str(tmp_path))
    for direction in ("megatron", "lean"):
        for result in results:
            saved, loaded = result[direction]["saved"], result[direction]["loaded"]
            assert saved.keys() == loaded.keys()
            for name, tensor in saved.items():
                torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    # The EP=2 lean checkpoint also loads into one rank's SequentialMLP layer (all 8 experts).
    from parallel_workers import load_into_single_rank

    loaded = in_process(load_into_single_rank, str(tmp_path / "lean"))
    saved = {name: tensor for result in results for name, tensor in
             result["lean"]["saved"].items()}
    assert {name for name in loaded if "local_experts" in name} == \
        {name for name in saved if "local_experts" in name}
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("expert_path", ["megatron", "lean"])
def test_tensor_parallel_with_sequence_parallel_equals_single_rank(expert_path):
    overrides = dict(NO_AUX, sequence_parallel=True)
    weights = in_process(initial_weights, NO_AUX, 0.5)
    inputs, targets = _data(2, seq_per_rank=5)
    sizes = {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1}
    _run_and_compare(sizes, 2, overrides, inputs, targets, weights, expert_path)


@pytest.mark.world_size(2)
def test_all_null_on_one_expert_rank():
    weights = in_process(initial_weights, NO_AUX, 0.5)
    weights["router.null_weight"] = torch.full_like(weights["router.null_weight"], 4.0)
    inputs, targets = _data(2, seq_per_rank=4)
    inputs = [inputs[0].abs(), -inputs[1].abs()]  # rank 0: null wins everywhere; rank 1: never
    results = _run_and_compare({"expert_model_parallel_size": 2}, 2, NO_AUX, inputs, targets,
                               weights)
    assert results[0]["rows"]["sent"] == 0 and torch.all(results[0]["output"] == 0)
    assert results[1]["rows"]["sent"] == results[1]["rows"]["slots"]


@pytest.mark.world_size(2)
def test_global_batch_balance_loss_over_data_parallel_ranks_equals_one_batch():
    overrides = dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.02,
                     moe_z_loss_coeff=None)
    weights = in_process(initial_weights, overrides, 0.5)
    inputs, _ = _data(2, seq_per_rank=8)
    results = run_on_ranks(global_balance_loss, 2, 0.5, weights, inputs)
    (single,) = [in_process(global_balance_loss, 0.5, weights, [torch.cat(inputs)])]
    assert [r["dp_size"] for r in results] == [2, 2]
    assert sum(r["loss"] for r in results) == pytest.approx(single["loss"], rel=1e-5)
    for result in results:
        torch.testing.assert_close(result["counts"], single["counts"])
        assert result["reset"] == 0.0
    assert single["counts"][-1] > 0, "no null slot was taken"
