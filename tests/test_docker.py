"""docker/: static checks of the Dockerfile and its page, docs/docker.md (no image is built).

The rules: the base is pinned by a versioned tag; megatron-core is the version CI pins; the
base image's torch stack (torch, Transformer Engine, NVIDIA's apex, ...) is never reinstalled;
the PyPI package named ``apex`` (an unrelated web toolkit) is never installed; the plugin is
installed from the build context; the page's build command names this Dockerfile.
"""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKER_README = ROOT / "docs" / "docker.md"
DOCKERIGNORE = ROOT / "docker" / "Dockerfile.dockerignore"  # BuildKit: <Dockerfile>.dockerignore

# Packages the base image ships as NVIDIA builds; pip must never replace them.
BASE_STACK = {"torch", "torchvision", "torchaudio", "triton", "transformer-engine",
              "transformer-engine-cu12", "transformer-engine-cu13", "transformer-engine-torch",
              "flash-attn", "apex"}


def instructions(text: str):
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            joined.append((keyword.upper(), rest.strip()))
        current = ""
    return joined


def arg_defaults(text: str) -> dict:
    """ARG NAME=value defaults, to expand ${NAME} in RUN lines."""
    values = {}
    for keyword, rest in instructions(text):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            values[name.strip()] = value.strip().strip('"')
    return values


def shell_commands(line: str):
    """The simple commands of a shell line (split at ; && || |), each as its words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [command for command in [*commands, words] if command]


def pip_installs(text: str):
    """Every pip install in the RUN lines: (environment assignments, options, requirements)."""
    variables = arg_defaults(text)
    found = []
    for keyword, rest in instructions(text):
        if keyword != "RUN":
            continue
        for name, value in variables.items():
            rest = rest.replace("${%s}" % name, value).replace("$" + name, value)
        for words in shell_commands(rest):
            assignments = [w for w in words if re.fullmatch(r"[A-Z_]+=.*", w)]
            words = words[len(assignments):]
            if "install" not in words or not any(re.fullmatch(r"(\S*/)?pip3?", w) or w == "pip"
                                                 for w in words[:words.index("install")]):
                continue
            after = words[words.index("install") + 1:]
            options = [w for w in after if w.startswith("-")]
            requirements = [w for w in after if not w.startswith("-")]
            found.append((assignments, options, requirements))
    return found


def requirement_name(requirement: str) -> str:
    """'megatron-core==0.19.2' -> 'megatron-core'; '.' stays '.'; names normalised (PEP 503)."""
    if requirement.startswith((".", "/")):
        return requirement
    name = re.split(r"[\[<>=!~; @]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def base_image(text: str) -> str:
    froms = [rest for keyword, rest in instructions(text) if keyword == "FROM"]
    assert froms, "no FROM line"
    return froms[0].split()[0]


def pinned_tag_problem(image: str):
    """None for a pinned, versioned tag; else what is wrong."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return f"{image} has no tag"
    if tag == "latest" or not re.search(r"\d+\.\d+", tag):
        return f"{image}: tag {tag!r} is not a version"
    if "$" in image:
        return f"{image} is set by a build argument, not pinned"
    return None


def constraint_version(package: str) -> str:
    for line in (ROOT / "constraints-ci.txt").read_text().splitlines():
        if requirement_name(line.strip()) == package and "==" in line:
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} not pinned in constraints-ci.txt")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_base_image_is_nvidia_pytorch_pinned_by_version_tag(dockerfile):
    image = base_image(dockerfile)
    assert image.startswith("nvcr.io/nvidia/pytorch:"), image
    assert pinned_tag_problem(image) is None, pinned_tag_problem(image)
    year = int(image.rpartition(":")[2][:2])
    assert year in (25, 26), f"{image}: expected a 2025/2026 NGC release"


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/pytorch:latest", "nvcr.io/nvidia/pytorch",
                                   "nvcr.io/nvidia/pytorch:py3", "localhost:5000/pytorch",
                                   "nvcr.io/nvidia/pytorch:${TAG}"])
def test_unpinned_base_images_are_refused(image):
    assert pinned_tag_problem(image) is not None


def test_megatron_core_version_is_the_ci_constraint(dockerfile):
    pins = [requirement for _, _, requirements in pip_installs(dockerfile)
            for requirement in requirements if requirement_name(requirement) == "megatron-core"]
    assert pins, "the Dockerfile installs no megatron-core"
    expected = constraint_version("megatron-core")
    assert pins == [f"megatron-core=={expected}"], (pins, expected)


