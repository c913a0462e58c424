"""The Hugging Face export against Megatron's own forward, on the CPU.

test_upcycle's tiny random Qwen3 is upcycled (4 experts at granularity 2, top-2, rho 0.5, a
shared expert), trained 20 iterations through the entry point with the budget controller
(so the null selection bias is not 0) by one process on each expert path, by four ranks
(PP=2 x EP=2, lean path) and by eight (TP=2 with sequence parallelism x PP=2 x EP=2, Megatron
path, experts sharded over TP), and exported. transformers loads each export; its logits, greedy
tokens and real experts per token are compared with the Megatron model's (TP=PP=EP=1,
loading the same checkpoint, on the path it was trained on). A model trained from a random
start with sigmoid scores, the per-expert selection bias and node-limited groups (8 experts
in 4 groups, top-4 from 2 groups, rho 0.5, budget controller) is exported and compared the
same way. Checkpoints, exports and models are made on first use and shared by the tests.
"""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.core import dist_checkpointing

from megatron_null_moe import pool_routing
from megatron_null_moe.config import NullExpertConfig
from megatron_null_moe.export.__main__ import build_parser, export
from megatron_null_moe.export.checkpoint import UNSUPPORTED_MOE_SETTINGS, moe_model
from megatron_null_moe.export.huggingface import hugging_face_config, is_plain_qwen3_moe
from megatron_null_moe.upcycle import checkpoint
from megatron_null_moe.upcycle.__main__ import upcycle
from megatron_null_moe.upcycle.architecture import (
    MoEShape,
    build_gpt_model,
    checkpoint_args,
    megatron_flags,
)
from megatron_null_moe.upcycle.convert import UpcycleSettings
from test_upcycle import (
    PAPER_LIKE,
    TINY,
    _megatron_defaults,
    _nothing_written,
    _train,
    arguments,
    logits,
    make_qwen3,
)

ROOT = Path(__file__).resolve().parents[1]
# fp32 on the CPU; measured 2.4e-6 at most (logits up to 3.3).
LOGIT_TOLERANCE = 1e-4
# (entry point flags, processes, expert path) of each training run.
LAYOUTS = {
    "one-process-megatron": ((), 1, "megatron"),
    "one-process-lean": ((), 1, "lean"),
    "pp2-ep2-lean": (("--pipeline-model-parallel-size", "2", "--expert-model-parallel-size",
                      "2", "--distributed-backend", "gloo"), 4, "lean"),
    # The experts sharded over TP too (expert TP = TP 2, Megatron's default); the vocabulary
    # padded to 64 x TP = 128 as one process pads it.
    "tp2sp-pp2-ep2-megatron": (("--tensor-model-parallel-size", "2", "--sequence-parallel",
                                "--pipeline-model-parallel-size", "2",
                                "--expert-model-parallel-size", "2",
                                "--make-vocab-size-divisible-by", "64",
                                "--distributed-backend", "gloo"), 8, "megatron"),
}
TRAINED = [pytest.param(name, marks=[pytest.mark.world_size(LAYOUTS[name][1])]
                        if LAYOUTS[name][1] > 1 else []) for name in LAYOUTS]
PROMPTS = [torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(length))
           for length in (12, 7)]
TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
# config.json's routing options beyond the paper's, written only for a checkpoint using them.
ROUTING_OPTION_KEYS = ("router_score_function", "router_expert_bias", "router_num_groups",
                       "router_group_topk")
# The model trained with them: 8 experts in 4 groups of 2, top-4 from each token's 2 best
# groups, rho 0.5 (M = 8), sigmoid scores, the per-expert bias at a large rate (so that a
# few iterations move it), the budget controller.
ROUTING_OPTIONS_MOE = MoEShape(num_experts=8, expert_ffn_hidden_size=64, topk=4,
                               shared_expert_ffn_hidden_size=0,
                               null_config=NullExpertConfig(real_fraction=0.5),
                               moe_layers=(1, 2))
ROUTING_OPTIONS = ("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                   "--moe-router-bias-update-rate", "1e-2", "--moe-router-num-groups", "4",
                   "--moe-router-group-topk", "2")


def make_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer of the tiny vocabulary ('t0' ... 't127')."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(directory)
    return directory


