"""Megatron torch_dist checkpoints: read a dense GPT one, write the upcycled one atomically.

torch_dist stores global (unsharded) tensors, so a dense checkpoint saved with any TP/PP
loads into a TP=1/PP=1 model built from its args (the export reads MoE checkpoints with the
same pieces: directory, args, architecture, process groups). The upcycled checkpoint is written as
Megatron's own converters write one: a ``release`` directory and a tracker file reading
``release``, so ``--load`` (or ``--pretrained-checkpoint``) starts at iteration 0 with a
fresh optimizer and RNG; the keys come from the model's ``sharded_state_dict``.
"""

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron.core import dist_checkpointing, parallel_state

from megatron_null_moe.upcycle.architecture import DenseArchitecture

MEGATRON_FLAG = "--megatron-checkpoint"
OUTPUT_FLAG = "--output"
TRACKER = "latest_checkpointed_iteration.txt"
# Megatron's loader reads this content metadata to build the sharded state dict it loads.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# What a truncated or foreign checkpoint raises (torch's CheckpointException is no Exception).
LOAD_ERRORS = (Exception, CheckpointException)


def _refuse(directory, what: str, flag: str = MEGATRON_FLAG) -> None:
    raise ValueError(f"{flag} {directory}: {what}")


def checkpoint_directory(directory: Path, iteration: Optional[int] = None,
                         flag: str = MEGATRON_FLAG) -> Path:
    """The directory holding the dist checkpoint: iteration ``iteration`` of a save directory
    (None: the tracked one), or ``directory`` itself when it is one (an iter_XXXXXXX or
    release directory)."""
    tracker = directory / TRACKER
    if iteration is not None:
        saved = sorted(int(path.name[5:]) for path in directory.glob("iter_*")
                       if path.name[5:].isdigit())
        if iteration not in saved:
            _refuse(directory, f"no iteration {iteration} (no iter_{iteration:07d}); allowed: "
                               f"{', '.join(map(str, saved)) or 'none saved there'}.", flag)
        directory = directory / f"iter_{iteration:07d}"
    elif tracker.is_file():
        marker = tracker.read_text().strip()
        name = "release" if marker == "release" else f"iter_{int(marker):07d}" \
            if marker.isdigit() else None
        if name is None:
            _refuse(directory, f"{TRACKER} reads {marker!r}; allowed: an iteration or "
                               "'release'.", flag)
        directory = directory / name
    if not (directory / "metadata.json").is_file():
        _refuse(directory, "not a Megatron torch_dist checkpoint (no metadata.json); allowed: "
                           "a --save directory or one of its iteration directories, saved "
                           "with --ckpt-format torch_dist.", flag)
    return directory


def read_args(directory: Path, flag: str = MEGATRON_FLAG):
    """The training args stored in a dist checkpoint's common state."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except LOAD_ERRORS as error:
        _refuse(directory, f"its common state cannot be read ({error}).", flag)
    if not isinstance(common, dict) or common.get("args") is None:
        _refuse(directory, "the checkpoint carries no training args ('args' in its common "
                           "state).", flag)
    return common["args"]


# (Megatron flag, args name, the one value allowed): settings that change the model's
# function and that DenseArchitecture does not carry. A name missing from older args reads
# as allowed (Megatron-Core 0.19.2's default, where the setting exists there).
UNSUPPORTED_SETTINGS = (
    ("--multi-latent-attention", "multi_latent_attention", False),
    ("--apply-layernorm-1p", "apply_layernorm_1p", False),  # older Megatron's name
    ("--apply-layernorm-1p", "layernorm_zero_centered_gamma", False),
    ("--squared-relu", "squared_relu", False),
    ("--openai-gelu", "openai_gelu", False),
    ("--quick-geglu", "quick_geglu", False),
    ("--glu-linear-offset", "glu_linear_offset", 0.0),
    ("--activation-func-clamp-value", "activation_func_clamp_value", None),
    ("--position-embedding-type", "position_embedding_type", "rope"),
    ("--rotary-percent", "rotary_percent", 1.0),
    ("--rotary-interleaved", "rotary_interleaved", False),
    ("--rotary-seq-len-interpolation-factor", "rotary_seq_len_interpolation_factor", None),
    ("--use-rope-scaling", "use_rope_scaling", False),  # --rope-scaling-factor acts only so
    ("--no-rope-freq", "no_rope_freq", None),
    ("--window-size", "window_size", None),  # --window-attn-skip-freq acts only with it
    ("--apply-residual-connection-post-layernorm",
     "apply_residual_connection_post_layernorm", False),
    ("--qk-l2-norm", "qk_l2_norm", False),
    ("--attention-output-gate", "attention_output_gate", False),
    ("--softmax-type", "softmax_type", "vanilla"),
    ("--experimental-attention-variant", "experimental_attention_variant", None),
    ("--use-mup", "use_mup", False),
    ("--mtp-num-layers", "mtp_num_layers", None),
    ("--hybrid-layer-pattern", "hybrid_layer_pattern", None),
    ("--heterogeneous-layers-config-path", "heterogeneous_layers_config_path", None),
)


def dense_architecture(directory: Path, args) -> DenseArchitecture:
    """DenseArchitecture of a dense Megatron GPT checkpoint's args; other models are refused."""
    if getattr(args, "num_experts", None):
        _refuse(directory, f"already a mixture of experts (--num-experts {args.num_experts}); "
                           "allowed: a dense GPT checkpoint.")
    return gpt_architecture(directory, args)


