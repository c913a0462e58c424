"""Held-out documents and the data flags to train with.

With ``--validation-fraction F`` a seeded random draw of documents (at least one) goes to a
dataset of its own, ``PREFIX_valid_KEY_document``, and training reads it with
``--valid-data-path``. Drawn rather than cut off the end as Megatron's ``--split`` does
(contiguous ranges of documents): inputs are often sorted (a folder's files, a dump by
date), so a tail would be one corner of the corpus. The held-out documents are fixed by the
files, whatever the later run's blend or ``--split``. Without it the data is all training,
``--split 100,0,0 --eval-iters 0`` (Megatron's ``--split`` can still carve a tail off).
"""

import random
from typing import FrozenSet, Optional, Tuple

FRACTION_FLAG = "--validation-fraction"
VALID = "valid"


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise ValueError(f"{FRACTION_FLAG} {fraction}: allowed: 0 (no validation set) or a "
                         "fraction of the documents in (0, 1), e.g. 0.01.")


def held_out_indices(num_documents: int, fraction: float, seed: int) -> FrozenSet[int]:
    """The indices of the held-out documents: round(fraction * n), at least one, drawn with
    ``seed``; none for fraction 0. ValueError naming the flag when none would be left to
    train on."""
    check_fraction(fraction)
    if fraction == 0:
        return frozenset()
    count = max(1, round(fraction * num_documents))
    if count >= num_documents:
        raise ValueError(f"{FRACTION_FLAG} {fraction}: holds out {count} of the "
                         f"{num_documents} documents, which leaves none to train on; allowed: "
                         "a smaller fraction, more documents, or 0 (no validation set).")
    return frozenset(random.Random(seed).sample(range(num_documents), count))


def dataset_prefix(output_prefix: str, key: str, held_out: bool = False) -> str:
    """Megatron-LM's name, ``{prefix}_{key}_document``; held-out documents under
    ``{prefix}_valid``."""
    return f"{output_prefix}{'_' + VALID if held_out else ''}_{key}_document"


def data_flags(train_prefix: str, valid_prefix: Optional[str]) -> Tuple[str, ...]:
    """The flags that make Megatron train on ``train_prefix`` and validate on
    ``valid_prefix``. None: no validation set, and --eval-iters 0, since Megatron-Core 0.19
    evaluates an empty validation split anyway and fails on its missing data iterator."""
    if valid_prefix is None:
        return "--data-path", train_prefix, "--split", "100,0,0", "--eval-iters", "0"
    return "--train-data-path", train_prefix, "--valid-data-path", valid_prefix
