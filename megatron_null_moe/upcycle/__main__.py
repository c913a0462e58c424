"""Upcycle a dense model into a null-expert MoE checkpoint for Megatron (runs on the CPU).

    python -m megatron_null_moe.upcycle --hf-model Qwen3-0.6B/ --output qwen3-moe/ \
        --num-experts 64 --granularity 4 --moe-router-topk 8 --moe-null-expert-rho 0.5 \
        --moe-shared-expert-intermediate-size 3072 --reinit-fraction 0.3

The input is a Hugging Face Qwen3 directory (--hf-model) or a dense Megatron GPT torch_dist
checkpoint saved with any TP/PP (--megatron-checkpoint). The output is a Megatron release
checkpoint, written all or nothing (with --save-dense: both checkpoints or neither), with
``megatron_args.txt`` (the model's launch flags, one a line) and ``upcycle.json`` (settings
and each layer's router start) beside it.
"""

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

from megatron_null_moe.cli import quiet_if_command

quiet_if_command(__name__)  # before Megatron is imported: its notices fire at import

import torch  # noqa: E402

from megatron_null_moe.cli import refusals_as_errors  # noqa: E402
from megatron_null_moe.upcycle import checkpoint, huggingface  # noqa: E402
from megatron_null_moe.upcycle.architecture import (  # noqa: E402
    DenseArchitecture,
    build_gpt_model,
    checkpoint_args,
    megatron_flags,
)
from megatron_null_moe.upcycle.convert import UpcycleSettings, upcycle_into  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_null_moe.upcycle",
        description="Upcycle a dense Qwen3 (Hugging Face) or Megatron GPT checkpoint into a "
                    "null-expert MoE Megatron checkpoint.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", type=Path, metavar="DIR",
                        help="Hugging Face Qwen3 directory: config.json and *.safetensors.")
    source.add_argument("--megatron-checkpoint", type=Path, metavar="DIR",
                        help="dense Megatron GPT checkpoint (--ckpt-format torch_dist, any "
                             "TP/PP): a --save directory or one of its iteration directories.")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="new directory for the MoE checkpoint (must not exist).")
    parser.add_argument("--num-experts", type=int, required=True, metavar="N")
    parser.add_argument("--granularity", type=int, default=1, metavar="G",
                        help="each dense FFN of width F is split into G experts of width F/G, "
                             "the G slices repeated N/G times (default 1).")
    parser.add_argument("--moe-router-topk", type=int, default=2, metavar="K")
    parser.add_argument("--moe-null-expert-rho", type=float, default=1.0, metavar="RHO",
                        help="target real fraction rho of the K slots (default 1: no nulls).")
    parser.add_argument("--moe-num-null-experts", type=int, default=None, metavar="M",
                        help="null copies M (default N(1-rho)/rho).")
    parser.add_argument("--moe-shared-expert-intermediate-size", type=int, default=0,
                        metavar="S", help="shared expert width: 0 (none) or a multiple of F; "
                                          "it starts as half of the dense FFN.")
    parser.add_argument("--reinit-fraction", type=float, default=0.0, metavar="R",
                        help="drop-upcycling: share of each expert's hidden units "
                             "re-initialised (paper 0.3; default 0).")
    parser.add_argument("--moe-layers", default="all", metavar="LAYERS",
                        help="layers that become MoE: 'all' or 1-based numbers and ranges, "
                             "e.g. '2-28' or '1,3,5'.")
    parser.add_argument("--router-init", choices=("grouped", "independent"), default="grouped",
                        help="grouped (default): the G experts of one FFN copy share a router "
                             "row, so a token takes whole copies and the layer starts as the "
                             "dense FFN (with 0, G, 2G, ... real experts per token); needs K a "
                             "multiple of G and M >= K or M a multiple of G (refused "
                             "otherwise); independent: one random row per expert, no such "
                             "start.")
    parser.add_argument("--null-start", choices=("calibrated", "mean-row"),
                        default="calibrated",
                        help="calibrated (default; train with --moe-null-budget-controller): "
                             "the router's null selection bias starts at the offset that gives "
                             "a real fraction near rho; mean-row: no offset, the paper's "
                             "routing, which starts near 1 and is brought down by the balance "
                             "loss. The null row is the mean real row either way.")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seeds the router rows and the re-initialised units.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the written tensors (bf16 for a --bf16 run).")
    parser.add_argument("--save-dense", type=Path, default=None, metavar="DIR",
                        help="also write the dense model as a Megatron checkpoint.")
    return parser


def parse_layers(text: str) -> Optional[Tuple[int, ...]]:
    """'all' -> None; '1,3-5' -> (1, 3, 4, 5). ValueError naming --moe-layers otherwise."""
    if text.strip() == "all":
        return None
    layers = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise ValueError(f"--moe-layers {text!r}: allowed: 'all' or 1-based layer numbers and "
                         "ranges such as '2-28' or '1,3,5'.") from None
    return tuple(layers)


