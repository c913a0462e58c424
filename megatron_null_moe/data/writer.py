"""The outputs, written all or nothing: Megatron's indexed datasets and the tokenizer.

Every output is first written under a hidden name beside its final one
(``.NAME.partial-PID``) and renamed when everything is written, so a refusal found late (a
bad line near the end, an empty corpus) or an interrupted run leaves no partial dataset that
a training run could pick up. The datasets are written by megatron-core's own
``IndexedDatasetBuilder``, one ``add_document`` per document, in the dtype Megatron-LM picks
for the vocabulary (``DType.optimal_dtype``: uint16 below 65,500 ids, else int32).
"""

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy

PREFIX_FLAG = "--output-prefix"


def dataset_dtype(vocab_size: int) -> numpy.dtype:
    from megatron.core.datasets.indexed_dataset import DType

    return numpy.dtype(DType.optimal_dtype(vocab_size))


def refuse_existing(prefix: str, outputs: Sequence[Path], overwrite: bool) -> None:
    """ValueError naming --output-prefix when it ends in a folder ("data/"), when its folder
    is missing or, without --overwrite, when an output is already there."""
    folder = Path(prefix).parent
    if prefix.endswith(("/", os.sep)):
        raise ValueError(f"{PREFIX_FLAG} {prefix}: a folder without the start of the file "
                         "names; allowed: a folder and the start of the names, e.g. "
                         "data/corpus.")
    if not folder.is_dir():
        raise ValueError(f"{PREFIX_FLAG} {prefix}: the folder {folder} does not exist; "
                         "allowed: a prefix in an existing folder.")
    if overwrite:
        return
    existing = [path for path in outputs if os.path.lexists(path)]
    if existing:
        raise ValueError(f"{PREFIX_FLAG} {prefix}: {existing[0]} exists; allowed: a prefix "
                         "whose outputs do not exist, or --overwrite to replace them.")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def staged(outputs: Sequence[Path]) -> Iterator[Dict[Path, Path]]:
    """A hidden sibling path for each output (nothing created), renamed onto the outputs,
    replacing what is there, only when the block completes. An exception removes the
    siblings and any output this block already renamed."""
    partials = {output: output.parent / f".{output.name}.partial-{os.getpid()}"
                for output in outputs}
    renamed: List[Path] = []
    try:
        yield partials
        for output, partial in partials.items():
            _remove(output)
            partial.rename(output)
            renamed.append(output)
    except BaseException:
        for output in renamed:
            _remove(output)
        raise
    finally:
        for partial in partials.values():
            _remove(partial)


@dataclasses.dataclass
class DatasetCount:
    documents: int = 0
    tokens: int = 0


class IndexedDatasets:
    """One megatron-core IndexedDatasetBuilder per dataset prefix, written to the staged
    paths of its ``.bin`` and ``.idx``."""

    def __init__(self, prefixes: Sequence[str], staging: Dict[Path, Path], dtype: numpy.dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.index_paths = {prefix: staging[Path(prefix + ".idx")] for prefix in prefixes}
        self.builders = {prefix: IndexedDatasetBuilder(str(staging[Path(prefix + ".bin")]),
                                                       dtype=dtype.type)
                         for prefix in prefixes}
        self.counts = {prefix: DatasetCount() for prefix in prefixes}

    def add(self, prefix: str, tokens: numpy.ndarray) -> bool:
        """One document (as one sequence, as Megatron-LM writes a document that is not split
        into sentences); False, and nothing written, for one without tokens."""
        if tokens.size == 0:
            return False
        self.builders[prefix].add_document(tokens, [tokens.size])
        self.counts[prefix].documents += 1
        self.counts[prefix].tokens += int(tokens.size)
        return True

    def finalize(self) -> List[Tuple[str, DatasetCount]]:
        for prefix, builder in self.builders.items():
            builder.finalize(str(self.index_paths[prefix]))
        return list(self.counts.items())