def test_megatron_core_and_plugin_install_without_dependencies(dockerfile):
    for assignments, options, requirements in pip_installs(dockerfile):
        names = {requirement_name(r) for r in requirements}
        if names & {"megatron-core", "."}:
            assert "--no-deps" in options, (requirements, options)


def test_base_stack_and_pypi_apex_are_never_installed(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs
    for assignments, options, requirements in installs:
        names = {requirement_name(r) for r in requirements}
        assert not names & BASE_STACK, f"pip install {' '.join(requirements)} replaces the base"
        assert "-r" not in options and "--requirement" not in options, \
            "requirement files hide what is installed"
        if "--no-deps" not in options:
            # Resolving dependencies: only under the base image's own PIP_CONSTRAINT.
            assert not any(a.startswith("PIP_CONSTRAINT=") for a in assignments), requirements
            assert not set(options) & {"-U", "--upgrade", "--force-reinstall",
                                       "--ignore-installed", "-I"}, options
    assert not re.search(r"^\s*ENV\s+PIP_CONSTRAINT", dockerfile, re.MULTILINE), \
        "PIP_CONSTRAINT must not be cleared for the whole image"


@pytest.mark.parametrize("run", [
    "RUN pip install apex", "RUN python -m pip install psutil apex==0.9",
    "RUN pip3 install --upgrade torch", "RUN PIP_CONSTRAINT= pip install tensorboard",
    "RUN pip install -U psutil", "RUN python -m pip install transformer_engine[pytorch]",
])
def test_bad_install_lines_are_caught(run):
    with pytest.raises(AssertionError):
        test_base_stack_and_pypi_apex_are_never_installed(f"FROM x:1.0\n{run}\n")


def test_plugin_is_installed_from_the_build_context(dockerfile):
    steps = instructions(dockerfile)
    copied = set()
    for keyword, rest in steps:
        if keyword == "COPY" and "--from" not in rest:
            copied.update(part.rstrip("/") for part in rest.split()[:-1])
    assert {"pyproject.toml", "setup.cfg", "megatron_null_moe"} <= copied or "." in copied
    # setup.cfg reads these files (long_description = file: ...) at build time.
    for needed in re.findall(r"file:\s*(\S+)", (ROOT / "setup.cfg").read_text()):
        assert needed in copied or "." in copied, f"{needed} is read by setup.cfg, not copied"
    assert any("." in requirements for _, _, requirements in pip_installs(dockerfile)), \
        "no `pip install --no-deps .` of the copied sources"
    # The build context filter keeps what is copied.
    ignored = DOCKERIGNORE.read_text().splitlines() if DOCKERIGNORE.exists() else []
    if "**" in ignored:
        for path in copied:
            assert f"!{path}" in ignored or f"!{path}/" in ignored, \
                f"{path} is copied but excluded by {DOCKERIGNORE.name}"


def test_every_runtime_dependency_of_the_plugin_is_installed(dockerfile):
    """The plugin goes in with --no-deps: each package setup.cfg's install_requires names
    must come from the base image or an explicit install line."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    required = {re.split(r"[<>=!~\[ ]", line.strip(), maxsplit=1)[0].lower()
                for line in setup["options"]["install_requires"].splitlines() if line.strip()}
    installed = {re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()
                 for _, _, requirements in pip_installs(dockerfile)
                 for requirement in requirements if not requirement.startswith(".")}
    from_base = {"torch", "numpy", "packaging"}  # NVIDIA's PyTorch image
    assert required - installed - from_base == set()


def test_readme_build_command_names_this_dockerfile():
    readme = DOCKER_README.read_text()
    builds = re.findall(r"docker build -f (\S+) -t (\S+) (\S+)", readme)
    assert builds, "docs/docker.md shows no `docker build -f ... -t ... <context>`"
    for path, tag, context in builds:
        assert (ROOT / path).resolve() == DOCKERFILE, path
        assert context == ".", "the build context is the repository root"
        assert re.search(rf"docker run .*{re.escape(tag)}", readme, re.DOTALL), tag
    assert "--gpus all" in readme and "--ipc=host" in readme
    for flag in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--network=host"):
        assert flag in readme, f"multi-node instructions lack {flag}"