def settings_from_args(args: argparse.Namespace) -> UpcycleSettings:
    return UpcycleSettings(
        num_experts=args.num_experts, granularity=args.granularity, topk=args.moe_router_topk,
        real_fraction=args.moe_null_expert_rho, num_null_copies=args.moe_num_null_experts,
        shared_expert_ffn_hidden_size=args.moe_shared_expert_intermediate_size,
        reinit_fraction=args.reinit_fraction, seed=args.seed,
        moe_layers=parse_layers(args.moe_layers), grouped_router=args.router_init == "grouped",
        calibrated_null_start=args.null_start == "calibrated")


def read_dense(args: argparse.Namespace) -> Tuple[DenseArchitecture, torch.nn.Module]:
    """The dense architecture and model (fp32, TP=1) from --hf-model or --megatron-checkpoint."""
    if args.hf_model is not None:
        if not args.hf_model.is_dir():
            raise ValueError(f"--hf-model {args.hf_model}: not a directory.")
        dense = huggingface.qwen3_architecture(args.hf_model,
                                               huggingface.read_config(args.hf_model))
        reader = huggingface.SafetensorsReader(args.hf_model)
        model = build_gpt_model(dense)
        huggingface.load_into(model, huggingface.megatron_tensors(reader, dense),
                              f"--hf-model {args.hf_model}")
        return dense, model
    directory = checkpoint.checkpoint_directory(args.megatron_checkpoint)
    saved_args = checkpoint.read_args(directory)
    dense = checkpoint.dense_architecture(directory, saved_args)
    model = build_gpt_model(dense, params_dtype=checkpoint.checkpoint_dtype(saved_args))
    checkpoint.load_dense(model, directory)
    return dense, model.float()


def upcycle(args: argparse.Namespace) -> dict:
    """Read, upcycle and write (Megatron's process groups must exist); returns the report."""
    started = time.perf_counter()
    settings = settings_from_args(args)
    refuse_existing_outputs(args)
    dense, dense_model = read_dense(args)
    moe = settings.moe_shape(dense)
    moe_model = build_gpt_model(dense, moe, params_dtype=DTYPES[args.dtype])
    starts = upcycle_into(dense_model, moe_model, dense, moe, settings)
    report = {
        "source": str(args.hf_model or args.megatron_checkpoint),
        "dense": dataclasses.asdict(dense),
        "settings": dataclasses.asdict(settings),
        "num_null_copies": moe.null_config.null_copies_for(moe.num_experts),
        "target_real_fraction": moe.null_config.pool_real_fraction(moe.num_experts),
        "router_start": [dataclasses.asdict(start) for start in starts],
        "megatron_args": megatron_flags(dense, moe),
    }
    outputs = [("--output", args.output)]
    outputs += [] if args.save_dense is None else [("--save-dense", args.save_dense)]
    with checkpoint.staged_outputs(outputs) as directories:  # both or neither
        if args.save_dense is not None:
            checkpoint.save_release_checkpoint(
                dense_model, checkpoint_args(dense), directories[1], [],
                {"megatron_args.txt": "\n".join(megatron_flags(dense)) + "\n"})
        del dense_model  # host memory for the MoE write
        checkpoint.save_release_checkpoint(
            moe_model, checkpoint_args(dense, moe, bf16=args.dtype == "bf16"), directories[0],
            [f"decoder.layers.{layer - 1}." for layer in moe.moe_layers],
            {"megatron_args.txt": "\n".join(report["megatron_args"]) + "\n",
             "upcycle.json": json.dumps(report, indent=1) + "\n"})
    report["seconds"] = time.perf_counter() - started
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def refuse_existing_outputs(args: argparse.Namespace) -> None:
    """Before the (long) read: each output must be a new name in an existing directory, and
    --save-dense another directory than --output."""
    for flag, path in (("--output", args.output), ("--save-dense", args.save_dense)):
        if path is not None:
            checkpoint.refuse_existing_output(path, flag)
    if args.save_dense is not None and args.save_dense.resolve() == args.output.resolve():
        raise ValueError(f"--save-dense {args.save_dense} is --output {args.output}; allowed: "
                         "another new directory (the dense and the MoE checkpoint are "
                         "written side by side).")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with refusals_as_errors(parser.prog), checkpoint.cpu_process_groups(args.seed):
        report = upcycle(args)
    starts = report["router_start"]
    without = [s["real_fraction_without_offset"] for s in starts]
    with_offset = [s["real_fraction_with_offset"] for s in starts]
    print(f"upcycled {report['source']} -> {args.output} in {report['seconds']:.1f} s, "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB")
    if starts and report["num_null_copies"]:
        written = args.null_start == "calibrated"
        print(f"initial real fraction on proxy inputs (target {report['target_real_fraction']:.3g})"
              f": {sum(with_offset) / len(starts):.3f} with the null selection offset"
              f"{' (written: train with --moe-null-budget-controller)' if written else ''}, "
              f"{sum(without) / len(starts):.3f} without{'' if written else ' (written)'}")
    print(f"train with: {' '.join(report['megatron_args'])}")


if __name__ == "__main__":
    sys.exit(main())
