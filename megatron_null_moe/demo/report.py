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
    """(baseline rho=1, contender rho<1) pairs with the same expected real experts rho*K."""
    for contender in setups:
        if contender.real_fraction < 1:
            for baseline in setups:
                if baseline.real_fraction == 1 and math.isclose(
                        baseline.expected_real_experts, contender.expected_real_experts):
                    yield baseline, contender


def compare_at_matched_flops(baseline: List[RunResult], contender: List[RunResult],
                             window: int) -> Dict:
    """Per seed: smoothed train loss at the largest measured expert-FLOPs budget both runs
    reached; positive difference = the rho < 1 run has the lower loss."""
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
        "verdict": _verdict(differences, "rho < 1 reached a lower training loss at matched FLOPs",
                            "rho = 1 reached a lower training loss at matched FLOPs"),
    }


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
    summary = {"meta": meta, "configs": {}, "matched_flops": [], "modality": {}}
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
            "late_real_fraction": _mean_std([statistics.fmean(
                late_real_fraction(r, t) for t in (data.IMAGE_TYPE, data.TEXT_TYPE))
                for r in runs]),
        }
        if setup.real_fraction < 1:
            summary["modality"][setup.name] = modality_comparison(runs)
    for baseline, contender in matched_pairs(setups):
        comparison = compare_at_matched_flops(results[baseline.name], results[contender.name],
                                              window)
        summary["matched_flops"].append(
            {"baseline": baseline.name, "contender": contender.name, **comparison})
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
        f"{meta['seeds']} seeds, {meta['steps']} steps each, device {meta['device']}, "
        f"wall time {meta['wall_seconds']:.0f} s. Model: Megatron-Core GPTModel, "
        f"{meta['model']['num_layers']} MoE layers, {meta['model']['num_experts']} experts, "
        f"balance loss {meta['model']['balance_coeff']} over the N+M pool (global batch), "
        "z-loss 1e-3. Task: 16 image-patch tokens of a digit, then its caption; loss on the "
        "caption only. Values are mean ± standard deviation over seeds.",
        "",
        "## Verdicts",
        "",
    ]
    for pair in summary["matched_flops"]:
        diff = pair["train_loss_difference_at_matched_flops"]
        lines.append(f"- **{pair['contender']} vs {pair['baseline']}** (same expected expert "
                     f"FLOPs): {pair['verdict']}. Baseline minus contender training loss at "
                     f"matched measured FLOPs: {_format(diff)} (per seed "
                     f"{', '.join(f'{d:+.4f}' for d in diff['per_seed'])}); held-out loss "
                     f"difference after equal steps {_format(pair['eval_loss_difference_after_equal_steps'])}.")
    for name, modality in summary["modality"].items():
        lines.append(f"- **{name}**: {modality['verdict']}: real fraction of slots in the last "
                     f"20% of steps, image {_format(modality['image_real_fraction'])}, text "
                     f"{_format(modality['text_real_fraction'])}.")
    lines += ["", "Rules: a configuration 'beats' another only if it does so for every seed; "
              "otherwise the report says there is no clear difference.", "",
              "## Configurations", "",
              "| config | expected real experts | late real fraction (image and text, mean) | "
              "final train loss | "
              "held-out loss | measured / expected expert FLOPs |", "|---|---|---|---|---|---|"]
    for name, config in summary["configs"].items():
        ratio = config["measured_expert_flops"]["mean"] / config["expected_expert_flops"]["mean"]
        lines.append(f"| {name} | {config['expected_real_experts']:g} | "
                     f"{_format(config['late_real_fraction'])} | "
                     f"{_format(config['final_train_loss'])} | {_format(config['eval_loss'])} | "
                     f"{ratio:.3f} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{plot}]({plot})" for plot in plots]
    lines += ["", "Data: `summary.json` (this page's numbers), `runs.json` (every step), "
              "`tensorboard/`."]
    return "\n".join(lines) + "\n"
