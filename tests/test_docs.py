"""The documentation cannot rot silently: every relative link resolves (anchors included) and
every command block names modules, scripts and files that exist."""

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                *(ROOT / folder / "README.md" for folder in ("patches", "docker"))])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Files a command names that live elsewhere: Megatron-LM's checkout (the patch page) and
# placeholders the reader fills in.
ELSEWHERE = {"pretrain_gpt.py", "gpt_builders.py", "model_provider.py"}
GPU_IMAGE_ONLY = {"transformer_engine"}  # NVIDIA's PyTorch container has it, CPU machines not
IN_IMAGE = "/opt/megatron-null-moe/"  # where docker/Dockerfile puts this repository


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = FENCE.sub("", page.read_text())
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_there_are_pages_and_the_readme_is_short():
    assert len(PAGES) > 5
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{_page_id(page)}: link to {target} does not resolve"
        if anchor:
            assert resolved.suffix == ".md" and anchor in _anchors(resolved), \
                f"{_page_id(page)}: no heading #{anchor} in {path or 'this page'}"


def _commands(block: str):
    """The block's commands, continuation lines joined, comments dropped."""
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield line


def _named(command: str):
    """('module', name) and ('file', path) for what a shell command names."""
    words = shlex.split(command)
    for index, word in enumerate(words):
        if word == "-m" and index + 1 < len(words):
            yield "module", words[index + 1]
        elif word == "-c" and index + 1 < len(words):  # python -c "import a, b; ..."
            for imports in re.findall(r"import ([\w., ]+)", words[index + 1]):
                yield from (("module", name.strip()) for name in imports.split(","))
        elif re.search(r"\.(py|sh|patch)$", word) or word.startswith(("docker/", "examples/")):
            yield "file", word.split("=")[-1]


def _exists(kind: str, name: str) -> bool:
    if kind == "module":
        return name in GPU_IMAGE_ONLY or importlib.util.find_spec(name) is not None
    if name.startswith(IN_IMAGE):
        name = name[len(IN_IMAGE):]
    if "/path/to/" in name or Path(name).name in ELSEWHERE:
        return True
    return (ROOT / name).exists()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_command_block_names_what_exists(page):
    for language, block in FENCE.findall(page.read_text()):
        if language == "bash":
            named = [thing for command in _commands(block) for thing in _named(command)]
            assert named, f"{_page_id(page)}: a command block names no module or script:\n{block}"
            for kind, name in named:
                assert _exists(kind, name), f"{_page_id(page)}: {kind} {name} does not exist"
        elif language == "python":
            for module, names in re.findall(r"^from (megatron_null_moe[\w.]*) import ([\w, ]+)",
                                            block, re.MULTILINE):
                imported = importlib.import_module(module)
                for name in names.split(","):
                    assert hasattr(imported, name.strip()), f"{_page_id(page)}: {module}.{name}"
