"""All-to-all bytes per rank, MoE layer and training step under expert parallelism (CPU):
upstream Megatron-Core K8 and K4 at rho = 1 against the plugin's K8 at rho = 0.5 held at
the budget.

    python benchmarks/alltoall_traffic.py                  # EP 4 and 8 on 8 gloo ranks
    python benchmarks/alltoall_traffic.py --world 2 --ep 2 --budget-steps 3 --steps 2  # smoke

Every rank routes its own tokens (random hidden states, the same for every configuration)
through one MoE layer, forward and backward, as a training step does. The plugin's K8
rho = 0.5 layer starts with --budget-steps steps of the budget controller (counters summed
over all ranks after each step, as the entry point does), since a fresh router routes far
more than rho to real experts; the controller keeps running while the --steps measured
steps run, and the realised real fraction is reported beside the bytes. Bytes are what
``torch.distributed.all_to_all_single`` moved, to and from other ranks (the rows a rank
sends itself cross no link), for every configuration; the plugin's own counters
(``megatron_null_moe/traffic.py``) must agree and are checked. Writes JSON and prints a
Markdown table: per configuration and EP size, the forward dispatch's bytes sent (the
rank's real assignments to experts on other ranks) and received (its experts' load from
other ranks), and all four all-to-alls' (dispatch, combine, forward, backward), mean and
maximum over ranks.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# (name, topk, rho); rho None: upstream Megatron-Core's MoELayer and dispatcher.
CONFIGS = [("upstream K8 rho=1", 8, None), ("upstream K4 rho=1", 4, None),
           ("plugin K8 rho=0.5", 8, 0.5)]
COLUMNS = ("dispatch_sent", "dispatch_received", "sent", "received")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="All-to-all bytes per rank, MoE layer and training step under expert "
                    "parallelism (CPU): upstream Megatron-Core K8 and K4 at rho = 1 against "
                    "the plugin's K8 at rho = 0.5 held at the budget. Writes JSON and prints "
                    "a Markdown table.")
    parser.add_argument("--world", type=int, default=8, help="Gloo ranks (default: 8).")
    parser.add_argument("--ep", default="4,8",
                        help="Expert-parallel sizes, comma-separated; each must be at least 2 "
                             "and divide --world and --experts (default: 4,8).")
    parser.add_argument("--experts", type=int, default=128,
                        help="Experts in the MoE layer (default: 128).")
    parser.add_argument("--hidden", type=int, default=256, help="Hidden size (default: 256).")
    parser.add_argument("--ffn", type=int, default=64,
                        help="Expert FFN hidden size, GLU (default: 64).")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="Tokens per rank and step, an even number (default: 2048).")
    parser.add_argument("--budget-steps", type=int, default=40,
                        help="Steps of the budget controller before the measured ones, for the "
                             "plugin's rho < 1 layer (default: 40).")
    parser.add_argument("--steps", type=int, default=10,
                        help="Measured steps, at least 1 (default: 10).")
    parser.add_argument("--output", type=Path, default=Path("outputs/alltoall_traffic.json"),
                        help="The JSON file written (default: outputs/alltoall_traffic.json).")
    return parser


def parse_arguments(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.ep = [int(size) for size in args.ep.split(",") if size]
    for size in args.ep:
        if size < 2 or args.world % size or args.experts % size:
            parser.error(f"--ep {size}: needs 2 <= EP, dividing --world {args.world} and "
                         f"--experts {args.experts}")
    if args.tokens % 2 or args.steps < 1 or args.budget_steps < 0:
        parser.error("--tokens must be even, --steps >= 1, --budget-steps >= 0")
    return args


def build_layer(shape, topk, rho, ep):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_null_moe import NullExpertConfig, with_null_experts

    config = TransformerConfig(
        num_layers=1, hidden_size=shape["hidden"], num_attention_heads=4,
        num_moe_experts=shape["experts"], moe_ffn_hidden_size=shape["ffn"],
        ffn_hidden_size=4 * shape["hidden"], moe_router_topk=topk, gated_linear_unit=True,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, moe_router_dtype="fp32",
        moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss",
        expert_model_parallel_size=ep, use_cpu_initialization=True, bf16=True,
        params_dtype=torch.bfloat16)
    spec = get_gpt_layer_local_spec(num_experts=shape["experts"], moe_grouped_gemm=False)
    if rho is not None:
        spec = with_null_experts(spec, NullExpertConfig(real_fraction=rho,
                                                        budget_control_rate=1.0))
    torch.manual_seed(0)  # the same router and experts on every rank and configuration
    layer = spec.submodules.mlp(config=config)
    layer.set_layer_number(1)
    return layer.to(torch.bfloat16).train()


def step(layer, rank, index, shape):
    """One forward + backward on this rank's tokens for step ``index``: (forward wire calls,
    backward wire calls, real assignments routed)."""
    from megatron_null_moe.traffic import wire_log

    generator = torch.Generator().manual_seed(1_000 * index + rank)
    hidden = torch.randn(shape["tokens"] // 2, 2, shape["hidden"], generator=generator)
    hidden = hidden.to(torch.bfloat16).requires_grad_(True)
    with wire_log() as forward:
        output, _ = layer(hidden)
    with wire_log() as backward:
        output.float().sum().backward()
    layer.zero_grad(set_to_none=True)
    return forward, backward, int(layer.token_dispatcher.routing_map.sum())


def control_budget(layer, topk):
    """The budget controller's step with this step's counters summed over all ranks."""
    from megatron_null_moe.budget import update_null_budgets
    from megatron_null_moe.training_hooks import collect_layer_counters, statistics_from_counters

    row = collect_layer_counters([layer.router], 1, topk)[0]
    statistics = statistics_from_counters(row, layer.router.target_real_fraction)
    update_null_budgets([layer.router], {1: statistics})
    return statistics.real_fraction


def measure(layer, rank, shape, topk, rho, budget_steps, steps):
    """Per-step means of this rank's bytes (COLUMNS) and its real assignments."""
    for index in range(budget_steps if rho is not None else 1):  # warm-up
        step(layer, rank, index, shape)
        if rho is not None:
            control_budget(layer, topk)
    totals = dict.fromkeys(COLUMNS, 0)
    real, counted, global_fraction = 0, [0, 0], []
    traffic = getattr(layer.token_dispatcher, "alltoall_traffic", None)
    if traffic is not None:
        traffic.reset()
    for index in range(budget_steps, budget_steps + steps):
        forward, backward, routed = step(layer, rank, index, shape)
        totals["dispatch_sent"] += forward[0][0] + forward[1][0]  # tokens, routing weights
        totals["dispatch_received"] += forward[0][1] + forward[1][1]
        for sent, received, _kept in forward + backward:
            totals["sent"] += sent
            totals["received"] += received
        real += routed
        if traffic is not None:
            counted[0] += traffic.sent
            counted[1] += traffic.received
            traffic.reset()
        if rho is not None:
            global_fraction.append(control_budget(layer, topk))
    result = {name: value / steps for name, value in totals.items()}
    result.update(real_assignments=real / steps, tokens=shape["tokens"],
                  counters=[value / steps for value in counted] if rho is not None else None,
                  controller_real_fraction=global_fraction)
    return result