def refuse_unsupported(directory: Path, args, settings, flag: str = MEGATRON_FLAG) -> None:
    """ValueError naming the first of ``settings`` ((flag, args name, allowed) as in
    UNSUPPORTED_SETTINGS) whose value in ``args`` is not the allowed one."""
    for setting_flag, name, allowed in settings:
        value = getattr(args, name, allowed)
        if value != allowed and not (allowed is None and not value):
            _refuse(directory, f"{setting_flag}={value!r} is not supported; allowed: "
                               f"{allowed!r}.", flag)


def gpt_architecture(directory: Path, args, flag: str = MEGATRON_FLAG) -> DenseArchitecture:
    """DenseArchitecture of a Megatron GPT checkpoint's args, dense or MoE (its attention,
    norms and FFN); settings it does not carry are refused."""
    if getattr(args, "add_bias_linear", False):  # Megatron's default, off by a flag
        _refuse(directory, "linear biases (saved without --disable-bias-linear) are not "
                           "supported; allowed: a checkpoint trained with --disable-bias-linear.",
                flag)
    refuse_unsupported(directory, args, UNSUPPORTED_SETTINGS, flag)
    normalization = getattr(args, "normalization", "LayerNorm")  # Megatron's default
    if normalization not in ("LayerNorm", "RMSNorm"):
        _refuse(directory, f"--normalization={normalization!r}; allowed: 'LayerNorm', "
                           "'RMSNorm'.", flag)
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) \
        else args.num_attention_heads
    return DenseArchitecture(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=groups,
        kv_channels=args.kv_channels or args.hidden_size // args.num_attention_heads,
        vocab_size=args.padded_vocab_size, max_position_embeddings=args.max_position_embeddings,
        rotary_base=args.rotary_base,
        # Megatron's name for --norm-epsilon; the upcycler wrote norm_epsilon until 2026-12-05
        norm_epsilon=getattr(args, "layernorm_epsilon", None) or args.norm_epsilon,
        normalization=normalization, qk_layernorm=bool(args.qk_layernorm),
        gated_linear_unit=bool(args.swiglu), activation="silu" if args.swiglu else "gelu",
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        init_method_std=args.init_method_std, attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
    )


