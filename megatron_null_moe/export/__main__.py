"""Export a null-expert MoE Megatron checkpoint as a Hugging Face model (runs on the CPU).

    python -m megatron_null_moe.export --checkpoint runs/qwen3-null/ --output qwen3-null-hf/ \
        [--iteration N] [--dtype bf16|fp32] [--tokenizer Qwen3-0.6B/]

The input is a torch_dist checkpoint of a GPT MoE with Qwen3's layers (RMSNorm, per-head
query/key norms, SwiGLU, no biases), saved at any TP/PP/EP and on either expert path by the
entry point, the patched Megatron-LM script or the upcycler. The output directory, written
all or nothing: config.json, safetensors shards with their index, the tokenizer files of
--tokenizer, and (unless the model is a plain Qwen3-MoE: rho = 1, no shared expert, softmax
scores without a per-expert bias or groups) the modeling code, which loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` where only torch and
transformers are installed.
"""

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

from megatron_null_moe.cli import quiet_if_command

quiet_if_command(__name__)  # before Megatron is imported: its notices fire at import

import torch  # noqa: E402

from megatron_null_moe import pool_routing  # noqa: E402
from megatron_null_moe.cli import refusals_as_errors  # noqa: E402
from megatron_null_moe.export import remote_code  # noqa: E402
from megatron_null_moe.export.checkpoint import (  # noqa: E402
    CHECKPOINT_FLAG,
    checkpoint_tensors,
    moe_model,
)
from megatron_null_moe.export.huggingface import (  # noqa: E402
    REMOTE_CONFIGURATION,
    REMOTE_MODELING,
    exported_dtype,
    hugging_face_config,
    hugging_face_tensors,
    is_plain_qwen3_moe,
)
from megatron_null_moe.export.shards import SafetensorsShards  # noqa: E402
from megatron_null_moe.upcycle import checkpoint  # noqa: E402
from megatron_null_moe.upcycle.architecture import build_gpt_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Tensor bytes held before a shard is written: with one layer read at a time, the bound on
# the export's memory.
MAX_SHARD_BYTES = 2 * 2**30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_null_moe.export",
        description="Export a null-expert MoE Megatron checkpoint as a Hugging Face model.")
    parser.add_argument(CHECKPOINT_FLAG, type=Path, required=True, metavar="DIR",
                        help="Megatron checkpoint (--ckpt-format torch_dist, any TP/PP/EP): a "
                             "--save directory (its latest iteration) or an iteration "
                             "directory.")
    parser.add_argument("--iteration", type=int, default=None, metavar="N",
                        help="iteration N of the --save directory (default: its latest).")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="new directory for the Hugging Face model (must not exist).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: the checkpoint's, fp32 "
                             "for fp16); the selection biases (null and per-expert) stay "
                             "fp32.")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="copy the tokenizer files of DIR (e.g. the Hugging Face model "
                             "the run was upcycled from) into the output.")
    return parser


def tokenizer_files(directory: Optional[Path]) -> List[Path]:
    """The tokenizer files of --tokenizer (none without it); refused when it has none."""
    if directory is None:
        return []
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ValueError(f"--tokenizer {directory}: no tokenizer files; allowed: a directory "
                         f"with any of {', '.join(TOKENIZER_FILES)}.")
    return files


def export(args: argparse.Namespace) -> dict:
    """Read, convert and write (Megatron's process groups must exist); returns the report."""
    started = time.perf_counter()
    checkpoint.refuse_existing_output(args.output)
    directory = checkpoint.checkpoint_directory(args.checkpoint, args.iteration, CHECKPOINT_FLAG)
    saved_args = checkpoint.read_args(directory, CHECKPOINT_FLAG)
    model = moe_model(directory, saved_args)
    tokenizer = tokenizer_files(args.tokenizer)
    source_dtype = checkpoint.checkpoint_dtype(saved_args)
    dtype = DTYPES[args.dtype] if args.dtype else \
        torch.bfloat16 if source_dtype == torch.bfloat16 else torch.float32
    with checkpoint.staged_outputs([("--output", args.output)]) as (staging,):
        # Built from the args and never filled: it names the checkpoint's keys and regions.
        skeleton = build_gpt_model(model.dense, model.moe, params_dtype=source_dtype)
        shards = SafetensorsShards(staging, MAX_SHARD_BYTES)
        for megatron_name, megatron_tensor in checkpoint_tensors(skeleton, directory,
                                                                 model.per_layer_keys):
            for name, tensor in hugging_face_tensors(megatron_name, megatron_tensor, model):
                shards.add(name, tensor, exported_dtype(name, dtype))
        index = shards.close()
        config = hugging_face_config(model, dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not is_plain_qwen3_moe(model):
            write_remote_code(staging)
        for path in tokenizer:
            shutil.copyfile(path, staging / path.name)
    return {
        "checkpoint": str(directory), "output": str(args.output),
        "model_type": config["model_type"], "dtype": config["dtype"],
        "tensors": len(index["weight_map"]), "bytes": index["metadata"]["total_size"],
        "shards": len(set(index["weight_map"].values())),
        "tokenizer_files": [path.name for path in tokenizer],
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def write_remote_code(directory: Path) -> None:
    """The configuration and modeling files, and the plugin's routing beside them."""
    source = Path(remote_code.__file__).parent
    for name in (REMOTE_CONFIGURATION, REMOTE_MODELING):
        shutil.copyfile(source / f"{name}.py", directory / f"{name}.py")
    shutil.copyfile(pool_routing.__file__, directory / "pool_routing.py")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with refusals_as_errors(parser.prog), checkpoint.cpu_process_groups(seed=0):
        report = export(args)
    print(f"exported {report['checkpoint']} -> {report['output']} ({report['model_type']}, "
          f"{report['dtype']}, {report['tensors']} tensors, {report['bytes'] / 2**30:.2f} GiB "
          f"in {report['shards']} shard(s)) in {report['seconds']:.1f} s, peak RSS "
          f"{report['peak_rss_gib']:.2f} GiB")
    if report["model_type"] != "qwen3_moe":
        print(f"load with: AutoModelForCausalLM.from_pretrained({str(args.output)!r}, "
              "trust_remote_code=True)")


if __name__ == "__main__":
    sys.exit(main())
