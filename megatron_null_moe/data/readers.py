"""Inputs to documents: JSONL files (one document per line) and plain-text files (one
document per file), named directly or found in folders.

Which is which goes by the suffix, as Megatron-LM's preprocessing expects JSON: ``.jsonl``
and ``.json`` files hold one JSON object per line, anything else is a plain-text document.
The order is the order of ``--input``, a folder's files sorted, so the same inputs give the
same dataset on any machine. Reading is separate from parsing: the command reads raw lines
and files here, and the worker processes parse the JSON (``document_texts``), as
Megatron-LM's workers do, so a bad line is named by file and line wherever it is found.
"""

import dataclasses
import fnmatch
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

JSON_SUFFIXES = (".jsonl", ".json")
INPUT_FLAG = "--input"
KEYS_FLAG = "--json-keys"
GLOB_FLAG = "--input-glob"
# How many of a line's keys a refusal lists.
SHOWN_KEYS = 10


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A file to read. in_folder: found by walking a folder given to --input, where a file
    that is not UTF-8 text (an image beside the text) is skipped and counted, not refused."""

    path: Path
    is_json: bool
    in_folder: bool = False


@dataclasses.dataclass(frozen=True)
class RawDocument:
    """One document as read: a JSON line (line >= 1) or a whole text file (line 0). index:
    its place among all candidate documents, the numbering the validation draw uses."""

    index: int
    source: str
    line: int
    text: str
    is_json: bool


def is_json_input(path: Path) -> bool:
    return path.suffix.lower() in JSON_SUFFIXES


def _folder_files(folder: Path, patterns: Sequence[str]) -> List[Path]:
    """The folder's files, recursively, sorted, hidden ones (``.git``, ``.cache``) left out;
    with patterns, the files whose name matches one of them."""
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if patterns and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                continue
            path = Path(directory) / name
            if path.is_file():
                found.append(path)
    return found


def input_files(paths: Sequence[Path], patterns: Optional[Sequence[str]] = None
                ) -> List[InputFile]:
    """The files --input names, folders walked. ValueError naming the flag for a missing
    path, a folder without files, or --input-glob without a folder to apply it to."""
    patterns = list(patterns or [])
    files = []
    for path in paths:
        if path.is_dir():
            found = _folder_files(path, patterns)
            if not found:
                matching = f" matching {GLOB_FLAG} {' '.join(patterns)}" if patterns else ""
                raise ValueError(f"{INPUT_FLAG} {path}: the folder holds no files{matching} "
                                 "(hidden files and folders are left out); allowed: a folder "
                                 "with text or JSONL files.")
            files += [InputFile(file, is_json_input(file), in_folder=True) for file in found]
        elif path.is_file():
            files.append(InputFile(path, is_json_input(path)))
        else:
            raise ValueError(f"{INPUT_FLAG} {path}: no such file or folder.")
    if patterns and not any(path.is_dir() for path in paths):
        raise ValueError(f"{GLOB_FLAG} applies to the folders given to {INPUT_FLAG}, and none "
                         "of them is a folder; allowed: a folder among the inputs, or no "
                         f"{GLOB_FLAG}.")
    return files


def refuse_plain_text_with_several_keys(files: Sequence[InputFile], keys: Sequence[str]) -> None:
    """A plain-text file is one document of one key; with several keys it has no place."""
    text = next((file for file in files if not file.is_json), None)
    if text is not None and len(keys) > 1:
        raise ValueError(f"{KEYS_FLAG} {' '.join(keys)} with the plain-text input {text.path}: "
                         "a plain-text file is one document of one key; allowed: one "
                         f"{KEYS_FLAG} with plain-text inputs, or JSONL inputs only.")


def _json_lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    """(1-based line number, line) of the non-blank lines."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, line


def count_documents(files: Iterable[InputFile]) -> int:
    """The candidate documents, without parsing: one per text file, one per non-blank line
    of a JSONL file (the numbering ``raw_documents`` gives them)."""
    return sum(sum(1 for _ in _json_lines(file.path)) if file.is_json else 1 for file in files)


def _decoded(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{INPUT_FLAG} {where}: not UTF-8 text (byte 0x{data[error.start]:02x} "
                         f"at offset {error.start}); allowed: UTF-8 text.") from None


def raw_documents(files: Iterable[InputFile], skipped: Optional[List[Path]] = None
                  ) -> Iterator[RawDocument]:
    """The documents, in order, numbered as ``count_documents`` counts them. A file found in a
    folder that is not UTF-8 text is appended to ``skipped`` (its number stays used)."""
    index = 0
    for file in files:
        if file.is_json:
            for number, line in _json_lines(file.path):
                yield RawDocument(index, str(file.path), number,
                                  _decoded(line, f"{file.path} line {number}"), True)
                index += 1
            continue
        data = file.path.read_bytes()
        try:
            text = _decoded(data, str(file.path))
        except ValueError:
            if not file.in_folder:
                raise
            if skipped is not None:
                skipped.append(file.path)
        else:
            yield RawDocument(index, str(file.path), 0, text, False)
        index += 1


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def document_texts(document: RawDocument, keys: Sequence[str]) -> Tuple[str, ...]:
    """The document's text for each key: a text file's whole text (one key), a JSON line's
    string under each key. ValueError naming the file and line for a line that is not a
    JSON object or lacks a key, and for a value that is not a string."""
    if not document.is_json:
        return (document.text,)
    where = f"{document.source} line {document.line}"
    try:
        record = json.loads(document.text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{INPUT_FLAG} {where}: not valid JSON ({error.msg} at column "
                         f"{error.colno}); allowed: one JSON object per line in .jsonl and "
                         ".json inputs.") from None
    if not isinstance(record, dict):
        raise ValueError(f"{INPUT_FLAG} {where}: a JSON {_JSON_TYPES[type(record)]}, not an "
                         "object; allowed: one JSON object per line in .jsonl and .json inputs.")
    texts = []
    for key in keys:
        if key not in record:
            shown = ", ".join(map(repr, list(record)[:SHOWN_KEYS]))
            more = ", ..." if len(record) > SHOWN_KEYS else ""
            raise ValueError(f"{KEYS_FLAG} {key}: {where} has no key {key!r} (its keys: "
                             f"{shown or 'none'}{more}); allowed: keys every line has.")
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(f"{KEYS_FLAG} {key}: {where}: {key!r} holds a JSON "
                             f"{_JSON_TYPES.get(type(value), type(value).__name__)}; "
                             "allowed: a string.")
        texts.append(value)
    return tuple(texts)
