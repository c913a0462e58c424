"""Scale model: expert GEMM FLOPs, all-to-all bytes and their time per GPU and step for a
Qwen3-30B-A3B-shaped MoE at EP 8-64, upstream K8 / K4 against null experts' K8 rho = 0.5.

    python benchmarks/scale_model.py measure   # CPU (~7 min on 2 cores): routing statistics
    python benchmarks/scale_model.py model     # the tables of docs/scale_model.md

``measure`` trains the demo's small GPT (megatron_null_moe/demo: 2 MoE layers, hidden 64,
here 128 experts as Qwen3-30B-A3B has) for each configuration, K8 and K4 at rho = 1 and K8 at
rho = 0.5 with the budget controller (its null offset then set to hold rho on fresh tokens:
hold_budget), then routes fresh batches forward only as 64 expert-parallel ranks of ~4,096
tokens each would. For each layer it counts the real
assignments from every rank's tokens to every expert, and reduces them for EP 8, 16, 32 and
64 (the first EP ranks, experts split evenly in order, 8 GPUs per node) to per-rank loads:
rows each rank's experts compute, rows sent to and received from other ranks over NVLink
(same node) and InfiniBand (other nodes), mean and busiest rank, per token of a rank. Written
to --statistics (JSON, committed as docs/scale_model_measured.json).

``model`` scales those per-token loads to the model's shape and assumed hardware (flags; all
marked assumed in the output) and prints Markdown: per GPU and step (one micro-batch of
--tokens per GPU through every MoE layer, forward and backward) the expert GEMM FLOPs, the
all-to-all bytes and the time of both for the mean rank and the slowest one (each MoE layer's
all-to-all waits for the slowest rank, so the slowest one sets the step).

``model --group-topk g[,g...]`` adds a table under node-limited routing
(``--moe-router-num-groups`` = the nodes of the EP group, ``--moe-router-group-topk`` = g):
each token's real experts come from its g best groups, one group per node, so its rows leave
its node for at most g nodes (null copies belong to no group). What the model charges then:

- The statistics were measured without the limit, so they cannot say how routing changes
  under it. Assumed: the per-expert loads (so the GEMM rows and each rank's rows) stay as
  measured; only the node spread of each token's rows is capped, alike for every token (the
  busiest rank's InfiniBand rows shrink by the mean token's share).
- The limit pays with a dispatcher that sends a token's rows for one remote node as one
  InfiniBand copy and fans them out over NVLink there (the flex dispatcher's DeepEP / HybridEP
  backends): the limited table is for such a dispatcher. With the alltoall dispatcher (one
  row per assignment) the limit moves rows between nodes without cutting them (a token's own
  node is no likelier than another to be among its g groups, so (G - 1) / G of its rows still
  leave it): read the unlimited table there.
- Bound: under the limit a token reaches at most min(g, r, G) nodes (r: its real rows, G: the
  EP group's nodes), its own node among them with probability (those nodes) / G, so it sends
  at most (G - 1) / G * min(g, r, G) copies over InfiniBand; over the tokens (Jensen) at most
  (G - 1) / G * min(g, n), n = min(r_mean, G). Without the limit (G - 1) / G * r_mean of its
  rows leave its node on average, what the measured InfiniBand rows show; so the measured
  rows times share = min(g, n) / n are at least those copies. That is what is charged, with
  every charged row a whole row of bytes; g >= n (g = G always) leaves every number as
  without the limit.
- The rows folded into another row's copy, (1 - share) of the measured InfiniBand rows, are
  charged to NVLink in the destination node (added to the rank's NVLink rows); the rows a
  rank exchanges stay as measured (they change link, not number). A dispatcher that sends
  fewer copies than charged forwards more rows over NVLink (DeepEP forwards nearly every
  remote row from the rank that received it): the phase time is an upper bound wherever
  InfiniBand stays the slower link with every remote row also on NVLink. With the default
  rates that is everywhere on this project's statistics except upstream K8 at g = 1, EP 64,
  whose all-to-all could then take 3 % longer.

Legend: R ranks, N experts, E expert-parallel size, T tokens per rank, H hidden, F expert FFN,
G nodes of the EP group, g node limit (group top-k).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

EP_SIZES = (8, 16, 32, 64)
UPSTREAM_K8, UPSTREAM_K4, NULL = "upstream K8 rho=1", "upstream K4 rho=1", "null K8 rho=0.5"
CONFIGS = {  # name: (demo configuration, topk, rho)
    UPSTREAM_K8: ("K8_1.0", 8, 1.0),
    UPSTREAM_K4: ("K4_1.0", 4, 1.0),
    NULL: ("K8_0.5+budget", 8, 0.5),
}
STATISTICS = Path(__file__).parent.parent / "docs" / "scale_model_measured.json"
# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B): config.json / transformers' Qwen3MoeConfig.
QWEN3_30B_A3B = dict(hidden=2048, expert_ffn=768, layers=48, experts=128, topk=8)


# ---- measured: per-rank loads from assignment counts (pure functions) -------------------

def rank_loads(counts_RN: torch.Tensor, ep: int, gpus_per_node: int) -> dict:
    """Per-rank rows of one MoE layer under EP = ``ep`` (first ``ep`` ranks of counts_RN).

    counts_RN: int [R, N], real assignments from rank r's tokens to expert n. Experts are
    split evenly in order (rank j holds experts j*N/ep ... ), ranks fill nodes in order.
    Returns int [ep] tensors: expert_rows (rows a rank's experts compute), sent / received
    over NVLink (other ranks, same node) and over InfiniBand (other nodes), real (assignments
    of the rank's own tokens).
    """
    num_experts = counts_RN.shape[1]
    if num_experts % ep:
        raise ValueError(f"EP {ep} does not divide the {num_experts} experts")
    to_rank_EE = counts_RN[:ep].reshape(ep, ep, num_experts // ep).sum(dim=-1)  # [from, to]
    node = torch.arange(ep) // gpus_per_node
    other_node = node[:, None] != node[None, :]
    same_node_other_rank = ~other_node & ~torch.eye(ep, dtype=torch.bool)
    return {
        "expert_rows": to_rank_EE.sum(dim=0),
        "nvlink_sent": (to_rank_EE * same_node_other_rank).sum(dim=1),
        "nvlink_received": (to_rank_EE * same_node_other_rank).sum(dim=0),
        "infiniband_sent": (to_rank_EE * other_node).sum(dim=1),
        "infiniband_received": (to_rank_EE * other_node).sum(dim=0),
        "real": counts_RN[:ep].sum(dim=1),
    }


def load_statistics(loads: dict, tokens_per_rank: int, topk: int) -> dict:
    """Per token of a rank: mean and busiest rank of the computed rows, of each link's rows
    (a rank's larger direction: an all-to-all phase lasts until every rank has sent and
    received), of the rows a rank exchanges with other ranks (sent + received); and the
    spread of the ranks' real fractions."""
    per_token = {name: values.double() / tokens_per_rank for name, values in loads.items()}
    link = {name: torch.maximum(per_token[f"{name}_sent"], per_token[f"{name}_received"])
            for name in ("nvlink", "infiniband")}
    exchanged = sum(per_token[f"{link}_{direction}"] for link in ("nvlink", "infiniband")
                    for direction in ("sent", "received"))
    real_fraction = per_token["real"] / topk
    return {
        "expert_rows_mean": float(per_token["expert_rows"].mean()),
        "expert_rows_max": float(per_token["expert_rows"].max()),
        "nvlink_rows_mean": float(link["nvlink"].mean()),
        "nvlink_rows_max": float(link["nvlink"].max()),
        "infiniband_rows_mean": float(link["infiniband"].mean()),
        "infiniband_rows_max": float(link["infiniband"].max()),
        "exchanged_rows_mean": float(exchanged.mean()),
        "exchanged_rows_max": float(exchanged.max()),
        "rank_real_fraction_min": float(real_fraction.min()),
        "rank_real_fraction_max": float(real_fraction.max()),
    }


def expert_imbalance(counts_RN: torch.Tensor) -> float:
    """Busiest expert's load over the mean expert's, all ranks' tokens together."""
    load_N = counts_RN.sum(dim=0).double()
    return float(load_N.max() / load_N.mean())


def mean_of(dicts: list) -> dict:
    return {key: sum(d[key] for d in dicts) / len(dicts) for key in dicts[0]}


# ---- measure: train the demo's model, route as ranks would -----------------------------

def assignment_counts(gpt, batches) -> torch.Tensor:
    """int [layers, R, N]: real assignments from each batch (one rank's tokens) to each expert."""
    from megatron_null_moe.metrics import null_expert_routers

    routed = []
    hooks = [router.register_forward_hook(lambda _m, _i, out: routed.append(out[1]))
             for _, router in null_expert_routers(gpt)]
    counts = []
    gpt.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                routed.clear()
                gpt(*_model_inputs(batch))
                counts.append(torch.stack([m.sum(dim=0) for m in routed]))  # [layers, N]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(counts, dim=1).long()


def _model_inputs(batch):
    from megatron_null_moe.demo import data

    length = data.SEQUENCE_LENGTH
    position_ids = torch.arange(length).expand_as(batch.tokens)
    causal = torch.ones(1, 1, length, length, dtype=torch.bool).tril().logical_not()
    return batch.tokens, position_ids, causal


def hold_budget(gpt, batches, target: float, model_inputs=None) -> None:
    """Set every layer's null selection bias so that its realised real fraction on
    ``batches`` is ``target``, as the budget controller holds it on average during training
    (the last step's bias carries that step's error). Layer by layer, since a layer's
    inputs depend on the routing before it; calibrate_null_offset bisects the offset on the
    router's own selection (its score function, per-expert bias and group limit).
    model_inputs: a batch to the model's forward arguments (default: the demo's batches)."""
    from megatron_null_moe.metrics import null_expert_routers
    from megatron_null_moe.upcycle.router_init import calibrate_null_offset

    routers = sorted((router for _, router in null_expert_routers(gpt)),
                     key=lambda router: router.layer_number)
    for router in routers:
        inputs = []
        hook = router.register_forward_hook(
            lambda _m, args, _out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for batch in batches:
                gpt(*(model_inputs or _model_inputs)(batch))
        hook.remove()
        offset = calibrate_null_offset(torch.cat(inputs), router.weight, router.null_weight,
                                       router.num_null_copies, router.topk, target,
                                       **router.selection_options)
        router.null_selection_bias.fill_(offset)


def measure_config(setup_name, args) -> dict:
    """Train one configuration, route --repeats draws of --ranks ranks' tokens; statistics
    per EP size, averaged over the draws and layers."""
    from megatron_null_moe.demo import data
    from megatron_null_moe.demo.train import DemoModel, RoutingSetup, train_model
    from megatron_null_moe.metrics import set_token_types

    shape = DemoModel(num_experts=args.experts, expert_hidden_size=args.expert_hidden,
                      batch_size=args.batch_size)
    setup = RoutingSetup.parse(setup_name, shape.num_experts)
    gpt, result = train_model(setup, args.seed, args.steps, shape, torch.device("cpu"))
    set_token_types(gpt, None, num_types=1)
    gpt.eval()
    tail = result.layer_real_fraction[-max(1, args.steps // 5):]
    generator = torch.Generator().manual_seed(args.seed + 1)
    if setup.real_fraction < 1:
        hold_budget(gpt, [data.make_batch(args.samples_per_rank, generator)
                          for _ in range(args.calibration_ranks)], setup.real_fraction)
    statistics = {ep: [] for ep in args.ep}
    imbalance, real = [], []
    for _ in range(args.repeats):
        batches = [data.make_batch(args.samples_per_rank, generator) for _ in range(args.ranks)]
        counts_LRN = assignment_counts(gpt, batches)
        tokens_per_rank = args.samples_per_rank * data.SEQUENCE_LENGTH
        for counts_RN in counts_LRN:
            imbalance.append(expert_imbalance(counts_RN))
            real.append(float(counts_RN.sum()) / (args.ranks * tokens_per_rank * setup.topk))
            for ep in args.ep:
                loads = rank_loads(counts_RN, ep, args.gpus_per_node)
                statistics[ep].append(load_statistics(loads, tokens_per_rank, setup.topk))
    return {
        "demo_config": setup_name, "topk": setup.topk,
        "training_real_fraction_last_fifth": [sum(layer) / len(tail) for layer in zip(*tail)],
        "real_fraction": sum(real) / len(real),
        "expert_imbalance": sum(imbalance) / len(imbalance),
        "by_ep": {str(ep): mean_of(values) for ep, values in statistics.items()},
    }


def measure(args) -> dict:
    from megatron_null_moe.process_groups import single_process_parallel_state

    torch.set_num_threads(1)
    began = time.time()
    from megatron_null_moe.demo import data

    with single_process_parallel_state("cpu"):
        configs = {name: measure_config(demo_name, args)
                   for name, (demo_name, _, _) in CONFIGS.items()}
    return {
        "how": {"steps": args.steps, "batch_size": args.batch_size, "experts": args.experts,
                "expert_hidden": args.expert_hidden, "ranks": args.ranks,
                "samples_per_rank": args.samples_per_rank,
                "tokens_per_rank": args.samples_per_rank * data.SEQUENCE_LENGTH,
                "repeats": args.repeats, "calibration_ranks": args.calibration_ranks,
                "gpus_per_node": args.gpus_per_node, "seed": args.seed,
                "seconds": round(time.time() - began), "date": time.strftime("%Y-%m-%d"),
                "machine": "this project's CPU machine (2 cores, no GPU)"},
        "configs": configs,
    }


# ---- model: scale to the shape and the assumed hardware ---------------------------------

def nodes_of(ep: int, gpus_per_node: int) -> int:
    """Nodes of an EP group on consecutive ranks (one, if it fits in part of a node)."""
    return max(1, ep // gpus_per_node)


def remote_node_share(real_rows: float, group_topk: int, nodes: int) -> float:
    """The share of the measured InfiniBand rows charged under node-limited routing to
    group_topk of ``nodes`` nodes: min(g, n) / n, n = min(real_rows, nodes) the most nodes the
    mean token's real rows reach without the limit (module docstring: times the measured
    rows, it bounds the copies of a dispatcher that sends a token once to each remote node)."""
    reached = min(real_rows, nodes)
    return 1.0 if reached <= group_topk else group_topk / reached


def node_limited(statistics: dict, group_topk: int, nodes: int) -> dict:
    """One EP size's statistics (load_statistics) as the model charges them under
    node-limited routing (module docstring): InfiniBand rows times remote_node_share, the rows
    folded into other rows' copies added to the NVLink rows; everything else as measured."""
    share = remote_node_share(statistics["expert_rows_mean"], group_topk, nodes)
    limited = dict(statistics)
    for which in ("mean", "max"):
        remote = statistics[f"infiniband_rows_{which}"]
        limited[f"infiniband_rows_{which}"] = remote * share
        limited[f"nvlink_rows_{which}"] = statistics[f"nvlink_rows_{which}"] \
            + remote * (1 - share)
    return limited


def step_costs(statistics: dict, shape: dict, hardware: dict) -> dict:
    """Per GPU and step (tokens per GPU through every MoE layer, forward + backward), for the
    mean rank and the slowest: expert GEMM FLOPs and seconds, all-to-all bytes sent (over a
    step a rank sends what it receives: combine and backward mirror the dispatch) and seconds,
    and the InfiniBand bytes of the rank's larger direction.

    Expert GEMMs per row: forward 2*H*2F (gate and up) + 2*F*H (down), backward twice that:
    18*H*F. All-to-alls per layer: dispatch (a row of H in activation bytes + its routing
    weight) and combine (a row of H), forward and backward; each phase lasts as long as the
    busiest rank's larger direction on its slower link.
    """
    tokens, layers = shape["tokens"], shape["layers"]
    flops_per_row = 18 * shape["hidden"] * shape["expert_ffn"]
    row_bytes = {"dispatch": shape["hidden"] * hardware["activation_bytes"]
                 + hardware["routing_weight_bytes"],
                 "combine": shape["hidden"] * hardware["activation_bytes"]}
    costs = {}
    for which in ("mean", "max"):
        rows = statistics[f"expert_rows_{which}"] * tokens
        flops = rows * flops_per_row * layers
        phase_seconds = sum(
            2 * max(statistics[f"nvlink_rows_{which}"] * tokens * size / hardware["nvlink_bps"],
                    statistics[f"infiniband_rows_{which}"] * tokens * size
                    / hardware["infiniband_bps"])
            for size in row_bytes.values())
        costs[which] = {
            "expert_flops": flops,
            "gemm_seconds": flops / hardware["gemm_flops"],
            "alltoall_bytes": statistics[f"exchanged_rows_{which}"] * tokens * layers
            * sum(row_bytes.values()),
            "alltoall_seconds": phase_seconds * layers,
            "infiniband_bytes": 2 * statistics[f"infiniband_rows_{which}"] * tokens * layers
            * sum(row_bytes.values()),
        }
        costs[which]["seconds"] = costs[which]["gemm_seconds"] + costs[which]["alltoall_seconds"]
    return costs


def model_rows(configs: dict, shape: dict, hardware: dict, group_topk: int = None,
               gpus_per_node: int = 8) -> list:
    """Table rows: step_costs per EP size and configuration; with group_topk, under
    node-limited routing to that many nodes (node_limited; it binds nothing at EP sizes of at
    most group_topk nodes)."""
    rows = []
    sizes = sorted({int(ep) for config in configs.values() for ep in config["by_ep"]})
    for ep in sizes:
        by_config = {}
        for name, config in configs.items():
            if str(ep) not in config["by_ep"]:
                continue
            statistics = config["by_ep"][str(ep)]
            if group_topk is not None:
                statistics = node_limited(statistics, group_topk, nodes_of(ep, gpus_per_node))
            by_config[name] = {"config": name, "ep": ep, "real_fraction": config["real_fraction"],
                               **step_costs(statistics, shape, hardware)}
        for row in by_config.values():
            for reference in (UPSTREAM_K8, UPSTREAM_K4):
                if reference in by_config:
                    row[f"vs {reference}"] = row["max"]["seconds"] / \
                        by_config[reference]["max"]["seconds"]
            rows.append(row)
    return rows


def markdown(rows: list, gpus_per_node: int) -> str:
    """The model's table; "balanced": the mean rank's load on every rank."""
    lines = [
        "| EP (nodes) | config | real fraction (M) | expert GEMM TFLOP: mean / slowest rank (M) "
        "| all-to-all GB sent: mean / busiest rank (M) | GEMM ms: balanced / slowest (A) "
        "| all-to-all ms: balanced / slowest (A) | step ms: balanced / slowest (A) "
        "| slowest step vs upstream K8 | vs upstream K4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mean, most = row["mean"], row["max"]
        nodes = max(1, row["ep"] // gpus_per_node)
        milliseconds = {key: f"{mean[key] * 1e3:.0f} / {most[key] * 1e3:.0f}"
                        for key in ("gemm_seconds", "alltoall_seconds", "seconds")}
        lines.append(
            f"| {row['ep']} ({nodes}) | {row['config']} | {row['real_fraction']:.3f} | "
            f"{mean['expert_flops'] / 1e12:.1f} / {most['expert_flops'] / 1e12:.1f} | "
            f"{mean['alltoall_bytes'] / 1e9:.1f} / {most['alltoall_bytes'] / 1e9:.1f} | "
            f"{milliseconds['gemm_seconds']} | {milliseconds['alltoall_seconds']} | "
            f"{milliseconds['seconds']} | {row.get('vs upstream K8 rho=1', float('nan')):.2f} | "
            f"{row.get('vs upstream K4 rho=1', float('nan')):.2f} |")
    return "\n".join(lines)


def node_limited_markdown(rows_by_limit: dict, gpus_per_node: int) -> str:
    """Null experts' K8 rho = 0.5 against upstream K8 (and K4) per EP size, without the node
    limit (key None of rows_by_limit: model_rows' rows per limit) and under each limit g."""
    lines = [
        "| EP (nodes) | node limit g | InfiniBand GB, busiest rank: upstream K8 / null K8 "
        "rho=0.5 | all-to-all ms, slowest: upstream K8 / null | step ms, slowest: upstream K8 "
        "/ null | null vs upstream K8, same limit | vs upstream K8 without limit "
        "| vs upstream K4, same limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(limit, row["ep"], row["config"]): row
              for limit, rows in rows_by_limit.items() for row in rows}
    nan = {"max": {"infiniband_bytes": float("nan"), "alltoall_seconds": float("nan"),
                   "seconds": float("nan")}}
    for ep in sorted({ep for _, ep, _ in by_key}):
        nodes = nodes_of(ep, gpus_per_node)
        unlimited = by_key.get((None, ep, UPSTREAM_K8), nan)["max"]["seconds"]
        for limit in rows_by_limit:
            k8, k4, null = (by_key.get((limit, ep, name), nan)["max"]
                            for name in (UPSTREAM_K8, UPSTREAM_K4, NULL))
            label = "off" if limit is None else str(limit) if limit < nodes else \
                f"{limit} (binds nothing: {nodes} node{'s' * (nodes > 1)})"
            lines.append(
                f"| {ep} ({nodes}) | {label} | {k8['infiniband_bytes'] / 1e9:.1f} / "
                f"{null['infiniband_bytes'] / 1e9:.1f} | {k8['alltoall_seconds'] * 1e3:.0f} / "
                f"{null['alltoall_seconds'] * 1e3:.0f} | {k8['seconds'] * 1e3:.0f} / "
                f"{null['seconds'] * 1e3:.0f} | {null['seconds'] / k8['seconds']:.2f} | "
                f"{null['seconds'] / unlimited:.2f} | {null['seconds'] / k4['seconds']:.2f} |")
    return "\n".join(lines)


def measured_summary(measured: dict) -> str:
    lines = ["| config | real fraction (training, last fifth, per layer) | real fraction "
             "(routing the ranks' tokens) | busiest expert / mean | ranks' real fraction, "
             "min-max at the largest EP |", "|---|---|---|---|---|"]
    for name, config in measured["configs"].items():
        lines.append(f"| {name} | " + _summary_cells(config))
    return "\n".join(lines)


def _summary_cells(config: dict) -> str:
    spread = config["by_ep"][max(config["by_ep"], key=int)]
    training = ", ".join(f"{value:.3f}" for value in config["training_real_fraction_last_fifth"])
    return (f"{training} | {config['real_fraction']:.3f} | "
            f"{config['expert_imbalance']:.2f} | {spread['rank_real_fraction_min']:.3f}"
            f"-{spread['rank_real_fraction_max']:.3f} |")


# ---- command line ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Scale model: expert GEMM FLOPs, all-to-all bytes and their time per GPU "
                    "and step for a Qwen3-30B-A3B-shaped MoE at EP 8-64, upstream K8 / K4 "
                    "against null experts' K8 rho = 0.5. 'measure' takes the routing "
                    "statistics on the CPU; 'model' prints the tables from them.")
    commands = parser.add_subparsers(dest="command", required=True)
    measuring = commands.add_parser(
        "measure", help="Measure the routing statistics on the CPU (about 7 minutes on 2 cores).",
        description="Train the demo's small GPT with 128 experts for each configuration, then "
                    "route fresh batches as 64 expert-parallel ranks would and write each "
                    "rank's loads to --statistics.")
    measuring.add_argument("--steps", type=int, default=300,
                           help="Training steps per configuration (default: 300).")
    measuring.add_argument("--batch-size", type=int, default=32,
                           help="Training batch size in samples (default: 32).")
    measuring.add_argument("--experts", type=int, default=QWEN3_30B_A3B["experts"],
                           help="Experts per MoE layer (default: 128, as Qwen3-30B-A3B has).")
    measuring.add_argument("--expert-hidden", type=int, default=32,
                           help="Expert FFN hidden size of the small GPT (default: 32).")
    measuring.add_argument("--ranks", type=int, default=max(EP_SIZES),
                           help="Expert-parallel ranks whose tokens are routed (default: 64).")
    measuring.add_argument("--samples-per-rank", type=int, default=85,
                           help="Samples of 48 tokens per rank (default: 85, 4,080 tokens).")
    measuring.add_argument("--repeats", type=int, default=4,
                           help="Rounds of fresh batches, one per rank each, routed (default: 4).")
    measuring.add_argument("--calibration-ranks", type=int, default=16,
                           help="Ranks' worth of fresh tokens the null offset is set on "
                                "(default: 16).")
    measuring.add_argument("--ep", default=",".join(map(str, EP_SIZES)),
                           help="Expert-parallel sizes, comma-separated; each must divide "
                                "--experts and be at most --ranks (default: 8,16,32,64).")
    measuring.add_argument("--gpus-per-node", type=int, default=8,
                           help="GPUs per node, which splits NVLink from InfiniBand traffic "
                                "(default: 8).")
    measuring.add_argument("--seed", type=int, default=0, help="Random seed (default: 0).")
    measuring.add_argument("--statistics", type=Path, default=STATISTICS,
                           help="The JSON file written (default: "
                                "docs/scale_model_measured.json).")
    modelling = commands.add_parser(
        "model", help="Print the tables from measured statistics.",
        description="Scale the measured per-token loads to Qwen3-30B-A3B's shape and the "
                    "assumed hardware rates, and print the tables as Markdown.")
    modelling.add_argument("--statistics", type=Path, default=STATISTICS,
                           help="The JSON file of 'measure' (default: "
                                "docs/scale_model_measured.json).")
    modelling.add_argument("--tokens", type=int, default=4096,
                           help="Tokens per GPU and micro-batch (default: 4096, sequence 4096 "
                                "and micro-batch 1).")
    modelling.add_argument("--gemm-tflops", type=float, default=400.0,
                           help="Achieved BF16 grouped-GEMM TFLOP/s per GPU (assumed; default: "
                                "400).")
    modelling.add_argument("--nvlink-gbps", type=float, default=350.0,
                           help="Achieved all-to-all GB/s per GPU and direction within a node "
                                "(assumed; default: 350, NVLink 4 peak 450).")
    modelling.add_argument("--infiniband-gbps", type=float, default=40.0,
                           help="Achieved GB/s per GPU and direction between nodes (assumed; "
                                "default: 40, one InfiniBand NDR 400 Gb/s NIC per GPU, peak 50).")
    modelling.add_argument("--group-topk", default=None, metavar="G[,G...]",
                           help="Also print a table under node-limited routing, one expert group "
                                "per node, each token's real experts on at most G nodes "
                                "(--moe-router-num-groups = nodes, --moe-router-group-topk = G; "
                                "comma-separated for several G; each from 1 to the nodes of the "
                                "largest EP group; binds nothing at EP sizes of at most G nodes). "
                                "Default: off, no limit.")
    return parser


def parse_arguments(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "measure":
        args.ep = [int(size) for size in args.ep.split(",") if size]
        for ep in args.ep:
            if ep > args.ranks or args.experts % ep:
                parser.error(f"--ep {ep}: needs EP <= --ranks {args.ranks} and dividing "
                             f"--experts {args.experts}")
    return args


def group_topk_values(text: str, ep_sizes, gpus_per_node: int) -> list:
    """--group-topk's values, each from 1 to the nodes of the largest EP group; SystemExit
    with a one-line message otherwise."""
    most = max(nodes_of(ep, gpus_per_node) for ep in ep_sizes)
    values = [value.strip() for value in text.split(",")]
    if not all(value.isascii() and value.isdigit() and 1 <= int(value) <= most
               for value in values):
        raise SystemExit(f"error: --group-topk {text}: each value must be a whole number from 1 "
                         f"to {most} (the nodes of EP {max(ep_sizes)} at {gpus_per_node} GPUs "
                         "per node)")
    return list(dict.fromkeys(int(value) for value in values))


def hardware_of(args) -> dict:
    return {"gemm_flops": args.gemm_tflops * 1e12, "nvlink_bps": args.nvlink_gbps * 1e9,
            "infiniband_bps": args.infiniband_gbps * 1e9, "activation_bytes": 2,
            "routing_weight_bytes": 4}


def main(argv=None):
    args = parse_arguments(argv)
    if args.command == "measure":
        measured = measure(args)
        args.statistics.parent.mkdir(parents=True, exist_ok=True)
        args.statistics.write_text(json.dumps(measured, indent=1) + "\n")
        print(measured_summary(measured))
        return measured
    measured = json.loads(args.statistics.read_text())
    shape = dict(QWEN3_30B_A3B, tokens=args.tokens)
    if measured["how"]["experts"] != shape["experts"]:
        print(f"note: statistics measured with {measured['how']['experts']} experts, the model "
              f"has {shape['experts']}", file=sys.stderr)
    gpus_per_node = measured["how"]["gpus_per_node"]
    limits = None
    if args.group_topk is not None:
        limits = group_topk_values(args.group_topk, [int(ep) for config in
                                   measured["configs"].values() for ep in config["by_ep"]],
                                   gpus_per_node)
    rows = model_rows(measured["configs"], shape, hardware_of(args))
    print(measured_summary(measured))
    print()
    print(markdown(rows, gpus_per_node))
    if limits is None:
        return rows
    rows_by_limit = {None: rows}
    for limit in limits:
        rows_by_limit[limit] = model_rows(measured["configs"], shape, hardware_of(args), limit,
                                          gpus_per_node)
    print()
    print(node_limited_markdown(rows_by_limit, gpus_per_node))
    return rows_by_limit


if __name__ == "__main__":
    main()
