"""Null experts on real text, on the CPU: the corpus, the training runs and their table.

    .venv/bin/python scripts/real_text_experiment.py corpus
    .venv/bin/python scripts/real_text_experiment.py train --configs K4_1.0 K8_0.5 --seeds 1 2
    .venv/bin/python scripts/real_text_experiment.py report

The corpus is the Python standard library's own sources (``.py`` files of this interpreter's
lib directory, test suites and site-packages left out): code with its docstrings and
comments, text no one on this project wrote and every machine with Python has. `corpus`
tokenizes it with `python -m megatron_null_moe.data`, training a SentencePiece model first,
and holds out documents for validation. `train` runs the entry point from `--train-data-path`
for each configuration and seed (4 layers, hidden 128, 64 experts of FFN 64, sequence 256;
every configuration through the plugin's router, rho = 1 included, so each logs its
per-expert load), saving checkpoints so that an interrupted run resumes where it stopped.
`report` reads the runs' TensorBoard scalars and writes the table (report.md, report.json).
Everything goes under --output (default outputs/real_text).
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

EXPERT_BIAS = ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate"]
SIGMOID = ["--moe-router-score-function", "sigmoid"]
# name -> (top-K, rho, budget controller, flags over ROUTING's): every rho < 1 held at rho by
# the controller. The ablations of K8 rho=0.5 change one thing each.
CONFIGS = {
    "K4_1.0": (4, 1.0, False, []),
    "K8_1.0": (8, 1.0, False, []),
    "K8_0.5": (8, 0.5, True, []),
    "K16_0.25": (16, 0.25, True, []),
    # The balance loss alone holds the budget (the paper's routing).
    "K8_0.5-balance-loss-alone": (8, 0.5, False, []),
    # The balance loss 5 times stronger; over each sequence instead of the global batch.
    "K8_0.5-balance-1e-1": (8, 0.5, True, ["--moe-aux-loss-coeff", "1e-1"]),
    "K8_0.5-sequence-balance": (8, 0.5, True, ["--moe-null-balance-scope", "sequence"]),
    # No z-loss over the pool.
    "K8_0.5-no-z-loss": (8, 0.5, True, ["--moe-z-loss-coeff", "0"]),
    # Sigmoid scores without the bias; the per-expert selection bias (softmax: in logits;
    # sigmoid: in scores), with null experts, and upstream's top-8 with sigmoid scores and the
    # bias. The "-1e-3" runs keep Megatron's default rate, which swung the null runs' load
    # from step to step with sigmoid scores; 1e-4 did not (docs/balancing.md).
    "K8_0.5-sigmoid": (8, 0.5, True, [*SIGMOID]),
    "K8_0.5-expert-bias": (8, 0.5, True, [*EXPERT_BIAS, "1e-2"]),
    "K8_0.5-sigmoid-expert-bias": (8, 0.5, True, [*SIGMOID, *EXPERT_BIAS, "1e-4"]),
    "K8_1.0-sigmoid-expert-bias": (8, 1.0, False, [*SIGMOID, *EXPERT_BIAS, "1e-4"]),
    "K8_0.5-sigmoid-expert-bias-1e-3": (8, 0.5, True, [*SIGMOID, *EXPERT_BIAS, "1e-3"]),
    "K8_1.0-sigmoid-expert-bias-1e-3": (8, 1.0, False, [*SIGMOID, *EXPERT_BIAS, "1e-3"]),
}
ARCHITECTURE = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--max-position-embeddings", "256", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--qk-layernorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
]
# From scratch: 64 experts of FFN 64. Upcycled: a dense FFN of 256 split into G = 4 experts of
# 64, the 4 slices repeated 16 times (the upcycler's granularity), the same MoE shape.
EXPERTS = ["--ffn-hidden-size", "512", "--num-experts", "64", "--moe-ffn-hidden-size", "64"]
DENSE_FFN, GRANULARITY = 256, 4
ROUTING = ["--moe-router-dtype", "fp32", "--moe-null-balance-scope", "global",
           "--moe-aux-loss-coeff", "2e-2", "--moe-z-loss-coeff", "1e-3",
           "--moe-null-expert-path", "lean"]
RUNTIME = ["--seq-length", "256", "--transformer-impl", "local", "--no-persist-layer-norm",
           "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--distributed-backend",
           "gloo"]
OPTIMISATION = ["--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "3e-3",
                "--min-lr", "3e-4", "--lr-decay-style", "cosine",
                "--weight-decay", "0.1", "--clip-grad", "1.0"]
CORPUS_VOCAB = 1024
VALIDATION_FRACTION = 0.02


def stdlib_sources() -> list:
    """The standard library's .py files, sorted: test suites and site-packages left out."""
    library = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "site-packages", "idle_test"}
    return sorted(path for path in library.rglob("*.py")
                  if not skipped & set(path.relative_to(library).parts[:-1]))


