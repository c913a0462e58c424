"""The demo's report: PNG plots, a Markdown page and a JSON summary, from measured runs.

Verdicts are computed from the numbers with fixed rules stated in the page; nothing here
looks at which configuration is "supposed" to win.
"""

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List

from megatron_null_moe.demo import data
from megatron_null_moe.demo.train import RoutingSetup, RunResult


def _smooth(values: List[float], window: int) -> List[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def _interpolate(xs: List[float], ys: List[float], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if x >= xs[-1] else ys[0]


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def _verdict(differences: List[float], better: str, worse: str) -> str:
    """'better' when every seed favours the contender, 'worse' when every seed favours the
    baseline, otherwise no clear difference (the spread over seeds decides, not the mean)."""
    if all(d > 0 for d in differences):
        return better
    if all(d < 0 for d in differences):
        return worse
    return "no clear difference (seeds disagree)"


def matched_pairs(setups: List[RoutingSetup]):
    """(baseline, contender) pairs: rho = 1 against each rho < 1 configuration with the same
    expected real experts rho*K, and each configuration without the budget controller
    against the same one with it."""
    for contender in setups:
        if contender.real_fraction < 1:
            for baseline in setups:
                if baseline.real_fraction == 1 and math.isclose(
                        baseline.expected_real_experts, contender.expected_real_experts):
                    yield baseline, contender
    for contender in setups:
        for baseline in setups:
            if contender.budget_control and not baseline.budget_control and (
                    baseline.topk, baseline.real_fraction) == (contender.topk,
                                                               contender.real_fraction):
                yield baseline, contender


def compare_at_matched_flops(baseline: List[RunResult], contender: List[RunResult],
                             window: int, better: str, worse: str) -> Dict:
    """Per seed: smoothed train loss at the largest measured expert-FLOPs budget both runs
    reached; positive difference = the contender has the lower loss."""
    differences, budgets = [], []
    for base, cont in zip(sorted(baseline, key=lambda r: r.seed),
                          sorted(contender, key=lambda r: r.seed)):
        budget = min(base.expert_flops[-1], cont.expert_flops[-1])
        base_loss = _interpolate(base.expert_flops, _smooth(base.train_loss, window), budget)
        cont_loss = _interpolate(cont.expert_flops, _smooth(cont.train_loss, window), budget)
        differences.append(base_loss - cont_loss)
        budgets.append(budget)
    eval_differences = [b.eval_loss - c.eval_loss for b, c in
                        zip(sorted(baseline, key=lambda r: r.seed),
                            sorted(contender, key=lambda r: r.seed))]
    return {
        "train_loss_difference_at_matched_flops": _mean_std(differences),
        "matched_expert_flops": budgets,
        "eval_loss_difference_after_equal_steps": _mean_std(eval_differences),
        "verdict": _verdict(differences, better, worse),
    }


def _pair_verdicts(baseline: RoutingSetup, contender: RoutingSetup):
    if baseline.real_fraction == 1:
        return ("rho < 1 reached a lower training loss at matched measured FLOPs",
                "rho = 1 reached a lower training loss at matched measured FLOPs")
    return ("the budget controller's run reached a lower training loss at matched measured "
            "FLOPs", "the run without the controller reached a lower training loss at matched "
            "measured FLOPs")


def budget_warmup(steps: int) -> int:
    """Steps left out of the budget measurement: the first sixth (50 of 300)."""
    return max(1, steps // 6)


def budget_of_run(run: RunResult, target: float) -> Dict:
    """Realised real fraction per layer after the warm-up, and measured / expected expert
    FLOPs over the whole run and after the warm-up."""
    warmup = budget_warmup(len(run.steps))
    late = run.layer_real_fraction[warmup:]
    layers = [statistics.fmean(step[layer] for step in late) for layer in range(len(late[0]))]
    flops_after = run.expert_flops[-1] - run.expert_flops[warmup - 1]
    expected_after = run.expected_expert_flops[-1] - run.expected_expert_flops[warmup - 1]
    return {"layer_real_fraction": layers,
            "worst_layer_error": max(abs(value - target) for value in layers),
            "flops_ratio": run.expert_flops[-1] / run.expected_expert_flops[-1],
            "flops_ratio_after_warmup": flops_after / expected_after}


BUDGET_TOLERANCE = 0.01


def budget_comparison(runs: List[RunResult], setup: RoutingSetup) -> Dict:
    per_seed = {run.seed: budget_of_run(run, setup.real_fraction) for run in runs}
    worst = max(seed["worst_layer_error"] for seed in per_seed.values())
    held = worst <= BUDGET_TOLERANCE
    return {"per_seed": per_seed, "worst_layer_error": worst,
            "warmup_steps": budget_warmup(len(runs[0].steps)),
            "verdict": (f"every layer's real fraction within {BUDGET_TOLERANCE} of rho = "
                        f"{setup.real_fraction} after the warm-up, in every seed" if held else
                        f"the real fraction strays from rho = {setup.real_fraction} (worst layer "
                        f"{worst:.3f} off after the warm-up)")}


def late_real_fraction(run: RunResult, type_index: int) -> float:
    """Real fraction of one token type over the last 20% of steps, averaged over layers."""
    start = int(len(run.real_fraction) * 0.8)
    values = [layer[type_index] for step in run.real_fraction[start:] for layer in step
              if not math.isnan(layer[type_index])]
    return statistics.fmean(values) if values else float("nan")


def modality_comparison(runs: List[RunResult]) -> Dict:
    image = [late_real_fraction(r, data.IMAGE_TYPE) for r in runs]
    text = [late_real_fraction(r, data.TEXT_TYPE) for r in runs]
    return {"image_real_fraction": _mean_std(image), "text_real_fraction": _mean_std(text),
            "verdict": _verdict([t - i for i, t in zip(image, text)],
                                "image tokens received less compute than text tokens",
                                "image tokens received more compute than text tokens")}


def summarise(results: Dict[str, List[RunResult]], setups: List[RoutingSetup], meta: Dict,
              window: int) -> Dict:
    summary = {"meta": meta, "configs": {}, "matched_flops": [], "modality": {}, "budget": {}}
    for setup in setups:
        runs = results[setup.name]
        summary["configs"][setup.name] = {
            "topk": setup.topk, "real_fraction_target": setup.real_fraction,
            "expected_real_experts": setup.expected_real_experts,
            "final_train_loss": _mean_std([statistics.fmean(r.train_loss[-window:])
                                           for r in runs]),
            "eval_loss": _mean_std([r.eval_loss for r in runs]),
            "measured_expert_flops": _mean_std([r.expert_flops[-1] for r in runs]),
            "expected_expert_flops": _mean_std([r.expected_expert_flops[-1] for r in runs]),
            "flops_ratio": _mean_std([r.expert_flops[-1] / r.expected_expert_flops[-1]
                                      for r in runs]),
            "seeds": [r.seed for r in runs],
        }
        if setup.real_fraction < 1:
            summary["modality"][setup.name] = modality_comparison(runs)
            summary["budget"][setup.name] = budget_comparison(runs, setup)
    for baseline, contender in matched_pairs(setups):
        comparison = compare_at_matched_flops(results[baseline.name], results[contender.name],
                                              window, *_pair_verdicts(baseline, contender))
        kind = ("same expected expert FLOPs" if baseline.real_fraction == 1 else
                "same configuration, without and with the budget controller")
        summary["matched_flops"].append(
            {"baseline": baseline.name, "contender": contender.name, "kind": kind, **comparison})
    return summary


def write_report(output: Path, results: Dict[str, List[RunResult]], setups: List[RoutingSetup],
                 meta: Dict, window: int) -> Dict:
    output.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, setups, meta, window)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "runs.json").write_text(json.dumps(
        {name: [run.__dict__ for run in runs] for name, runs in results.items()}))
    plots = _plot(output, results, setups, window)
    (output / "report.md").write_text(_markdown(summary, plots))
    return summary


def _plot(output: Path, results, setups, window) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for setup in setups:
        runs = results[setup.name]
        for index, run in enumerate(runs):
            axes.plot(run.expert_flops, _smooth(run.train_loss, window), alpha=0.85,
                      color=f"C{setups.index(setup)}", linestyle="-" if
                      setup.real_fraction < 1 else "--", label=setup.name if index == 0 else None)
    axes.set_xlabel("cumulative expert FLOPs (measured real experts)")
    axes.set_ylabel(f"training loss on text tokens (moving average, {window} steps)")
    axes.set_yscale("log")
    axes.legend(title="one line per seed")
    axes.set_title("Loss against expert compute")
    files.append(_save(figure, output / "loss_vs_expert_flops.png", plt))

    nulls = [s for s in setups if s.real_fraction < 1]
    if nulls:
        num_layers = len(results[nulls[0].name][0].layer_real_fraction[0])
        figure, axes = plt.subplots(1, num_layers, squeeze=False, figsize=(5 * num_layers, 3.5),
                                    sharey=True)
        for layer in range(num_layers):
            ax = axes[0][layer]
            for setup in nulls:
                runs = results[setup.name]
                series = [statistics.fmean(run.layer_real_fraction[step][layer] for run in runs)
                          for step in range(len(runs[0].steps))]
                ax.plot(runs[0].steps, _smooth(series, window), label=setup.name,
                        color=f"C{setups.index(setup)}",
                        linestyle="-" if setup.budget_control else "--")
            for target in sorted({s.real_fraction for s in nulls}):
                ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"layer {layer + 1}: realised real fraction (mean of seeds)")
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("real fraction of slots")
        axes[0][0].legend()
        files.append(_save(figure, output / "real_fraction_budget.png", plt))

        num_layers = len(results[nulls[0].name][0].real_fraction[0])
        figure, axes = plt.subplots(len(nulls), num_layers, squeeze=False,
                                    figsize=(4 * num_layers, 3 * len(nulls)), sharey=True)
        for row, setup in enumerate(nulls):
            runs = results[setup.name]
            for layer in range(num_layers):
                ax = axes[row][layer]
                for type_index, name in ((data.IMAGE_TYPE, "image"), (data.TEXT_TYPE, "text")):
                    series = [statistics.fmean(run.real_fraction[step][layer][type_index]
                                               for run in runs)
                              for step in range(len(runs[0].real_fraction))]
                    ax.plot(runs[0].steps, _smooth(series, window), label=f"{name} tokens")
                ax.axhline(setup.real_fraction, color="grey", linestyle=":", label="target rho")
                ax.set_title(f"{setup.name}, layer {layer + 1}")
                ax.set_xlabel("step")
                ax.set_ylim(0, 1)
            axes[row][0].set_ylabel("real fraction of slots")
        axes[0][0].legend()
        files.append(_save(figure, output / "compute_intensity_by_modality.png", plt))

        figure, axes = plt.subplots(1, len(nulls), squeeze=False, figsize=(5 * len(nulls), 3.5))
        for column, setup in enumerate(nulls):
            ax = axes[0][column]
            for offset, name in ((-0.2, "image"), (0.2, "text")):
                counts = [0] * (setup.topk + 1)
                for run in results[setup.name]:
                    for layer in run.eval_real_experts_histogram[name]:
                        counts = [a + b for a, b in zip(counts, layer)]
                total = max(sum(counts), 1)
                ax.bar([r + offset for r in range(setup.topk + 1)], [c / total for c in counts],
                       width=0.4, label=f"{name} tokens")
            ax.set_xlabel("real experts per token (all layers, held-out samples)")
            ax.set_ylabel("fraction of tokens")
            ax.set_title(setup.name)
            ax.legend()
        files.append(_save(figure, output / "real_experts_per_token.png", plt))

        run = results[nulls[0].name][0]
        figure, axes = plt.subplots(1, 2, figsize=(7, 3.5))
        axes[0].imshow(run.example_image, cmap="gray_r")
        axes[0].set_title(f"input: '{run.example_caption}'")
        side = data.IMAGE_SIZE // data.PATCH
        grid = [run.example_patch_compute[r * side:(r + 1) * side] for r in range(side)]
        shown = axes[1].imshow(grid, cmap="viridis", vmin=0, vmax=nulls[0].topk)
        axes[1].set_title(f"real experts per patch\n({nulls[0].name}, mean over layers)")
        figure.colorbar(shown, ax=axes[1])
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        files.append(_save(figure, output / "patch_compute.png", plt))
    return files


