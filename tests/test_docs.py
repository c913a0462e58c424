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


# ---- the repository speaks to its users only ----------------------------------------------

# What users read: the pages, the recipes and scripts, and the code with its comments. This
# file, which holds the patterns, is the one exception.
USER_FACING = ["README.md", "docs/*.md", "patches/*", "docker/*", "examples/*", "scripts/*",
               "megatron_null_moe/**/*.py", "benchmarks/*.py", "tests/*.py", "setup.cfg",
               "pyproject.toml"]
# References to the tooling this project was developed with, which users do not have.
INTERNAL = {
    "an issue number of this project": re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE),
    "a #-numbered issue reference": re.compile(r"(?<![\w/&#$])#[0-9]+\b"),
    "the development machines' shared folder": re.compile(r"\.\./shared\b|\bshared/(?:gpu|cpu)",
                                                          re.IGNORECASE),
    "the GPU machine's folder": re.compile(r"\.gpu/p"),
    "the GPU machine's tooling": re.compile(r"\bdevice\s+(?:tool|call|time)s?\b",
                                            re.IGNORECASE),
    "a working session": re.compile(r"(?<!pytest )(?<!test )\bsessions?\b", re.IGNORECASE),
    "an agent": re.compile(r"(?<!user )(?<!user-)\bagents?\b", re.IGNORECASE),
}


def _user_facing_files():
    for pattern in USER_FACING:
        yield from sorted(path for path in ROOT.glob(pattern)
                          if path.is_file() and path != Path(__file__).resolve())


def _internal_references(text: str):
    """(what, matched text) for each reference in ``text``; a match that is a whole quoted
    string (a word being searched for, a pytest fixture's scope) is not one."""
    for what, pattern in INTERNAL.items():
        for match in pattern.finditer(text):
            before, after = text[max(match.start() - 1, 0):match.start()], text[match.end():][:1]
            if before and before == after and before in "'\"":
                continue
            yield what, match.group()


@pytest.mark.parametrize("text,flagged", [
    ("see issue 14", True), ("issues 14-16", True), ("Issue 11's targets", True),
    ("(#12)", True), ("../shared/notes", True), ("shared/GPU.md", True),
    ("shared/gpu/run", True), (".gpu/p", True), ("the device tool", True),
    ("one device call", True), ("Device time left", True), ("in this session", True),
    ("the next sessions", True), ("another agent", True),
    ("pytest session", False), ('scope="session"', False), ("/shared/data", False),
    ("pytorch#172439", False), ("the issue", False), ("#0f0f0f", False),
    ("device memory", False), ("device timer", False), ("user agent", False),
])
def test_internal_reference_patterns(text, flagged):
    assert bool(list(_internal_references(text))) == flagged


def test_no_internal_tooling_in_user_facing_text():
    """Issue numbers, the development machines' folders and tools, working sessions and
    agents are nothing users have or can look up: each one found is listed as file:line."""
    found = []
    for path in _user_facing_files():
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            for what, text in _internal_references(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {what} ({text!r}): "
                             f"{line.strip()}")
    assert not found, "internal tooling in user-facing text:\n" + "\n".join(found)


# ---- --help speaks in whole sentences ---------------------------------------------------

def _module_from_file(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSERS = {  # command -> how to build its parser
    "python -m megatron_null_moe.demo":
        lambda: importlib.import_module("megatron_null_moe.demo.__main__").build_parser(),
    "python -m megatron_null_moe.export":
        lambda: importlib.import_module("megatron_null_moe.export.__main__").build_parser(),
    "python -m megatron_null_moe.upcycle":
        lambda: importlib.import_module("megatron_null_moe.upcycle.__main__").build_parser(),
    "python -m megatron_null_moe.data":
        lambda: importlib.import_module("megatron_null_moe.data.__main__").build_parser(),
    **{f"python {path}": (lambda path=path: _module_from_file(path).build_parser())
       for path in ("benchmarks/moe_layer_benchmark.py", "benchmarks/scale_model.py",
                    "benchmarks/alltoall_traffic.py", "scripts/layouts_global_scope.py",
                    "scripts/real_text_experiment.py")},
}
SENTENCE_END = (".", "?", "!")


def _texts(parser, name: str):
    """(where, text) of the parser's description and every help string, subcommands too."""
    import argparse

    yield f"{name}: description", parser.description
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{name} {choice.dest}: help", choice.help
            for command, subparser in action.choices.items():
                yield from _texts(subparser, f"{name} {command}")
        elif action.help is not None and action.help != argparse.SUPPRESS:
            yield f"{name} {'/'.join(action.option_strings) or action.dest}: help", action.help


@pytest.mark.parametrize("command", PARSERS)
def test_help_descriptions_and_help_strings_are_whole_sentences(command):
    """--help shows no sentence cut off: the description and every help string end as a
    sentence ends (a description taken from the first line of a docstring often does not)."""
    unfinished = [f"{where}: {text!r}" for where, text in _texts(PARSERS[command](), command)
                  if text is not None and not text.rstrip().endswith(SENTENCE_END)]
    assert not unfinished, "\n".join(unfinished)


def _plugin_flags() -> set:
    """The option strings the plugin adds to Megatron's parser."""
    import argparse

    from megatron_null_moe.arguments import add_null_expert_args

    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("--moe-token-dispatcher-type", default="allgather", help="Megatron's.")
    added = add_null_expert_args(group)._actions[1:]
    return {option for action in added for option in action.option_strings}


def test_every_flag_is_on_the_flags_page_and_every_named_flag_exists():
    flags = _plugin_flags()
    assert len(flags) == 7, sorted(flags)
    page = (ROOT / "docs" / "turning_it_on.md").read_text()
    table = page[page.index("## The flags"):page.index("## What the entry point refuses")]
    missing = [flag for flag in sorted(flags) if f"`{flag}" not in table]
    assert not missing, f"docs/turning_it_on.md's flag table lacks {missing}"
    named = {(page_path, flag) for page_path in PAGES
             for flag in re.findall(r"--moe-null-[a-z-]+|--moe-num-null-experts",
                                    page_path.read_text())}
    unknown = sorted(f"{_page_id(path)}: {flag}" for path, flag in named if flag not in flags)
    assert not unknown, unknown


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_launch_with_null_experts_shows_the_dispatcher(page):
    """A launch a reader copies names alltoall: with allgather null slots save no traffic."""
    for language, block in FENCE.findall(page.read_text()):
        for command in _commands(block) if language == "bash" else ():
            if "pretrain_gpt" in command and "--moe-null-expert-rho" in command:
                assert "--moe-token-dispatcher-type alltoall" in command, \
                    f"{_page_id(page)}: {command}"