def corpus(options) -> None:
    output = options.output / "corpus"
    output.mkdir(parents=True, exist_ok=True)
    files = stdlib_sources()
    listing = output / "files.txt"
    listing.write_text("\n".join(str(path) for path in files) + "\n")
    started = time.time()
    subprocess.run([sys.executable, "-m", "megatron_null_moe.data", "--input", *map(str, files),
                    "--train-sentencepiece", str(CORPUS_VOCAB),
                    "--validation-fraction", str(VALIDATION_FRACTION),
                    "--output-prefix", str(output / "stdlib"), "--workers", "2",
                    *(["--overwrite"] if options.overwrite else [])], check=True)
    (output / "corpus.json").write_text(json.dumps({
        "files": len(files), "python": sys.version.split()[0],
        "library": sysconfig.get_paths()["stdlib"], "seconds": round(time.time() - started),
        "date": time.strftime("%Y-%m-%d")}, indent=1))


def common_arguments(options, run: Path, seed: int, iterations: int) -> list:
    """Data, optimisation, evaluation, checkpoints (resumed from) and logs of one run."""
    corpus_dir = options.output / "corpus"
    return [
        *RUNTIME, *OPTIMISATION, "--train-iters", str(iterations), "--seed", str(seed),
        "--lr-warmup-iters", str(min(100, iterations // 10)),
        "--train-data-path", str(corpus_dir / "stdlib_text_document"),
        "--valid-data-path", str(corpus_dir / "stdlib_valid_text_document"),
        "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(corpus_dir / "stdlib.model"),
        "--eval-interval", str(options.eval_interval), "--eval-iters", "16",
        "--log-interval", "50", "--tensorboard-dir", str(run / "tb"),
        "--save", str(run / "ckpt"), "--load", str(run / "ckpt"),
        "--save-interval", str(options.eval_interval),
    ]


def routing_arguments(name: str) -> list:
    topk, rho, controller, changed = CONFIGS[name]
    return [*ROUTING, "--moe-router-topk", str(topk), "--moe-null-expert-rho", str(rho),
            *(["--moe-null-budget-controller"] if controller else []), *changed]


def _train_once(options, run: Path, arguments: list, iterations: int) -> None:
    """Train (or resume) the run unless it finished; its output appended to output.txt."""
    if (run / "done.json").exists():
        return
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(run / "output.txt", "a") as log:
        subprocess.run([sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *arguments],
                       check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS=str(options.threads),
                                PYTHONWARNINGS="ignore"))
    (run / "done.json").write_text(json.dumps(
        {"seconds_last_launch": round(time.time() - started), "iterations": iterations,
         "date": time.strftime("%Y-%m-%d")}))
    print(f"{run.name}: {time.time() - started:.0f} s", flush=True)


def dense_run(options, seed: int) -> Path:
    """The dense model the upcycled runs start from (FFN 256), trained once per seed."""
    run = options.output / "runs" / f"dense_seed{seed}"
    _train_once(options, run, [*ARCHITECTURE, "--ffn-hidden-size", str(DENSE_FFN),
                      *common_arguments(options, run, seed, options.dense_iterations)],
                options.dense_iterations)
    return run


def upcycled_arguments(options, name: str, seed: int, run: Path) -> list:
    """Upcycle the seed's dense model into configuration ``name`` (once), and the flags
    that train on from it: the upcycler's model flags, then the routing's."""
    topk, rho, controller, _ = CONFIGS[name]
    upcycled = run / "upcycled"
    if not upcycled.exists():
        subprocess.run([
            sys.executable, "-m", "megatron_null_moe.upcycle", "--megatron-checkpoint",
            str(dense_run(options, seed) / "ckpt"), "--output", str(upcycled),
            "--num-experts", "64", "--granularity", str(GRANULARITY),
            "--moe-router-topk", str(topk), "--moe-null-expert-rho", str(rho),
            "--null-start", "calibrated" if controller else "mean-row",
            "--seed", str(seed)], check=True)
    model = (upcycled / "megatron_args.txt").read_text().split()
    return [*model, *routing_arguments(name), "--pretrained-checkpoint", str(upcycled),
            *common_arguments(options, run, seed, options.iterations)]


def train(options) -> None:
    for seed in options.seeds:
        for name in options.configs:
            if options.upcycled:
                run = options.output / "runs" / f"upcycled_{name}_seed{seed}"
                run.mkdir(parents=True, exist_ok=True)
                arguments = upcycled_arguments(options, name, seed, run)
            else:
                run = options.output / "runs" / f"{name}_seed{seed}"
                arguments = [*ARCHITECTURE, *EXPERTS, *routing_arguments(name),
                             *common_arguments(options, run, seed, options.iterations)]
            _train_once(options, run, arguments, options.iterations)


# Token kinds by the piece's characters (SentencePiece's space mark and byte pieces decoded).
TOKEN_KINDS = ("whitespace", "punctuation", "digits", "word")
EP_SIZES = (8, 16, 32, 64)


def token_kind(piece: str) -> str:
    """whitespace (spaces, newlines, indentation), punctuation (operators, brackets, quotes),
    digits, or word (any letter: identifiers, keywords, English)."""
    if piece.startswith("<0x") and piece.endswith(">"):
        piece = bytes([int(piece[3:-1], 16)]).decode("latin-1")
    text = piece.replace("\u2581", " ")
    if not text.strip():
        return "whitespace"
    if any(character.isalpha() for character in text):
        return "word"
    if any(character.isdigit() for character in text):
        return "digits"
    return "punctuation"


def corpus_tokens(options, prefix: str):
    """The documents of one of the corpus's datasets, concatenated in order (numpy)."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(options.output / "corpus" / prefix))
    return numpy.concatenate([dataset[index] for index in range(len(dataset))])


def training_samples(options, sequences: int, seed: int, length: int = 256):
    """[sequences, length] token ids drawn at random places of the training documents (as
    Megatron's shuffled samples are)."""
    import numpy
    import torch

    tokens = corpus_tokens(options, "stdlib_text_document")
    starts = numpy.random.default_rng(seed).integers(0, len(tokens) - length, sequences)
    return torch.from_numpy(numpy.stack([tokens[start:start + length] for start in starts])
                            .astype("int64"))


def held_out_batches(options, sequences: int, length: int = 256):
    """[sequences, length] token ids: the held-out documents, concatenated and cut."""
    import torch

    tokens = corpus_tokens(options, "stdlib_valid_text_document")
    usable = min(sequences, len(tokens) // length) * length
    return torch.from_numpy(tokens[:usable].astype("int64")).view(-1, length)


def load_checkpoint_model(checkpoint_dir: Path):
    """The run's final checkpoint as a Megatron GPTModel (TP=PP=EP=1), in eval mode."""
    from megatron.core import dist_checkpointing

    from megatron_null_moe.export.checkpoint import moe_model
    from megatron_null_moe.upcycle import checkpoint
    from megatron_null_moe.upcycle.architecture import build_gpt_model

    directory = checkpoint.checkpoint_directory(checkpoint_dir)
    model = moe_model(directory, checkpoint.read_args(directory))
    gpt = build_gpt_model(model.dense, model.moe, router_settings=model.router_settings)
    loaded = dist_checkpointing.load({"model": checkpoint.sharded_state_dict(gpt)},
                                     str(directory))
    gpt.load_state_dict(loaded["model"], strict=False)
    return gpt.eval()


def model_inputs(tokens) -> tuple:
    """GPTModel's forward arguments for [B, S] tokens: ids, positions, causal mask."""
    import torch

    batch, length = tokens.shape
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
    return tokens, torch.arange(length)[None].expand(batch, length), mask


def route(gpt, tokens) -> list:
    """Per MoE layer, [tokens, N] bool: the real experts each token's routing chose (eval
    mode, the budget controller's bias included), tokens in [B, S] order."""
    import torch

    from megatron_null_moe.router import NullExpertRouter

    maps = []
    hooks = [module.register_forward_hook(lambda module, inputs, output: maps.append(output[1]))
             for module in gpt.modules() if isinstance(module, NullExpertRouter)]
    batch, length = tokens.shape
    with torch.no_grad():
        gpt(*model_inputs(tokens))
    for hook in hooks:
        hook.remove()
    # Megatron routes [S, B] flattened: back to [B, S] order, one row per token.
    return [routing.view(length, batch, -1).transpose(0, 1).reshape(batch * length, -1)
            for routing in maps]


def rank_statistics(gpt, tokens_RST, topk: int, rho: float, calibration) -> dict:
    """The scale model's statistics (benchmarks/scale_model.py) of routing R ranks' tokens
    [R, sequences, length]: per EP size the ranks' computed and exchanged rows per token,
    averaged over the MoE layers; the busiest expert over the mean and the real fraction,
    mean over the layers and per layer. With rho < 1 each layer's null bias is first set to
    hold rho on the ``calibration`` batches, as the controller holds it on average in
    training (the final step's bias carries that step's error). A per-expert bias is the
    final step's as it is: what one step routes with, so these loads are one step's, which
    the sum over a log interval can hide (docs/balancing.md)."""
    import torch

    import scale_model

    if rho < 1:
        scale_model.hold_budget(gpt, calibration, rho, model_inputs=model_inputs)
    ranks = tokens_RST.shape[0]
    counts_LRN = torch.stack([torch.stack(route(gpt, rank_tokens)).sum(dim=1)
                              for rank_tokens in tokens_RST], dim=1).long()
    tokens_per_rank = tokens_RST[0].numel()
    by_ep = {ep: [scale_model.load_statistics(scale_model.rank_loads(counts_RN, ep, 8),
                                              tokens_per_rank, topk)
                  for counts_RN in counts_LRN] for ep in EP_SIZES if ep <= ranks}
    return {
        "topk": topk,
        "real_fraction": float(counts_LRN.sum()) / (counts_LRN.shape[0] * ranks
                                                     * tokens_per_rank * topk),
        "expert_imbalance": sum(map(scale_model.expert_imbalance, counts_LRN))
        / len(counts_LRN),
        "expert_imbalance_by_layer": [round(scale_model.expert_imbalance(counts_RN), 4)
                                      for counts_RN in counts_LRN],
        "real_fraction_by_layer": [round(float(counts_RN.sum()) / (ranks * tokens_per_rank
                                                                   * topk), 4)
                                   for counts_RN in counts_LRN],
        "by_ep": {str(ep): scale_model.mean_of(values) for ep, values in by_ep.items()},
    }


def routing_analysis(routing_maps: list, tokens, pieces, topk: int) -> dict:
    """Per layer: the real fraction, the distribution of real experts per token, the busiest
    expert and EP rank over the mean, and the mean real experts per token kind."""
    import torch

    from megatron_null_moe.metrics import expert_parallel_rank_loads, load_max_over_mean

    kinds = [token_kind(pieces[int(token)]) for token in tokens.flatten()]
    layers = []
    for routing in routing_maps:
        real = routing.sum(dim=-1)
        per_expert = routing.sum(dim=0).double()
        distribution = torch.bincount(real, minlength=routing.shape[1] + 1).double()
        by_kind = {}
        for kind in TOKEN_KINDS:
            chosen = torch.tensor([k == kind for k in kinds])
            if chosen.any():
                by_kind[kind] = {"tokens": int(chosen.sum()),
                                 "real_experts": round(float(real[chosen].double().mean()), 3)}
        layers.append({
            "real_fraction": round(float(real.double().mean()) / topk, 4),
            "real_experts_distribution": [round(float(share), 4) for share in
                                          (distribution / distribution.sum())[:17]],
            "expert_load_max_over_mean": round(load_max_over_mean(per_expert), 3),
            "ep_rank_load_max_over_mean": {
                ep: round(load_max_over_mean(expert_parallel_rank_loads(per_expert, ep)), 3)
                for ep in EP_SIZES if routing.shape[1] % ep == 0},
            "real_experts_by_token_kind": by_kind,
        })
    return {"tokens": int(tokens.numel()), "layers": layers}


def analyse(options) -> None:
    """Route the held-out tokens through each finished run's final checkpoint and keep what
    the training log cannot say: per token, per kind of token and per EP rank."""
    import sentencepiece

    from megatron_null_moe.cpu import cpu_harness, destroy_cpu_parallel_state, \
        init_cpu_parallel_state

    sys.path.insert(0, str(ROOT / "benchmarks"))
    model = sentencepiece.SentencePieceProcessor(
        model_file=str(options.output / "corpus" / "stdlib.model"))
    pieces = [model.id_to_piece(index) for index in range(model.get_piece_size())]
    tokens = held_out_batches(options, options.sequences)
    # The scale model's ranks: random training sequences, --rank-sequences per rank; the
    # null bias held at rho on 16 ranks' worth of others.
    ranks = training_samples(options, max(EP_SIZES) * options.rank_sequences, seed=1)
    ranks = ranks.view(max(EP_SIZES), options.rank_sequences, -1)
    calibration = list(training_samples(options, 16 * options.rank_sequences, seed=2)
                       .split(options.rank_sequences))
    with cpu_harness():
        init_cpu_parallel_state()
        try:
            for run in sorted((options.output / "runs").glob("*_seed*")):
                target = run / "analysis.json"
                if (not (run / "done.json").exists() or target.exists()
                        or run.name.startswith("dense")):
                    continue
                gpt = load_checkpoint_model(run / "ckpt")
                topk, rho, _, _ = CONFIGS[config_of(run)]
                analysis = routing_analysis(route(gpt, tokens), tokens, pieces, topk)
                analysis["ranks"] = rank_statistics(gpt, ranks, topk, rho, calibration)
                target.write_text(json.dumps(analysis, indent=1))
                print(f"{run.name}: analysed {tokens.numel()} held-out tokens and "
                      f"{ranks.numel()} training tokens as {ranks.shape[0]} ranks", flush=True)
        finally:
            destroy_cpu_parallel_state()


def config_of(run: Path) -> str:
    """The configuration name of a run directory ('upcycled_K8_0.5_seed1' -> 'K8_0.5')."""
    return run.name.removeprefix("upcycled_").rsplit("_seed", 1)[0]


def _mean_over_last(values: dict, fraction: float = 0.2):
    steps = sorted(values)
    last = steps[int(len(steps) * (1 - fraction)):] or steps
    return sum(values[step] for step in last) / len(last)


def run_summary(run: Path) -> dict:
    from test_pretrain import scalars

    logged = scalars(run)
    layers = sorted({tag.rsplit("_", 1)[1] for tag in logged
                     if tag.startswith("null_moe/real_fraction_layer_")})
    final = max(logged["lm loss validation"])

    def per_layer(name):
        return [round(_mean_over_last(logged[f"null_moe/{name}_layer_{layer}"]), 4)
                for layer in layers if f"null_moe/{name}_layer_{layer}" in logged]

    return {
        "iterations": max(logged["lm loss"]),
        "train_loss_last_fifth": round(_mean_over_last(logged["lm loss"]), 4),
        "validation_loss": round(logged["lm loss validation"][final], 4),
        "real_experts_per_token": round(_mean_over_last(logged["null real experts/token"]), 4),
        "real_fraction": round(_mean_over_last(logged["null real fraction"]), 4),
        # Per layer: single logged steps of 2,048 tokens, noisy (the held-out routing of
        # analysis.json has each layer's fraction over 16,384 tokens).
        "real_fraction_by_layer": per_layer("real_fraction"),
        "zero_real_fraction_by_layer": per_layer("zero_real_fraction"),
        "expert_load_max_over_mean_by_layer": per_layer("expert_load_max_over_mean"),
        # Each step's own figure, averaged over the log interval (runs that logged it).
        "expert_load_max_over_mean_per_step_by_layer": per_layer(
            "expert_load_max_over_mean_per_step"),
    }


def report(options) -> None:
    runs = {}
    for run in sorted((options.output / "runs").glob("*_seed*")):
        if (run / "done.json").exists() and not run.name.startswith("dense"):
            runs[run.name] = run_summary(run)
            if (run / "analysis.json").exists():
                runs[run.name]["held_out_routing"] = json.loads(
                    (run / "analysis.json").read_text())
    corpus_info = json.loads((options.output / "corpus" / "corpus.json").read_text())
    (options.output / "report.json").write_text(json.dumps(
        {"corpus": corpus_info, "runs": runs}, indent=1) + "\n")
    lines = ["| run | iterations | train loss (last fifth) | validation loss | real experts / "
             "token (training, last fifth) | busiest expert / mean per layer (training, last "
             "fifth of the log intervals) |", "|---" * 6 + "|"]
    for name, summary in runs.items():
        lines.append(
            f"| {name} | {summary['iterations']} | {summary['train_loss_last_fifth']} | "
            f"{summary['validation_loss']} | {summary['real_experts_per_token']} | "
            f"{', '.join(map(str, summary['expert_load_max_over_mean_by_layer']))} |")
    lines += ["", configuration_table(runs), "", analysis_table(options)]
    (options.output / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def configuration_table(runs: dict) -> str:
    """Per configuration (its seeds together): the validation loss of each seed and their
    mean, and the means over the seeds of the training loss, the real fraction per layer and
    the busiest expert / mean per layer: in training (last fifth) over each log interval and
    per step (where every seed logged it), and over one step of the scale model's ranks'
    tokens routed through the final checkpoint (where every seed was analysed)."""
    by_configuration = {}
    for name, summary in runs.items():
        by_configuration.setdefault(name.rsplit("_seed", 1)[0], []).append(summary)
    lines = ["| configuration | seeds | validation loss per seed (mean) | training loss, last "
             "fifth (mean) | real fraction per layer | busiest expert / mean per layer: "
             "training, log interval | training, per step | final checkpoint, one step of "
             f"{max(EP_SIZES)} ranks |", "|---" * 8 + "|"]

    def mean(values):
        return sum(values) / len(values)

    def per_layer(values_by_seed, digits):
        if not values_by_seed or not all(values_by_seed):
            return "-"
        return ", ".join(f"{mean(layer):.{digits}f}" for layer in zip(*values_by_seed))

    for name, summaries in sorted(by_configuration.items()):
        validation = [summary["validation_loss"] for summary in summaries]
        one_step = [summary.get("held_out_routing", {}).get("ranks", {}).get(
            "expert_imbalance_by_layer") for summary in summaries]
        lines.append(
            f"| {name} | {len(summaries)} | {', '.join(f'{v:.3f}' for v in validation)} "
            f"({mean(validation):.3f}) | "
            f"{mean([summary['train_loss_last_fifth'] for summary in summaries]):.3f} | "
            + per_layer([s["real_fraction_by_layer"] for s in summaries], 3) + " | "
            + per_layer([s["expert_load_max_over_mean_by_layer"] for s in summaries], 2)
            + " | " + per_layer([s.get("expert_load_max_over_mean_per_step_by_layer")
                                 for s in summaries], 2)
            + " | " + per_layer(one_step, 2) + " |")
    return "\n".join(lines)


def analysis_table(options) -> str:
    """The held-out routing of each analysed run: the busiest EP rank over the mean (worst
    layer) at each EP, and the mean real experts per token kind (mean over layers)."""
    lines = ["| run | held-out tokens | real fraction per layer | tokens with no real expert "
             "per layer | busiest EP rank / mean, worst layer: "
             + ", ".join(f"EP {ep}" for ep in EP_SIZES) + " | real experts per token: "
             + ", ".join(TOKEN_KINDS) + " |", "|---" * 6 + "|"]
    for run in sorted((options.output / "runs").glob("*_seed*")):
        if not (run / "analysis.json").exists():
            continue
        analysis = json.loads((run / "analysis.json").read_text())
        layers = analysis["layers"]
        worst = [max(layer["ep_rank_load_max_over_mean"][str(ep)] for layer in layers)
                 for ep in EP_SIZES]
        kinds = [sum(layer["real_experts_by_token_kind"][kind]["real_experts"]
                     for layer in layers) / len(layers) for kind in TOKEN_KINDS]
        fractions = ", ".join(f"{layer.get('real_fraction', float('nan')):.3f}"
                              for layer in layers)
        zero = ", ".join(f"{layer['real_experts_distribution'][0]:.3f}" for layer in layers)
        lines.append(f"| {run.name} | {analysis['tokens']} | {fractions} | {zero} | "
                     f"{', '.join(f'{value:.2f}' for value in worst)} | "
                     f"{', '.join(f'{value:.2f}' for value in kinds)} |")
    return "\n".join(lines)


# The scale model's configurations (its names) from the runs of these configurations, per
# set of runs: from scratch, upcycled, with a 5x balance loss, and with the per-expert bias
# (softmax, against upstream top-8 with the balance loss; sigmoid at 1e-4 and at Megatron's
# default rate, each against upstream top-8 with sigmoid scores and the bias at that rate).
SCALE_SETS = {
    "scratch": ("", {"upstream K8 rho=1": "K8_1.0", "upstream K4 rho=1": "K4_1.0",
                     "null K8 rho=0.5": "K8_0.5"}),
    "upcycled": ("upcycled_", {"upstream K8 rho=1": "K8_1.0", "upstream K4 rho=1": "K4_1.0",
                               "null K8 rho=0.5": "K8_0.5"}),
    "balance-1e-1": ("", {"upstream K8 rho=1": "K8_1.0", "upstream K4 rho=1": "K4_1.0",
                          "null K8 rho=0.5": "K8_0.5-balance-1e-1"}),
    "expert-bias": ("", {"upstream K8 rho=1": "K8_1.0", "upstream K4 rho=1": "K4_1.0",
                         "null K8 rho=0.5": "K8_0.5-expert-bias"}),
    "sigmoid-expert-bias": ("", {"upstream K8 rho=1": "K8_1.0-sigmoid-expert-bias",
                                 "upstream K4 rho=1": "K4_1.0",
                                 "null K8 rho=0.5": "K8_0.5-sigmoid-expert-bias"}),
    "sigmoid-expert-bias-1e-3": ("", {"upstream K8 rho=1": "K8_1.0-sigmoid-expert-bias-1e-3",
                                      "upstream K4 rho=1": "K4_1.0",
                                      "null K8 rho=0.5": "K8_0.5-sigmoid-expert-bias-1e-3"}),
}


def scale(options) -> None:
    """The analysed runs' rank statistics in benchmarks/scale_model.py's format (the mean
    over the seeds analysed), for `python benchmarks/scale_model.py model --statistics`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale_model

    prefix, scale_configs = SCALE_SETS[options.set]
    configs = {}
    for name, config in scale_configs.items():
        runs = sorted((options.output / "runs").glob(f"{prefix}{config}_seed*"))
        analysed = [json.loads((run / "analysis.json").read_text()) for run in runs
                    if (run / "analysis.json").exists()]
        summaries = [run_summary(run) for run in runs if (run / "analysis.json").exists()]
        if not analysed:
            continue
        ranks = [analysis["ranks"] for analysis in analysed]
        configs[name] = {
            "run": f"{prefix}{config}", "seeds": len(ranks), "topk": ranks[0]["topk"],
            "training_real_fraction_last_fifth": [
                sum(layer) / len(layer) for layer in
                zip(*(summary["real_fraction_by_layer"] for summary in summaries))],
            "real_fraction": sum(r["real_fraction"] for r in ranks) / len(ranks),
            "expert_imbalance": sum(r["expert_imbalance"] for r in ranks) / len(ranks),
            "by_ep": {ep: scale_model.mean_of([r["by_ep"][ep] for r in ranks])
                      for ep in ranks[0]["by_ep"]},
        }
    corpus_info = json.loads((options.output / "corpus" / "corpus.json").read_text())
    statistics = {
        "how": {"corpus": "the Python standard library's .py sources (tests and site-packages "
                          f"left out), Python {corpus_info['python']}",
                "experts": 64, "ranks": max(EP_SIZES),
                "tokens_per_rank": options.rank_sequences * 256, "gpus_per_node": 8,
                "date": time.strftime("%Y-%m-%d"),
                "machine": "this project's CPU machine (2 cores, no GPU)"},
        "configs": configs,
    }
    suffix = "" if options.set == "scratch" else f"_{options.set.replace('-', '_')}"
    target = options.output / f"scale_statistics{suffix}.json"
    target.write_text(json.dumps(statistics, indent=1) + "\n")
    print(f"wrote {target}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train null-expert and upstream-comparable MoE configurations on the "
                    "Python standard library's sources and tabulate loss and routing.")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "real_text",
                        help="Directory of the corpus, the runs and the report.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("corpus", help="Tokenize the standard library's sources.")
    build.add_argument("--overwrite", action="store_true",
                       help="Replace a corpus that exists.")
    run = commands.add_parser("train", help="Train (or resume) each configuration and seed.")
    run.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                     help="Configurations, named K{top-K}_{rho}, an ablation's change after "
                          "a dash.")
    run.add_argument("--seeds", nargs="+", type=int, default=[1],
                     help="Seeds, each a run of every configuration.")
    run.add_argument("--iterations", type=int, default=1500,
                     help="Iterations of 2,048 tokens each run trains.")
    run.add_argument("--eval-interval", type=int, default=250,
                     help="Iterations between validations and checkpoints.")
    run.add_argument("--threads", type=int, default=2,
                     help="OMP_NUM_THREADS of each run (1 for two runs side by side on 2 "
                          "cores).")
    run.add_argument("--upcycled", action="store_true",
                     help="Start each configuration from the seed's dense model (trained "
                          "first, --dense-iterations), upcycled with granularity 4.")
    run.add_argument("--dense-iterations", type=int, default=750,
                     help="Iterations of the dense model the upcycled runs start from.")
    study = commands.add_parser(
        "analyse", help="Route held-out tokens through each finished run's final checkpoint.")
    study.add_argument("--sequences", type=int, default=64,
                       help="Held-out sequences of 256 tokens to route.")
    study.add_argument("--rank-sequences", type=int, default=16,
                       help="Training sequences of 256 tokens per rank of the scale model's "
                            "64 expert-parallel ranks.")
    scaled = commands.add_parser(
        "scale", help="Write the analysed runs' rank statistics for benchmarks/scale_model.py.")
    scaled.add_argument("--set", default="scratch", choices=sorted(SCALE_SETS),
                        help="Which runs: from scratch (the default), upcycled, K8 rho=0.5 "
                             "with the balance loss at 1e-1, or with the per-expert bias "
                             "(softmax; or sigmoid, at 1e-4 or at Megatron's default rate, "
                             "against upstream top-8 with sigmoid scores and the bias at the "
                             "same rate).")
    scaled.add_argument("--rank-sequences", type=int, default=16,
                        help="Sequences of 256 tokens per rank that analyse routed.")
    commands.add_parser("report", help="Write report.md and report.json from the runs.")
    return parser


def main(argv=None) -> None:
    options = build_parser().parse_args(argv)
    {"corpus": corpus, "train": train, "analyse": analyse, "scale": scale,
     "report": report}[options.command](options)


if __name__ == "__main__":
    main()