def _save(figure, path: Path, plt) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def _format(stats: Dict[str, float], scale: float = 1.0) -> str:
    return f"{stats['mean'] * scale:.4g} ± {stats['std'] * scale:.2g}"


def _markdown(summary: Dict, plots: List[str]) -> str:
    meta = summary["meta"]
    lines = [
        "# Null experts on a mixed image-text task",
        "",
        f"{meta['seeds']} seeds, {meta['steps']} steps each, device {meta['device']} "
        f"({meta['workers']} worker processes), wall time {meta['wall_seconds']:.0f} s. Model: "
        f"Megatron-Core GPTModel, {meta['model']['num_layers']} MoE layers, "
        f"{meta['model']['num_experts']} experts, balance loss {meta['model']['balance_coeff']} "
        "over the N+M pool (global batch), z-loss 1e-3; `+budget`: the budget controller "
        "holds rho. Task: 16 image-patch tokens of a digit, then its caption (digit, parity, "
        "place, and a catalogue code to memorise); loss on the caption only. Values are mean ± "
        "standard deviation over seeds.",
        "",
        "## Verdicts",
        "",
    ]
    for pair in summary["matched_flops"]:
        diff = pair["train_loss_difference_at_matched_flops"]
        lines.append(f"- **{pair['contender']} vs {pair['baseline']}** ({pair['kind']}): "
                     f"{pair['verdict']}. Baseline minus contender training loss at matched "
                     f"measured FLOPs: {_format(diff)} (per seed "
                     f"{', '.join(f'{d:+.4f}' for d in diff['per_seed'])}); held-out loss "
                     f"difference after equal steps "
                     f"{_format(pair['eval_loss_difference_after_equal_steps'])}.")
    for name, budget in summary["budget"].items():
        lines.append(f"- **{name}** budget: {budget['verdict']} (warm-up: the first "
                     f"{budget['warmup_steps']} steps).")
    for name, modality in summary["modality"].items():
        lines.append(f"- **{name}**: {modality['verdict']}: real fraction of slots in the last "
                     f"20% of steps, image {_format(modality['image_real_fraction'])}, text "
                     f"{_format(modality['text_real_fraction'])}.")
    lines += ["", "Rules: a configuration 'beats' another only if it does so for every seed; "
              "otherwise the report says there is no clear difference. The budget holds when "
              f"every layer's mean real fraction after the warm-up is within {BUDGET_TOLERANCE} "
              "of rho in every seed.", "",
              "## Configurations", "",
              "| config | expected real experts | realised real fraction after warm-up (mean "
              "of layers) | worst layer off rho | measured / expected expert FLOPs | final "
              "train loss | held-out loss |", "|---|---|---|---|---|---|---|"]
    for name, config in summary["configs"].items():
        budget = summary["budget"].get(name)
        ratio = config["measured_expert_flops"]["mean"] / config["expected_expert_flops"]["mean"]
        realised = worst = "–"
        if budget:
            layer_means = [statistics.fmean(seed["layer_real_fraction"])
                           for seed in budget["per_seed"].values()]
            realised = _format(_mean_std(layer_means))
            worst = f"{budget['worst_layer_error']:.4f}"
        lines.append(f"| {name} | {config['expected_real_experts']:g} | {realised} | {worst} | "
                     f"{ratio:.3f} | {_format(config['final_train_loss'])} | "
                     f"{_format(config['eval_loss'])} |")
    lines += ["", "Per seed:", "",
              "| config | seed | real fraction per layer after warm-up | measured / expected "
              "FLOPs (whole run, after warm-up) | final train loss | held-out loss |",
              "|---|---|---|---|---|---|"]
    for name, config in summary["configs"].items():
        budget = summary["budget"].get(name)
        for index, seed in enumerate(config["seeds"]):
            layers, ratios = "–", f"{config['flops_ratio']['per_seed'][index]:.3f}"
            if budget:
                per_seed = budget["per_seed"][seed]
                layers = ", ".join(f"{v:.4f}" for v in per_seed["layer_real_fraction"])
                ratios = (f"{per_seed['flops_ratio']:.3f}, "
                          f"{per_seed['flops_ratio_after_warmup']:.3f}")
            lines.append(f"| {name} | {seed} | {layers} | {ratios} | "
                         f"{config['final_train_loss']['per_seed'][index]:.4f} | "
                         f"{config['eval_loss']['per_seed'][index]:.4f} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{plot}]({plot})" for plot in plots]
    lines += ["", "Data: `summary.json` (this page's numbers), `runs.json` (every step), "
              "`tensorboard/`."]
    return "\n".join(lines) + "\n"