class Runs:
    """Upcycled and trained checkpoints, their exports and Megatron models, made on first use."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.qwen3 = make_qwen3(directory / "qwen3")
        self.tokenizer = make_tokenizer(directory / "tokenizer")

    @functools.cache
    def upcycled(self, name: str, *settings: str) -> Path:
        output = self.directory / f"upcycled-{name}"
        upcycle(arguments("--hf-model", self.qwen3, "--output", output, *settings))
        return output

    @functools.cache
    def trained(self, layout: str) -> Path:
        flags, processes, path = LAYOUTS[layout]
        run = self.directory / f"trained-{layout}"
        _train(self.upcycled("paper-like", *PAPER_LIKE), run / "ckpt", run / "ckpt", run,
               "--train-iters", "20", "--save-interval", "20", "--moe-null-expert-path", path,
               *flags, nproc=processes)
        return run / "ckpt"

    @functools.cache
    def trained_from_scratch(self, name: str, moe: MoEShape, iterations: int,
                             *flags: str) -> Path:
        """The entry point on TINY's architecture (weights drawn at std 0.1, as the tiny
        Qwen3's) with ``moe``, from a random start, on mock data, one process, budget
        controller on; its checkpoint after ``iterations``."""
        run = self.directory / f"trained-{name}"
        dense = dataclasses.replace(TINY, init_method_std=0.1)
        command = [
            sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *megatron_flags(dense, moe),
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--moe-token-dispatcher-type", "alltoall", "--moe-null-balance-scope", "global",
            "--moe-aux-loss-coeff", "2e-2", "--moe-z-loss-coeff", "1e-3",
            "--moe-null-budget-controller", "--transformer-impl", "local",
            "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-rope-fusion",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0",
            "--eval-interval", "1000", "--seed", "1",
            "--ckpt-format", "torch_dist", "--train-iters", str(iterations),
            "--save-interval", str(iterations), "--save", str(run / "ckpt"), *flags]
        environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                           PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1")
        result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                env=environment)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        return run / "ckpt"

    @functools.cache
    def exported(self, source: Path, *options: str) -> Path:
        output = self.directory / "-".join(["hf", source.parent.name, source.name, *options])
        export(build_parser().parse_args(["--checkpoint", str(source), "--output", str(output),
                                          *options]))
        return output

    @functools.cache
    def megatron(self, source: Path, expert_path: str = "megatron"):
        """The Megatron model of checkpoint ``source`` (TP=PP=EP=1), in eval mode."""
        directory = checkpoint.checkpoint_directory(source)
        model = moe_model(directory, checkpoint.read_args(directory))
        gpt = build_gpt_model(model.dense, model.moe, expert_path=expert_path,
                              router_settings=model.router_settings)
        loaded = dist_checkpointing.load({"model": checkpoint.sharded_state_dict(gpt)},
                                         str(directory))
        gpt.load_state_dict(loaded["model"], strict=False)
        return gpt.eval()


@pytest.fixture(scope="module")
def runs(parallel_state, tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("export"))


def hugging_face(directory: Path, dtype=torch.float32, remote=True):
    """The export loaded by transformers; every tensor it writes is one the model has."""
    from transformers import AutoModelForCausalLM

    model, loading = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=remote, dtype=dtype, output_loading_info=True)
    assert not any(loading.values()), loading  # missing, unexpected, mismatched keys
    return model.eval()


def megatron_routing_maps(model, tokens) -> list:
    """Per MoE layer, [batch, sequence, N] routing map of the Megatron model's forward."""
    from megatron_null_moe.router import NullExpertRouter

    maps = []
    hooks = [module.register_forward_hook(lambda module, inputs, output: maps.append(output[1]))
             for module in model.modules() if isinstance(module, NullExpertRouter)]
    logits(model, tokens)
    for hook in hooks:
        hook.remove()
    batch, length = tokens.shape
    return [routing.view(length, batch, -1).transpose(0, 1) for routing in maps]  # [S*B, N]


def megatron_real_experts(model, tokens) -> list:
    """Per MoE layer, [batch, sequence] real experts per token of the Megatron model's forward."""
    return [routing.sum(dim=-1) for routing in megatron_routing_maps(model, tokens)]


def megatron_greedy(model, prompt: torch.Tensor, steps: int = 20) -> list:
    """Greedy continuation by the Megatron model, the whole sequence each step (no cache)."""
    tokens = prompt[None]
    for _ in range(steps):
        following = logits(model, tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, following.view(1, 1)], dim=1)
    return tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("layout", TRAINED)
