"""How far apart parallel layouts train with each balance-loss scope, on the CPU.

    .venv/bin/python scripts/layouts_global_scope.py [--output DIRECTORY]

The model and runs of tests/test_layouts.py (4 layers, hidden 64, 8 experts, top-4, rho 0.5,
budget controller, fp32, global batch 8 of micro-batches of 1, dropout off), on the Megatron
expert path, with --moe-null-balance-scope global and, for comparison, micro-batch. One
process trains one iteration and saves it; every run then loads those weights and controller
state with --finetune (a fresh optimizer, iteration counter 0) and trains iterations 1-5,
in one process and in layouts on 8 gloo ranks (one launch of tests/pretrain_runs.py each).
Prints, per layout and iteration, the loss's relative difference from one process and the
largest difference over the layers of the real fraction and the controller's bias.
Took 4.2 minutes on 2 cores (2026-12-07).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from test_layouts import LAYERS, MODEL, _launch, _layout, _with_flags  # noqa: E402
from test_pretrain import scalars  # noqa: E402

SCOPES = ("global", "micro-batch")
LAYOUTS = {  # name -> data-parallel size on 8 ranks, micro-batches per rank and step
    "ep4": "DP 8, 1 micro-batch per rank",
    "tp2sp_pp2_ep2": "DP 2, 4 micro-batches per rank",
    "pp2_vp2_ep2": "DP 4, 2 micro-batches per rank",
}
ITERATIONS = range(1, 6)


def _run(root: Path, initial: Path, scope: str, name: str) -> dict:
    directory = root / scope / name
    argv = [*_with_flags(MODEL, {"--moe-null-balance-scope": scope}),
            "--moe-null-expert-path", "megatron", "--tensorboard-dir", str(directory / "tb"),
            "--load", str(initial), "--finetune", "--no-load-optim",
            *_layout(name, "megatron")]
    return {"name": f"{scope}/{name}", "argv": argv, "expect_error": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure how far parallel layouts on 8 gloo ranks train from one process "
                    "with the global and the micro-batch balance-loss scopes.")
    parser.add_argument("--output", type=Path, default=None,
                        help="Directory for the runs and differences.json (default: a new "
                             "temporary one).")
    return parser


def main() -> None:
    options = build_parser().parse_args()
    root = options.output or Path(tempfile.mkdtemp(prefix="layouts_global_scope_"))
    root.mkdir(parents=True, exist_ok=True)
    initial = root / "initial"
    first = [{"name": "initial", "expect_error": None, "argv": [
        *MODEL, "--save", str(initial), "--save-interval", "1", "--train-iters", "1",
        "--no-save-optim"]}]
    first += [_run(root, initial, scope, "one_process") for scope in SCOPES]
    _launch(first, 1, root, "first")
    _launch([_run(root, initial, scope, name) for scope in SCOPES for name in LAYOUTS],
            8, root, "eight")

    results = {}
    for scope in SCOPES:
        reference = scalars(root / scope / "one_process")
        for name in LAYOUTS:
            trained = scalars(root / scope / name)
            for step in ITERATIONS:
                loss = abs(trained["lm loss"][step] / reference["lm loss"][step] - 1)
                real, bias = (max(abs(trained[f"null_moe/{kind}_layer_{layer}"][step]
                                      - reference[f"null_moe/{kind}_layer_{layer}"][step])
                                  for layer in LAYERS)
                              for kind in ("real_fraction", "budget_bias"))
                results.setdefault(f"{scope}/{name}", {})[step] = {
                    "loss_relative": loss, "real_fraction": real, "budget_bias": bias,
                    "loss": trained["lm loss"][step],
                    "loss_one_process": reference["lm loss"][step]}
    (root / "differences.json").write_text(json.dumps(results, indent=1))

    print("| scope | layout | iteration | loss, one process | loss, layout | loss (relative) "
          "| real fraction (largest layer) | controller bias (largest layer) |")
    print("|---|---|---|---|---|---|---|---|")
    for run, steps in results.items():
        scope, name = run.split("/")
        for step, row in steps.items():
            print(f"| {scope} | {name} ({LAYOUTS[name]}) | {step} | "
                  f"{row['loss_one_process']:.6f} | {row['loss']:.6f} | "
                  f"{row['loss_relative']:.1e} | {row['real_fraction']:.1e} | "
                  f"{row['budget_bias']:.1e} |")
    print(f"runs and differences.json: {root}")


if __name__ == "__main__":
    main()
