"""patches/: the Megatron-LM pretrain_gpt.py patch is a well-formed diff of that one file,
and every plugin name it imports exists.

With MEGATRON_LM_REPO set to a Megatron-LM clone (bare or not), the patch is also applied to
its core_v0.19.0, the result compiled, its --help printed, and the patched script trains on
the CPU with the null statistics and the budget controller in Megatron's log line and
TensorBoard; nothing in that clone is changed.
"""

import functools
import importlib
import inspect
import os
import re
import subprocess
from pathlib import Path

import pytest

from megatron_null_moe.process_groups import free_port

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.19.0-null-experts.patch"
TARGET = "pretrain_gpt.py"
MEGATRON_LM_TAG = "core_v0.19.0"
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_unified_diff(text: str):
    """{path: [(old_start, old_lines, new_start, new_lines, body)]}; AssertionError if malformed."""
    files, lines, index = {}, text.splitlines(), 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("diff --git "):
            assert line.startswith(("index ", "new file", "deleted file", "similarity", "old mode",
                                    "new mode")) or not line, f"line {index + 1}: {line!r}"
            index += 1
            continue
        match = re.fullmatch(r"diff --git a/(\S+) b/(\S+)", line)
        assert match and match[1] == match[2], f"line {index + 1}: {line!r}"
        path = match[1]
        index += 1
        while index < len(lines) and not lines[index].startswith("--- "):
            assert lines[index].startswith(("index ", "old mode", "new mode")), lines[index]
            index += 1
        assert lines[index] == f"--- a/{path}" and lines[index + 1] == f"+++ b/{path}", path
        index += 2
        hunks = files.setdefault(path, [])
        while index < len(lines) and lines[index].startswith("@@"):
            header = HUNK.match(lines[index])
            assert header, f"line {index + 1}: bad hunk header {lines[index]!r}"
            old_start, new_start = int(header[1]), int(header[3])
            old_count = int(header[2]) if header[2] is not None else 1
            new_count = int(header[4]) if header[4] is not None else 1
            index += 1
            body, old_seen, new_seen = [], 0, 0
            while (old_seen < old_count or new_seen < new_count) and index < len(lines):
                body_line = lines[index]
                if body_line.startswith("\\"):  # "\ No newline at end of file"
                    index += 1
                    continue
                kind = body_line[:1] or " "
                assert kind in " +-", f"line {index + 1}: {body_line!r} in a hunk"
                old_seen += kind in " -"
                new_seen += kind in " +"
                body.append(body_line)
                index += 1
            assert (old_seen, new_seen) == (old_count, new_count), \
                f"{path} hunk at -{old_start}: counts {old_seen},{new_seen} != header"
            hunks.append((old_start, old_count, new_start, new_count, body))
        assert hunks, f"{path}: no hunks"
    return files


@pytest.fixture(scope="module")
def patch_text() -> str:
    return PATCH.read_text()


@pytest.fixture(scope="module")
def added_lines(patch_text):
    hunks = parse_unified_diff(patch_text)[TARGET]
    return [line[1:] for *_, body in hunks for line in body if line.startswith("+")]


def test_patch_is_a_git_diff_of_pretrain_gpt_only(patch_text):
    assert patch_text.startswith(f"diff --git a/{TARGET} b/{TARGET}\n")
    files = parse_unified_diff(patch_text)
    assert list(files) == [TARGET]
    # Hunks in order, not overlapping, and the new-file offsets follow from the old ones.
    shift, previous_end = 0, 0
    for old_start, old_count, new_start, new_count, _ in files[TARGET]:
        assert old_start > previous_end and new_start == old_start + shift
        previous_end, shift = old_start + old_count, shift + new_count - old_count


@pytest.mark.parametrize("text, problem", [
    ("diff --git a/x.py b/y.py\n--- a/x.py\n+++ b/y.py\n@@ -1 +1 @@\n-a\n+b\n", "a/b paths"),
    ("diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n-a\n+b\n", "counts"),
    ("diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n*a\n", "bad line"),
    ("diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n", "no hunks"),
])
def test_malformed_diffs_are_refused(text, problem):
    with pytest.raises((AssertionError, IndexError)):
        parse_unified_diff(text)


def test_patch_registers_flags_hooks_and_layer_spec(added_lines):
    added = "\n".join(added_lines)
    for name in ("add_null_expert_args", "null_expert_training", "apply_null_expert_spec"):
        assert re.search(rf"\b{name}\b", added), name
    # The plugin's flags chained after ModelOpt's provider, which stays.
    assert "add_modelopt_args(parser)" in added and "add_null_expert_args(parser)" in added
    # The loop's hooks (statistics, controller, FLOPs) around parsing and pretrain.
    assert re.search(r"with null_expert_training\(\) as null_moe:", added)
    assert "null_config = null_moe.configure(args)" in added
    assert re.search(r"apply_null_expert_spec\(model_cfg, null_config, custom_spec=", added)
    assert "expert_path=null_expert_path_from_args(args)" in added
    assert not any("\t" in line for line in added_lines), "Megatron-LM indents with spaces"