def checkpoint_dtype(args) -> torch.dtype:
    """The dtype the model tensors were saved in."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def sharded_state_dict(model, content_metadata: Optional[Dict] = None):
    """``model``'s sharded state dict as a checkpoint written with ``content_metadata``
    (Megatron's loader reads it from the checkpoint; default: what this package writes)."""
    metadata = dict(content_metadata or CONTENT_METADATA,
                    dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return model.sharded_state_dict(metadata=metadata)


def load_dense(model: torch.nn.Module, directory: Path) -> None:
    """Fill ``model`` (built from the checkpoint's args, TP=PP=1) from the dist checkpoint."""
    try:
        loaded = dist_checkpointing.load({"model": sharded_state_dict(model)}, str(directory))
    except LOAD_ERRORS as error:
        _refuse(directory, f"its tensors cannot be loaded into the dense GPT its args describe "
                           f"({type(error).__name__}: {str(error)[:300]}).")
    model.load_state_dict(loaded["model"], strict=False)


def te_aliases(sharded: Dict, moe_layer_prefixes: Iterable[str]) -> Dict:
    """Extra entries so Transformer Engine's spec finds the MoE layers' pre-MLP norm.

    Megatron's local spec saves every layer's pre-MLP norm as
    ``mlp.linear_fc1.layer_norm_weight``; its TE spec fuses that norm only into a dense
    layer's fc1 and saves an MoE layer's as ``pre_mlp_layernorm.weight``. Saving the MoE
    layers' norm under both keys lets ``--transformer-impl local`` and
    ``transformer_engine`` load the checkpoint (a key a model does not ask for is ignored).
    """
    aliases = {}
    for prefix in moe_layer_prefixes:
        for suffix in ("weight", "bias"):
            entry = sharded.get(f"{prefix}pre_mlp_layernorm.{suffix}")
            if entry is not None:
                aliases[f"{prefix}pre_mlp_layernorm.{suffix}.te_alias"] = \
                    dataclasses.replace(entry, key=te_moe_norm_key(entry.key))
    return aliases


def te_moe_norm_key(key: str) -> str:
    """The checkpoint key Transformer Engine's spec gives an MoE layer's pre-MLP norm, from
    the local spec's key (te_aliases); other keys are returned unchanged."""
    return key.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")


def refuse_existing_output(output: Path, flag: str = OUTPUT_FLAG) -> None:
    """ValueError naming ``flag`` unless ``output`` is a new name in an existing directory: an
    existing path (a dangling link too) is never overwritten, a missing parent never made."""
    if os.path.lexists(output):
        raise ValueError(f"{flag} {output} exists; allowed: a path that does not exist "
                         "(nothing is overwritten).")
    if not output.parent.is_dir():
        raise ValueError(f"{flag} {output}: its parent directory {output.parent} does not "
                         "exist; allowed: a new directory inside an existing one (no parent "
                         "directory is created).")


@contextlib.contextmanager
def cpu_process_groups(seed: int):
    """Megatron's process groups for one CPU process (also where CUDA exists: converting
    checkpoints is host-memory work)."""
    from megatron_null_moe.cpu import (
        cpu_harness,
        destroy_cpu_parallel_state,
        init_cpu_parallel_state,
    )
    from megatron_null_moe.training_hooks import single_process_environment

    single_process_environment()
    with cpu_harness(force=True):
        init_cpu_parallel_state(seed=seed)
        try:
            yield
        finally:
            destroy_cpu_parallel_state()


@contextlib.contextmanager
def staged_outputs(outputs: Sequence[Tuple[str, Path]]) -> Iterator[List[Path]]:
    """A hidden sibling directory for each (flag, output), renamed onto the outputs only when
    the block completes: all or nothing, across several outputs too.

    An exception removes the siblings and any output this block already renamed (a failure
    between two renames); a killed process may leave ``.NAME.partial-PID``, never a partial
    ``NAME``.
    """
    for flag, output in outputs:
        refuse_existing_output(output, flag)
    partials = [output.parent / f".{output.name}.partial-{os.getpid()}" for _, output in outputs]
    renamed = []
    try:
        for partial in partials:
            partial.mkdir()
        yield partials
        for flag, output in outputs:
            refuse_existing_output(output, flag)
        for partial, (_, output) in zip(partials, outputs):
            partial.rename(output)
            renamed.append(output)
    except BaseException:
        for output in renamed:
            shutil.rmtree(output, ignore_errors=True)
        raise
    finally:
        for partial in partials:
            shutil.rmtree(partial, ignore_errors=True)


def save_release_checkpoint(model: torch.nn.Module, args, directory: Path,
                            moe_layer_prefixes: Iterable[str],
                            files: Dict[str, str]) -> None:
    """Save ``model`` as a Megatron release checkpoint in the existing, empty ``directory``
    (a staged_outputs directory), with the text ``files`` (name -> text) beside it."""
    (directory / "release").mkdir()
    sharded = sharded_state_dict(model)
    sharded.update(te_aliases(sharded, moe_layer_prefixes))
    state = {"model": sharded, "args": args, "checkpoint_version": 3.0, "iteration": 0}
    dist_checkpointing.save(state, str(directory / "release"), content_metadata=CONTENT_METADATA)
    (directory / TRACKER).write_text("release")
    for name, text in files.items():
        (directory / name).write_text(text)
