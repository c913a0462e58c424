"""What the package's commands share: a quiet start and one-line refusals of bad input.

Megatron warns at import time, once per module, that Transformer Engine or Apex is missing
and what it falls back to (a dozen lines on the CPU) and torch logs that no CUDA runtime was
found. A newcomer reads these as breakage. The commands (entry point, demo, upcycle, export,
benchmark) silence exactly those and print one line of their own instead where it matters.
Code that imports the package as a library keeps every warning: nothing here runs at import.

A command module starts with ``quiet_if_command(__name__)`` before its other imports (the
warnings fire when Megatron is first imported); its console script goes through
``console_script``, which silences before importing the module.
"""

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import warnings
from typing import Iterator, Optional

# Megatron-Core 0.19.2's import-time fallback notices (message prefixes, matched as regexes).
FALLBACK_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Only transformer-engine>=",
)
# torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." on import.
CUDA_PROBE_LOGGER = "torch.utils.cpp_extension"


def silence_fallback_warnings() -> None:
    """Hide Megatron's fallback notices and torch's CUDA probe, nothing else."""
    for message in FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    logging.getLogger(CUDA_PROBE_LOGGER).setLevel(logging.ERROR)


def quiet_if_command(module_name: str) -> None:
    """Silence the fallback notices when ``module_name`` is ``__main__`` (``python -m``)."""
    if module_name == "__main__":
        silence_fallback_warnings()


def call_quietly(target: str, *args):
    """Silence, then import ``module:function`` and call it with ``args``. Also a spawned
    worker's initializer: a worker imports its initializer's module before running it."""
    silence_fallback_warnings()
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)(*args)


def console_script(target: str):
    """A console-script entry for ``module:function`` that silences before importing it."""
    return functools.partial(call_quietly, target)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def environment_line(on_cuda: bool, precision: Optional[str] = None,
                     layers: Optional[str] = None) -> Optional[str]:
    """The one line that replaces the silenced notices, e.g. "CPU run: no Transformer
    Engine, no Apex; local layers, fp32"; None when Transformer Engine and Apex are there."""
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"),
                                         ("Apex", "apex.normalization"))
               if not _installed(module)]
    if not missing:
        return None
    where = "GPU run" if on_cuda else "CPU run"
    if layers is None:  # what Megatron's specs fall back to
        layers = "local layers" if "Transformer Engine" in missing else "Transformer Engine layers"
    return (f"{where}: {', '.join('no ' + name for name in missing)}; {layers}"
            + (f", {precision}" if precision else ""))


@contextlib.contextmanager
def refusals_as_errors(prog: str, speaks: bool = True,
                       refusal: type[Exception] = ValueError) -> Iterator[None]:
    """Inside: the plugin's checks of user input, which raise ValueError naming the flag and
    what is allowed. A refusal becomes one ``prog: error: ...`` line and exit status 2, as
    argparse does, instead of a traceback; other exceptions (bugs) keep theirs.

    speaks: whether this process prints (under torchrun, rank 0 only; every rank exits).
    refusal: the exception that is a refusal; around code that is not the plugin's own (a
    whole Megatron run), a class that only the plugin's checks raise.
    """
    try:
        yield
    except refusal as error:
        if speaks:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# Console scripts (setup.cfg): each silences before importing its command.
pretrain_gpt_command = console_script("megatron_null_moe.pretrain_gpt:main")
upcycle_command = console_script("megatron_null_moe.upcycle.__main__:main")
export_command = console_script("megatron_null_moe.export.__main__:main")
data_command = console_script("megatron_null_moe.data.__main__:main")