def test_names_the_patch_imports_exist_in_the_package(added_lines):
    imported = [re.fullmatch(r"from (megatron_null_moe[\w.]*) import (.+)", line.strip())
                for line in added_lines if line.startswith("from megatron_null_moe")]
    assert imported and all(imported)
    names = set()
    for match in imported:
        module = importlib.import_module(match[1])
        for name in (part.strip() for part in match[2].split(",")):
            assert hasattr(module, name), f"{match[1]} has no {name}"
            names.add(name)
    assert {"add_null_expert_args", "null_expert_training", "apply_null_expert_spec"} <= names


def test_layer_spec_partial_fits_megatrons_builder_call():
    """Megatron calls transformer_layer_spec(config, vp_stage=...) when the callable takes it."""
    from megatron_null_moe.config import NullExpertConfig
    from megatron_null_moe.pretrain_gpt import null_expert_layer_spec

    spec = functools.partial(null_expert_layer_spec, null_config=NullExpertConfig(0.5))
    parameters = inspect.signature(spec).parameters
    assert "vp_stage" in parameters
    inspect.signature(spec).bind(object(), vp_stage=None)


def _megatron_lm_git_dir():
    repo = os.environ.get("MEGATRON_LM_REPO")
    if not repo:
        pytest.skip("set MEGATRON_LM_REPO to a Megatron-LM clone to apply the patch to it")
    found = subprocess.run(["git", "-C", repo, "rev-parse", "--absolute-git-dir"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"MEGATRON_LM_REPO={repo} is not a git repository: {found.stderr}")
    return found.stdout.strip()


def test_patch_applies_to_megatron_lm_core_v0_19_0(tmp_path):
    git_dir = _megatron_lm_git_dir()
    git = ["git", "--git-dir", git_dir]
    # A private index: the clone's own index, work tree and HEAD stay untouched.
    env = dict(os.environ, GIT_INDEX_FILE=str(tmp_path / "index"))
    subprocess.run([*git, "read-tree", MEGATRON_LM_TAG], env=env, check=True)
    checked = subprocess.run([*git, "apply", "--cached", "--check", str(PATCH)], env=env,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    patched = (_patched_scripts(git_dir, tmp_path) / TARGET).read_text()
    compile(patched, TARGET, "exec")
    assert patched.count("add_null_expert_args") >= 2 and "null_expert_training" in patched


def _patched_scripts(git_dir: str, directory: Path) -> Path:
    """The tag's pretrain_gpt.py (patched) and the two repository files it imports, in
    ``directory``/tree; Megatron itself comes from the installed megatron-core wheel."""
    work = directory / "tree"
    work.mkdir(exist_ok=True)
    for name in (TARGET, "gpt_builders.py", "model_provider.py"):
        original = subprocess.run(["git", "--git-dir", git_dir, "show",
                                   f"{MEGATRON_LM_TAG}:{name}"],
                                  check=True, capture_output=True, text=True).stdout
        (work / name).write_text(original)
    applied = subprocess.run(["git", "apply", str(PATCH)], cwd=work, capture_output=True,
                             text=True, env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(directory)))
    assert applied.returncode == 0, applied.stderr
    return work


def test_patched_script_prints_help_and_trains_with_null_statistics_on_the_cpu(tmp_path):
    """Megatron-LM's own script with the patch, on the CPU (the plugin's harness, gloo), 4
    iterations with the budget controller: its log line and TensorBoard get the null
    statistics, the same as the entry point's."""
    import sys

    from test_pretrain import TINY_GPT, scalars

    work = _patched_scripts(_megatron_lm_git_dir(), tmp_path)
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONWARNINGS="ignore")
    shown = subprocess.run([sys.executable, TARGET, "--help"], cwd=work, capture_output=True,
                           text=True, timeout=300, env=dict(environment, RANK="0"))
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--moe-null-budget-controller" in shown.stdout
    assert "--moe-null-lean-buffer" in shown.stdout
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(free_port()), TARGET, *TINY_GPT, "--train-iters", "4",
               "--moe-null-budget-controller", "--tensorboard-dir", str(tmp_path / "tb")]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                            env=environment)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "running on the CPU through the CPU harness" in output
    assert "; dispatcher alltoall (chosen for null experts" in output  # none given
    for key in ("null real fraction", "null expected real experts/token", "null budget bias",
                "null worst layer real fraction error"):
        assert key in output, key
    logged = scalars(tmp_path)
    for tag in ("null real fraction", "null_moe/real_fraction_layer_01",
                "null_moe/budget_bias_layer_02"):
        assert sorted(logged[tag]) == [1, 2, 3, 4], tag


def test_patched_script_trains_with_virtual_pipeline_stages(tmp_path):
    """PP2 with 2 virtual stages x EP2 on 4 gloo ranks: Megatron-LM's own get_batch gives the
    chunks of the middle virtual stages (which get no data iterator) no batch, so the patched
    script trains; each layer's statistics reach TensorBoard (the model of test_layouts)."""
    import sys

    from test_layouts import LAYERS, MODEL
    from test_pretrain import scalars

    work = _patched_scripts(_megatron_lm_git_dir(), tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               "--master-port", str(free_port()), TARGET, *MODEL,
               "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
               "1", "--expert-model-parallel-size", "2", "--tensorboard-dir",
               str(tmp_path / "tb")]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                                     PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    logged = scalars(tmp_path)
    for layer in LAYERS:
        assert sorted(logged[f"null_moe/real_fraction_layer_{layer}"]) == [1, 2, 3, 4, 5]