def test_export_equals_megatron_model(runs, layout):
    """fp32: logits within 1e-4, greedy 20 tokens equal token for token (KV cache), the same
    real experts per token in every layer; each expert ran on its real tokens only, and a
    token without a real expert got the shared expert alone."""
    source = runs.trained(layout)
    exported = runs.exported(source)
    reference = runs.megatron(source, LAYOUTS[layout][2])
    start = runs.megatron(runs.upcycled("paper-like", *PAPER_LIKE))
    for layer, started in zip(reference.decoder.layers, start.decoder.layers):
        bias = float(layer.mlp.router.null_selection_bias)  # the controller has moved it
        assert abs(bias) > 0.1 and abs(bias - float(started.mlp.router.null_selection_bias)) > 0.01
    config = json.loads((exported / "config.json").read_text())
    assert not set(ROUTING_OPTION_KEYS) & set(config)  # as exported before they existed
    model = hugging_face(exported)
    assert type(model).__name__ == "Qwen3NullMoeForCausalLM"
    assert not any(hasattr(layer.mlp.gate, "expert_bias") for layer in model.model.layers)
    rows = {}
    for index, layer in enumerate(model.model.layers):
        for expert in layer.mlp.experts:
            expert.register_forward_hook(lambda module, inputs, output, index=index:
                                         rows.__setitem__(index, rows.get(index, 0) +
                                                          inputs[0].shape[0]))
    with torch.no_grad():
        output = model(TOKENS, output_real_experts_per_token=True)
    expected = logits(reference, TOKENS)
    assert expected.abs().max() > 1.0
    assert (output.logits - expected).abs().max() < LOGIT_TOLERANCE
    real = output.real_experts_per_token
    for layer, (count, reference_count) in enumerate(
            zip(real, megatron_real_experts(reference, TOKENS))):
        assert torch.equal(count, reference_count), layer
        assert rows[layer] == int(count.sum()) < TOKENS.numel() * 2  # null slots did no work
    assert {0, 1, 2} <= set(torch.cat([count.flatten() for count in real]).tolist())
    for prompt in PROMPTS:
        generated = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt),
                                                                           dtype=torch.long),
                                   max_new_tokens=20, do_sample=False)
        assert generated[0, len(prompt):].tolist() == megatron_greedy(reference, prompt)


def test_token_without_real_expert_gets_the_shared_expert_alone(runs):
    """The null selection bias pushed up: every slot null, no expert runs, the MoE block's
    output is the shared expert's; pushed down: K real experts for every token."""
    model = hugging_face(runs.exported(runs.trained("one-process-megatron")))
    block = model.model.layers[0].mlp
    hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for bias, real in ((1e4, 0), (-1e4, 2)):
            block.gate.null_selection_bias.fill_(bias)
            assert torch.equal(block.gate(hidden)[3], torch.full((10,), real))
        block.gate.null_selection_bias.fill_(1e4)
        for expert in block.experts:
            expert.register_forward_hook(lambda *_: pytest.fail("an expert ran"))
        assert torch.equal(block(hidden), block.shared_expert(hidden))


def test_padded_batches_and_kv_cache_equal_megatron(runs):
    """Right padding: logits at the real positions equal each sequence's alone. Left padding:
    batched greedy generation equals each prompt's. With the KV cache, logits fed in two
    parts equal those of one forward."""
    source = runs.trained("one-process-megatron")
    model, reference = hugging_face(runs.exported(source)), runs.megatron(source)
    short, long = PROMPTS[1], PROMPTS[0]
    batch = torch.zeros(2, len(long), dtype=torch.long)
    mask = torch.zeros(2, len(long), dtype=torch.long)
    batch[0], mask[0] = long, 1
    batch[1, :len(short)], mask[1, :len(short)] = short, 1  # right padding
    with torch.no_grad():
        output = model(batch, attention_mask=mask).logits
    for row, prompt in enumerate((long, short)):
        expected = logits(reference, prompt[None])[0]
        assert (output[row, :len(prompt)] - expected).abs().max() < LOGIT_TOLERANCE
    batch[1], mask[1] = 0, 0
    batch[1, -len(short):], mask[1, -len(short):] = short, 1  # left padding
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
    for row, prompt in enumerate((long, short)):
        assert generated[row, len(long):].tolist() == megatron_greedy(reference, prompt)
    with torch.no_grad():
        whole = model(TOKENS).logits
        first = model(TOKENS[:, :16], use_cache=True)
        rest = model(TOKENS[:, 16:], cache=first.cache, use_cache=True).logits
    assert (torch.cat([first.logits, rest], dim=1) - whole).abs().max() < LOGIT_TOLERANCE