def run_rank(rank, world_size, shape, eps, budget_steps, steps):
    from megatron_null_moe.cpu import destroy_cpu_parallel_state, init_cpu_parallel_state

    results = {}
    for ep in eps:
        init_cpu_parallel_state(expert_model_parallel_size=ep)
        try:
            for name, topk, rho in CONFIGS:
                layer = build_layer(shape, topk, rho, ep)
                results[f"{name} EP{ep}"] = measure(layer, rank, shape, topk, rho,
                                                    budget_steps, steps)
        finally:
            destroy_cpu_parallel_state()
    return results


def summarise(per_rank, eps):
    """Rows of the table: mean and max over ranks of each column, the realised real
    fraction over all ranks, and the ratio of all-phase bytes to upstream K8's."""
    rows = []
    for ep in eps:
        for name, topk, rho in CONFIGS:
            ranks = [result[f"{name} EP{ep}"] for result in per_rank]
            row = {"config": name, "ep": ep}
            for column in COLUMNS:
                values = [rank[column] for rank in ranks]
                row[f"{column}_mean"] = sum(values) / len(values)
                row[f"{column}_max"] = max(values)
            real = sum(rank["real_assignments"] for rank in ranks)
            row["real_fraction"] = real / sum(rank["tokens"] * topk for rank in ranks)
            row["rank_real_fraction_min_max"] = [
                min(rank["real_assignments"] / (rank["tokens"] * topk) for rank in ranks),
                max(rank["real_assignments"] / (rank["tokens"] * topk) for rank in ranks)]
            row["counters_agree"] = all(
                rank["counters"] == [rank["sent"], rank["received"]] for rank in ranks) \
                if rho is not None else None
            # The budget controller's view, summed over all ranks, at each measured step.
            row["controller_real_fraction"] = ranks[0]["controller_real_fraction"]
            rows.append(row)
        reference = next(row for row in rows if row["ep"] == ep
                         and row["config"] == "upstream K8 rho=1")
        for row in rows:
            if row["ep"] == ep:
                row["sent_vs_upstream_K8"] = row["sent_mean"] / reference["sent_mean"]
    return rows


def table(rows, shape):
    megabytes = lambda value: f"{value / 1e6:.3g}"  # noqa: E731
    lines = [
        f"Bytes per rank, MoE layer and training step to and from other ranks, in MB "
        f"(mean / max over ranks); {shape['tokens']} tokens per rank, hidden {shape['hidden']}, "
        f"BF16 tokens, FP32 routing weights, {shape['experts']} experts.",
        "",
        "| config | EP | real fraction | dispatch sent | dispatch received | all four "
        "all-to-alls, sent (= received) | vs upstream K8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['ep']} | {row['real_fraction']:.3f} | "
            f"{megabytes(row['dispatch_sent_mean'])} / {megabytes(row['dispatch_sent_max'])} | "
            f"{megabytes(row['dispatch_received_mean'])} / "
            f"{megabytes(row['dispatch_received_max'])} | "
            f"{megabytes(row['sent_mean'])} / {megabytes(row['sent_max'])} | "
            f"{row['sent_vs_upstream_K8']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    from megatron_null_moe.cpu_ranks import run_on_ranks

    shape = dict(experts=args.experts, hidden=args.hidden, ffn=args.ffn, tokens=args.tokens)
    began = time.time()
    per_rank = run_on_ranks(run_rank, args.world, shape, args.ep, args.budget_steps,
                            args.steps, timeout_s=3600)
    rows = summarise(per_rank, args.ep)
    text = table(rows, shape)
    print(text)
    for row in rows:
        if row["counters_agree"] is False:
            print(f"ERROR: {row['config']} EP{row['ep']}: the plugin's counters disagree with "
                  "the bytes all_to_all_single moved", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(
        {"rows": rows, "shape": shape, "world": args.world, "budget_steps": args.budget_steps,
         "steps": args.steps, "seconds": time.time() - began, "table": text}, indent=1))
    return rows


if __name__ == "__main__":
    main()