def test_bf16_export_keeps_the_selection_bias_in_fp32(runs):
    """--dtype bf16: every weight bf16 but the null selection bias (fp32 on disk and in the
    loaded model, its value exact). Rounding to bf16 moves a token across the null threshold
    now and then (measured: 1 of 48 tokens here, the same token in Megatron's own bf16
    forward), which changes its output and, through attention, the later tokens'. Where the
    routing is still fp32 Megatron's, the logits are within bf16's rounding (measured: 0.105
    at most, Megatron's own bf16 forward 0.107; mean over all tokens 0.020)."""
    from safetensors import safe_open

    source = runs.trained("one-process-megatron")
    exported, reference = runs.exported(source, "--dtype", "bf16"), runs.megatron(source)
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    (shard,) = exported.glob("*.safetensors")
    with safe_open(str(shard), framework="pt") as tensors:
        dtypes = {name: tensors.get_tensor(name).dtype for name in tensors.keys()}
    assert {d for n, d in dtypes.items() if "null_selection_bias" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "null_selection_bias" in n} == {torch.float32}
    model = hugging_face(exported, dtype=torch.bfloat16)
    maps = []
    for layer, megatron_layer in zip(model.model.layers, reference.decoder.layers):
        bias = layer.mlp.gate.null_selection_bias
        assert bias.dtype == torch.float32
        assert torch.equal(bias, megatron_layer.mlp.router.null_selection_bias)
        layer.mlp.gate.register_forward_hook(lambda module, inputs, output:
                                             maps.append(output[2]))
    cast = hugging_face(runs.exported(source)).bfloat16()  # Module.bfloat16() keeps it too
    for layer, cast_layer in zip(model.model.layers, cast.model.layers):
        assert torch.equal(cast_layer.mlp.gate.null_selection_bias,
                           layer.mlp.gate.null_selection_bias)
    with torch.no_grad():
        output = model(TOKENS).logits.float()
    difference = (output - logits(reference, TOKENS)).abs()
    assert difference.mean() < 0.05
    difference = difference.amax(dim=-1)  # [B, S]
    batch, length = TOKENS.shape
    reference_maps = megatron_routing_maps(reference, TOKENS)
    same = torch.stack([(ours.view(batch, length, -1) == theirs).all(dim=-1)
                        for ours, theirs in zip(maps, reference_maps)]).all(dim=0)
    for row in range(batch):
        routed_alike = int(same[row].long().cumprod(dim=0).sum())  # up to the first change
        assert routed_alike >= length // 3
        assert difference[row, :routed_alike].max() < 0.25


def test_rho_one_without_shared_expert_is_a_plain_qwen3_moe(runs):
    """Exported straight from the upcycler: model_type qwen3_moe, no code written, loaded by
    transformers' own Qwen3MoeForCausalLM (no trust_remote_code); logits equal Megatron's."""
    from transformers import Qwen3MoeForCausalLM

    source = runs.upcycled("rho-one", "--num-experts", "4", "--granularity", "2",
                           "--moe-router-topk", "2", "--router-init", "independent")
    exported = runs.exported(source)
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["norm_topk_prob"]) == ("qwen3_moe", True)
    assert not list(exported.glob("*.py"))
    model = hugging_face(exported, remote=False)
    assert type(model) is Qwen3MoeForCausalLM
    with torch.no_grad():
        output = model(TOKENS).logits
    assert (output - logits(runs.megatron(source), TOKENS)).abs().max() < LOGIT_TOLERANCE


def test_dense_layers_stay_qwen3_mlps(runs):
    """--moe-layers 2 (layer 1 dense, checkpoint keyed layer by layer): Qwen3's MLP names in
    layer 0, mlp_only_layers [0], one MoE layer's real experts; logits equal Megatron's."""
    source = runs.upcycled("moe-layer-2", *PAPER_LIKE, "--moe-layers", "2")
    exported = runs.exported(source)
    assert json.loads((exported / "config.json").read_text())["mlp_only_layers"] == [0]
    names = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n for n in names if n.startswith("model.layers.0.mlp.")} == {
        f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    model = hugging_face(exported)
    with torch.no_grad():
        output = model(TOKENS, output_real_experts_per_token=True)
    assert len(output.real_experts_per_token) == 1
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(exported, trust_remote_code=True)).__name__ == \
        "Qwen3NullMoeModel"
    reference = runs.megatron(source)
    assert (output.logits - logits(reference, TOKENS)).abs().max() < LOGIT_TOLERANCE
    assert torch.equal(output.real_experts_per_token[0],
                       megatron_real_experts(reference, TOKENS)[0])


def test_round_trip_loads_and_generates_without_megatron(runs, tmp_path):
    """transformers Qwen3 -> upcycle -> train -> export (the command line) -> transformers,
    in a process where Megatron and this package cannot be imported: its logits equal the
    Megatron model's, and the example generates what the Megatron model generates and
    prints the real experts it spent."""
    source = runs.trained("one-process-megatron")
    output = tmp_path / "exported"
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "megatron_null_moe.export", "--checkpoint", str(source),
         "--output", str(output), "--tokenizer", str(runs.tokenizer)],
        capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"exported .*iter_0000020 -> .* \(qwen3_null_moe, float32, 55 tensors",
                     result.stdout), result.stdout
    assert (output / "pool_routing.py").read_text() == Path(pool_routing.__file__).read_text()
    prompt = PROMPTS[0]
    torch.save(TOKENS, tmp_path / "tokens.pt")
    script = ("import runpy, sys, torch; "
              "sys.modules.update(megatron=None, megatron_null_moe=None); "
              "from transformers import AutoModelForCausalLM; "
              f"model = AutoModelForCausalLM.from_pretrained({str(output)!r}, "
              "trust_remote_code=True); "
              "torch.save(model(torch.load('tokens.pt')).logits, 'logits.pt'); "
              f"sys.argv = ['generate', {str(output)!r}, '--prompt', "
              f"{' '.join(f't{t}' for t in prompt.tolist())!r}]; "
              f"runpy.run_path({str(ROOT / 'examples' / 'generate_from_export.py')!r}, "
              "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path,
                            env=dict(environment, PYTHONPATH="", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr  # no question asked
    expected = logits(runs.megatron(source), TOKENS)
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() < LOGIT_TOLERANCE
    generated = re.search(r"generated token ids: \[(.*)\]", result.stdout).group(1)
    assert [int(t) for t in generated.split(",")] == megatron_greedy(runs.megatron(source),
                                                                      prompt)
    assert re.search(r"mean real experts per token: [0-9.]+ of K = 2", result.stdout)
    listed = re.findall(r"^ +\d+ (prompt|generated) +token", result.stdout, re.MULTILINE)
    assert listed == ["prompt"] * len(prompt) + ["generated"] * 19


def test_refusals_name_the_problem_and_write_nothing(runs, tmp_path):
    from megatron_null_moe.upcycle.architecture import DenseArchitecture

    output = tmp_path / "out"

    def refused(match, *argv):
        with pytest.raises(ValueError, match=match):
            export(build_parser().parse_args([*map(str, argv), "--output", str(output)]))
        assert _nothing_written(output)

    trained = runs.trained("one-process-megatron")
    refused(r"--checkpoint .*ckpt: no iteration 7 \(no iter_0000007\); allowed: 20\.",
            "--checkpoint", trained, "--iteration", "7")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(r"not a Megatron torch_dist checkpoint \(no metadata.json\)", "--checkpoint", empty)
    (empty / checkpoint.TRACKER).write_text("latest")
    refused(r"latest_checkpointed_iteration.txt reads 'latest'; allowed: an iteration or "
            r"'release'", "--checkpoint", empty)
    refused(r"--tokenizer .*empty: no tokenizer files; allowed: a directory with any of "
            r"tokenizer.json", "--checkpoint", trained, "--tokenizer", empty)
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match=r"--output .*existing exists"):
        export(build_parser().parse_args(["--checkpoint", str(trained), "--output",
                                          str(existing)]))
    assert not list(existing.iterdir())

    upcycled = runs.upcycled("paper-like", *PAPER_LIKE)
    dense = DenseArchitecture(**json.loads((upcycled / "upcycle.json").read_text())["dense"])
    moe = UpcycleSettings(num_experts=4, granularity=2, topk=2,
                          real_fraction=0.5).moe_shape(dense)
    skeleton = build_gpt_model(dense, moe)  # never filled: the refusals come first
    without_args = tmp_path / "without_args"
    (without_args / "release").mkdir(parents=True)
    (without_args / checkpoint.TRACKER).write_text("release")
    dist_checkpointing.save({"model": checkpoint.sharded_state_dict(skeleton)},
                            str(without_args / "release"),
                            content_metadata=checkpoint.CONTENT_METADATA)
    refused(r"the checkpoint carries no training args", "--checkpoint", without_args)
    mla_args = checkpoint_args(dense, moe)
    mla_args.multi_latent_attention = True
    with checkpoint.staged_outputs([("--output", tmp_path / "mla")]) as (directory,):
        checkpoint.save_release_checkpoint(skeleton, mla_args, directory, [], {})
    refused(r"--multi-latent-attention=True is not supported; allowed: False",
            "--checkpoint", tmp_path / "mla")

    truncated = tmp_path / "truncated"
    (truncated / "release").mkdir(parents=True)
    for path in (upcycled / "release").iterdir():
        content = path.read_bytes()
        (truncated / "release" / path.name).write_bytes(
            content[: len(content) // 2] if path.suffix == ".distcp" else content)
    (truncated / checkpoint.TRACKER).write_text("release")
    refused(r"--checkpoint .*release: its tensors cannot be read", "--checkpoint", truncated)
    narrower = checkpoint_args(dense, moe)
    narrower.moe_ffn_hidden_size = 32  # the tensors are 64 wide
    with checkpoint.staged_outputs([("--output", tmp_path / "narrower")]) as (directory,):
        checkpoint.save_release_checkpoint(skeleton, narrower, directory, [], {})
    refused(r"tensor 'decoder.layers.mlp.experts.experts.linear_fc1.weight' has shape "
            r"\(2, 4, 128, 64\); the model its args describe needs \(2, 4, 64, 64\)",
            "--checkpoint", tmp_path / "narrower")


TINY_MOE = MoEShape(num_experts=4, expert_ffn_hidden_size=64, topk=2,
                    shared_expert_ffn_hidden_size=0,
                    null_config=UpcycleSettings(num_experts=4).moe_shape(TINY).null_config,
                    moe_layers=(1, 2))


@pytest.mark.parametrize("name,value,match", [
    *[(name, value, rf"{flag}={value!r} is not supported; allowed: {allowed!r}")
      for (flag, name, allowed), value in zip(UNSUPPORTED_MOE_SETTINGS, (
          True, 1.25, True, True, 32))],
    ("moe_router_score_function", "sqrtsoftplus",
     r"--moe-router-score-function='sqrtsoftplus' is not supported; allowed: 'softmax', "
     r"'sigmoid'\."),
    ("moe_null_expert_bias_rate", 0.0, r"--moe-router-bias-update-rate=0.0 with "
                                       r"--moe-router-enable-expert-bias; allowed: a positive "
                                       r"rate\."),
    ("normalization", "LayerNorm", r"--normalization='LayerNorm': the export writes Qwen3-MoE "
                                   r"layers; allowed: 'RMSNorm'"),
    ("qk_layernorm", False, r"--qk-layernorm=False: .* allowed: True"),
    ("swiglu", False, r"--swiglu=False: .* allowed: True"),
    ("add_qkv_bias", True, r"--add-qkv-bias=True: .* allowed: False"),
    ("position_embedding_type", "learned_absolute",
     r"--position-embedding-type='learned_absolute' is not supported; allowed: 'rope'"),
    ("add_bias_linear", True, r"linear biases \(saved without --disable-bias-linear\)"),
    ("moe_router_load_balancing_type", "sinkhorn",
     r"--moe-router-load-balancing-type='sinkhorn' routes by sigmoid scores at inference; "
     r"allowed: 'aux_loss'"),
    ("num_experts", None, r"not a mixture of experts \(no --num-experts\)"),
    ("moe_layer_freq", [1], r"--moe-layer-freq=\[1\] does not describe 2 layers"),
])
def test_architectures_the_export_cannot_express_are_refused(name, value, match):
    """Each setting's message names Megatron's flag and what is allowed; Megatron's default
    (checked against its parser) passes."""
    args = checkpoint_args(TINY, TINY_MOE)
    defaults = _megatron_defaults()
    for flag, setting, allowed in UNSUPPORTED_MOE_SETTINGS:
        assert defaults[setting] == ([flag], allowed)
        setattr(args, setting, allowed)
    moe_model(Path("ckpt"), args)
    setattr(args, name, value)
    with pytest.raises(ValueError, match=rf"--checkpoint ckpt: {match}"):
        moe_model(Path("ckpt"), args)


def test_layout_map_inverts_the_upcycler_map(runs):
    """Hugging Face Qwen3 -> Megatron names (the upcycler's map) -> Hugging Face names (the
    export's): every tensor comes back under its own name, unchanged."""
    from megatron_null_moe.upcycle.huggingface import (
        SafetensorsReader,
        hugging_face_tensors,
        megatron_tensors,
        qwen3_architecture,
        read_config,
    )

    reader = SafetensorsReader(runs.qwen3)
    dense = qwen3_architecture(runs.qwen3, read_config(runs.qwen3))
    back = {name: tensor for megatron_name, megatron_tensor in megatron_tensors(reader, dense)
            for name, tensor in hugging_face_tensors(megatron_name, megatron_tensor, dense)}
    assert sorted(back) == sorted(reader._where)
    for name, tensor in back.items():
        assert torch.equal(tensor, reader[name]), name


def test_checkpoint_keyed_by_transformer_engine_is_read(runs):
    """An MoE layer's pre-MLP norm under Transformer Engine's key (a checkpoint saved on TE
    layers) is read where the local spec's key is missing; a tensor under neither key is
    refused, naming it."""
    from megatron_null_moe.export.checkpoint import _checkpoint_entry

    source = checkpoint.checkpoint_directory(runs.trained("one-process-megatron"))
    model = moe_model(source, checkpoint.read_args(source))
    sharded = checkpoint.sharded_state_dict(build_gpt_model(model.dense, model.moe))
    entry = sharded["decoder.layers.0.pre_mlp_layernorm.weight"]
    assert entry.key == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    te_key = "decoder.layers.pre_mlp_layernorm.weight"
    assert _checkpoint_entry(source, entry, {te_key: None}).key == te_key
    with pytest.raises(ValueError, match=r"tensor 'decoder.layers.mlp.linear_fc1."
                                         r"layer_norm_weight' is missing"):
        _checkpoint_entry(source, entry, {})


def test_norm_epsilon_is_read_under_megatron_name_and_the_upcycler_old_one():
    """Megatron's args call --norm-epsilon layernorm_epsilon (what training checkpoints
    carry); upcycler checkpoints written before 2026-12-05 call it norm_epsilon."""
    from megatron_null_moe.upcycle.checkpoint import gpt_architecture

    args = checkpoint_args(TINY, TINY_MOE)
    assert _megatron_defaults()["layernorm_epsilon"][0] == ["--norm-epsilon"]
    assert gpt_architecture(Path("ckpt"), args).norm_epsilon == TINY.norm_epsilon
    args.norm_epsilon = args.layernorm_epsilon
    del args.layernorm_epsilon
    assert gpt_architecture(Path("ckpt"), args).norm_epsilon == TINY.norm_epsilon


def test_the_quickstart_model_trains_on_the_cpu_and_exports(runs, tmp_path):
    """examples/pretrain_1gpu_quickstart.sh's model (fp32, local layers, smaller batches and
    sequences): two steps through the entry point on the CPU; its checkpoint exports, and the
    export's logits equal the Megatron model's."""
    script = ROOT / "examples" / "pretrain_1gpu_quickstart.sh"
    checkpoint_dir = tmp_path / "ckpt"
    environment = dict(os.environ, DRY_RUN="1", DTYPE="fp32", TRANSFORMER_IMPL="local",
                       VOCAB_SIZE="1024", CHECKPOINT_DIR=str(checkpoint_dir),
                       TENSORBOARD_DIR=str(tmp_path / "tb"))
    arguments = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                               check=True, env=environment).stdout.split("\n")[:-1]
    cpu_sized = ["--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--seq-length", "128", "--max-position-embeddings", "128",
                 "--lr-warmup-iters", "0", "--log-interval", "1", "--eval-iters", "0",
                 "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
                 "--no-rope-fusion"]  # the fusions need apex / Transformer Engine
    command = [sys.executable, "-m", "megatron_null_moe.pretrain_gpt", *arguments, *cpu_sized]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "iteration        2/       2" in output and "null real fraction" in output
    assert "null expected real experts/token: 2.000000E+00" in output  # rho 0.5 * top-4
    model = hugging_face(runs.exported(checkpoint_dir))
    with torch.no_grad():
        exported = model(TOKENS).logits
    expected = logits(runs.megatron(checkpoint_dir), TOKENS)
    assert expected.abs().max() > 0.1
    assert (exported - expected).abs().max() < LOGIT_TOLERANCE


def test_sigmoid_expert_bias_and_groups_export_equal_megatron(runs):
    """Trained 6 iterations with sigmoid scores, the per-expert bias (rate 1e-2) and groups
    (4 of 2 experts, top-4 from 2), rho 0.5 and the budget controller: config.json carries
    the options, each router its per-expert bias (moved from 0, fp32, equal to Megatron's);
    fp32 logits within 1e-4 of Megatron's and the same routing map in every layer. The bias
    changes which experts some tokens take, every token's real experts lie in its 2 groups,
    and a bf16 export and load keep the bias in fp32."""
    from safetensors import safe_open

    source = runs.trained_from_scratch("routing-options", ROUTING_OPTIONS_MOE, 6,
                                       *ROUTING_OPTIONS)
    exported = runs.exported(source)
    config = json.loads((exported / "config.json").read_text())
    assert {key: config[key] for key in ("num_null_experts", *ROUTING_OPTION_KEYS)} == {
        "num_null_experts": 8, "router_score_function": "sigmoid", "router_expert_bias": True,
        "router_num_groups": 4, "router_group_topk": 2}
    reference = runs.megatron(source)
    model = hugging_face(exported)
    gates = [layer.mlp.gate for layer in model.model.layers]
    for gate, megatron_layer in zip(gates, reference.decoder.layers):
        router = megatron_layer.mlp.router
        assert router.score_function == "sigmoid" and router.config.moe_router_group_topk == 2
        assert router.expert_bias.abs().max() > 0.02  # moved from 0 by the updates
        assert float(router.null_selection_bias) != 0.0  # and the controller's bias
        assert gate.expert_bias.dtype == torch.float32
        assert torch.equal(gate.expert_bias, router.expert_bias)
        assert torch.equal(gate.null_selection_bias, router.null_selection_bias)
    captured = []
    for gate in gates:
        gate.register_forward_hook(lambda module, inputs, output:
                                   captured.append((module, inputs[0], output[2])))
    with torch.no_grad():
        output = model(TOKENS)
    expected = logits(reference, TOKENS)
    assert expected.abs().max() > 1.0
    assert (output.logits - expected).abs().max() < LOGIT_TOLERANCE
    batch, length = TOKENS.shape
    moved = 0
    for (gate, hidden, routing_map), reference_map in zip(
            captured, megatron_routing_maps(reference, TOKENS)):
        assert torch.equal(routing_map.view(batch, length, -1), reference_map)
        assert (routing_map.view(-1, 4, 2).any(dim=-1).sum(dim=-1) <= 2).all()  # its 2 groups
        with torch.no_grad():
            pool_logits = torch.nn.functional.linear(
                hidden.reshape(-1, 64), torch.cat([gate.weight, gate.null_weight]))
        _, without_bias, _ = pool_routing.route_with_null_experts(
            pool_logits[:, :8], pool_logits[:, 8], 8, 4,
            null_selection_bias=gate.null_selection_bias, score_function="sigmoid",
            num_groups=4, group_topk=2)
        moved += int((without_bias != routing_map).any(dim=-1).sum())
    assert moved > 0  # the per-expert bias changed some tokens' experts
    for layer in hugging_face(exported).bfloat16().model.layers:  # Module.bfloat16() too
        assert layer.mlp.gate.expert_bias.dtype == torch.float32
    bf16 = runs.exported(source, "--dtype", "bf16")
    (shard,) = bf16.glob("*.safetensors")
    with safe_open(str(shard), framework="pt") as tensors:
        biases = {name: tensors.get_tensor(name) for name in tensors.keys()
                  if name.endswith("expert_bias")}
    assert len(biases) == 2 and {bias.dtype for bias in biases.values()} == {torch.float32}
    for layer, megatron_layer in zip(hugging_face(bf16, dtype=torch.bfloat16).model.layers,
                                     reference.decoder.layers):
        assert layer.mlp.gate.expert_bias.dtype == torch.float32
        assert torch.equal(layer.mlp.gate.expert_bias, megatron_layer.mlp.router.expert_bias)


@pytest.mark.parametrize("bias_args", [
    dict(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3),  # Megatron's
    dict(moe_router_enable_expert_bias=False, moe_null_expert_bias_rate=1e-2),  # the plugin's
])
def test_megatron_sigmoid_router_without_null_experts_exports_with_its_options(bias_args):
    """rho = 1, sigmoid scores with the per-expert bias (Megatron's own flag or the plugin's
    rate) and groups: not a plain Qwen3-MoE, whose router is softmax; the options are in
    config.json. --moe-router-num-groups without --moe-router-group-topk routes as no groups
    (as in Megatron)."""
    moe = dataclasses.replace(TINY_MOE, null_config=NullExpertConfig())
    args = checkpoint_args(TINY, moe)
    vars(args).update(moe_router_score_function="sigmoid", moe_router_num_groups=2,
                      moe_router_group_topk=1, **bias_args)
    model = moe_model(Path("ckpt"), args)
    assert (model.num_null_copies, model.expert_bias) == (0, True)
    assert not is_plain_qwen3_moe(model)
    config = hugging_face_config(model, torch.float32)
    assert config["model_type"] == "qwen3_null_moe" and config["num_null_experts"] == 0
    assert {key: config[key] for key in ROUTING_OPTION_KEYS} == {
        "router_score_function": "sigmoid", "router_expert_bias": True,
        "router_num_groups": 2, "router_group_topk": 1}
    args.moe_router_group_topk = None
    model = moe_model(Path("ckpt"), args)
    assert model.num_groups is None
    assert "router_num_groups" not in hugging_face_config(model, torch.float32)


@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_router_without_null_copies_routes_as_megatron_sigmoid_with_expert_bias(groups):
    """The exported router at M = 0 with sigmoid scores and a per-expert bias (and groups)
    selects and weights as Megatron's own top-K with score function; its configuration
    refuses what it cannot compute, naming the setting and what is allowed."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from megatron_null_moe.export.remote_code.configuration_qwen3_null_moe import (
        Qwen3NullMoeConfig,
    )
    from megatron_null_moe.export.remote_code.modeling_qwen3_null_moe import (
        Qwen3NullMoeRouter,
    )

    num_groups, group_topk = groups or (None, None)
    config = Qwen3NullMoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=4,
                                router_score_function="sigmoid", router_expert_bias=True,
                                router_num_groups=num_groups, router_group_topk=group_topk)
    router = Qwen3NullMoeRouter(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16, generator=generator))
        router.expert_bias.copy_(0.2 * torch.randn(8, generator=generator))
    hidden = torch.randn(64, 16, generator=generator)
    with torch.no_grad():
        router_logits, probs, routing_map, real = router(hidden)
    expected_probs, expected_map = topk_routing_with_score_function(
        router_logits, 4, num_groups=num_groups, group_topk=group_topk,
        score_function="sigmoid", expert_bias=router.expert_bias)
    assert torch.equal(routing_map, expected_map) and torch.equal(real, torch.full((64,), 4))
    torch.testing.assert_close(probs, expected_probs, rtol=1e-6, atol=1e-7)
    unbiased_map = topk_routing_with_score_function(
        router_logits, 4, num_groups=num_groups, group_topk=group_topk,
        score_function="sigmoid")[1]
    assert not torch.equal(routing_map, unbiased_map)  # the bias takes part in the choice
    router.bfloat16()
    assert router.expert_bias.dtype == torch.float32
    for settings, match in ((dict(router_score_function="sqrtsoftplus"),
                             r"router_score_function 'sqrtsoftplus': allowed: 'softmax', "
                             r"'sigmoid'"),
                            (dict(router_num_groups=3, router_group_topk=1),
                             r"router_num_groups 3 and router_group_topk 1: allowed: both "
                             r"None, or num_groups dividing num_experts 8"),
                            (dict(router_num_groups=4),
                             r"router_num_groups 4 and router_group_topk None")):
        with pytest.raises(ValueError, match=match):
            Qwen3NullMoeConfig(num_experts=8, **settings)
