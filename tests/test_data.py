"""The corpus command: its datasets are the tokenizer's encoding plus eod, bad input is one
line and nothing written, and Megatron trains and validates on what it writes.

The corpus is real text every machine has: Python standard-library modules (a fixed, sorted
selection of small ones), copied into nested folders and into a JSONL file. A SentencePiece
model of 512 pieces is trained on it by the command itself, once for the module.
"""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy
import pytest

from megatron_null_moe.data.__main__ import main
from megatron_null_moe.data.readers import RawDocument, document_texts
from megatron_null_moe.data.tokenizers import training_lines
from megatron_null_moe.data.validation import held_out_indices
from megatron_null_moe.process_groups import free_port
from test_pretrain import TINY_GPT

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m megatron_null_moe.data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# The first 40 top-level modules under 16 KB (not empty), sorted by name: 267 KB of
# CPython 3.12.1's.
SOURCES = [path for path in sorted(STDLIB.glob("*.py")) if 0 < path.stat().st_size < 16_000][:40]
VOCAB = 512
FRACTION = 0.1
SEED = 1234  # the command's default
# Megatron's tiny MoE of test_pretrain without its mock data and tokenizer.
DROPPED = {"--mock-data": 0, "--tokenizer-type": 1, "--vocab-size": 1, "--eval-iters": 1,
           "--eval-interval": 1}


def _gpt_flags() -> list:
    flags, skip = [], 0
    for flag in TINY_GPT:
        if skip:
            skip -= 1
        elif flag in DROPPED:
            skip = DROPPED[flag]
        else:
            flags.append(flag)
    return flags


def _environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                PYTHONWARNINGS="ignore")


class Corpus:
    """The standard-library files in nested folders (with files the glob leaves out), the
    same texts in a JSONL file, and the command's first run on the folder."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.folder = directory / "sources"
        self.files = []
        for number, source in enumerate(SOURCES):  # half at the top, half two levels down
            target = self.folder / ("" if number % 2 else "deep/er") / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            self.files.append(target)
        (self.folder / "notes.txt").write_text("left out by --input-glob '*.py'\n")
        (self.folder / ".hidden.py").write_text("left out: hidden\n")
        # The command's order: each folder's files sorted, then its subfolders.
        self.files.sort(key=lambda path: (len(path.relative_to(self.folder).parts), path.name))
        self.texts = [path.read_bytes().decode() for path in self.files]  # newlines as-is
        self.jsonl = directory / "sources.jsonl"
        self.jsonl.write_text("".join(json.dumps({"title": path.stem, "text": text}) + "\n"
                                      for path, text in zip(self.files, self.texts)))
        self.prefix = str(directory / "py")
        self.result = subprocess.run(
            [sys.executable, "-m", "megatron_null_moe.data", "--input", str(self.folder),
             "--input-glob", "*.py", "--train-sentencepiece", str(VOCAB), "--output-prefix",
             self.prefix, "--validation-fraction", str(FRACTION), "--workers", "1"],
            capture_output=True, text=True, timeout=300, env=_environment(), cwd=ROOT)
        assert self.result.returncode == 0, self.result.stderr[-3000:]
        self.model = self.prefix + ".model"

    def train_flags(self, result: subprocess.CompletedProcess | str) -> list:
        output = result if isinstance(result, str) else result.stdout
        (line,) = [line for line in output.splitlines() if line.startswith("train with: ")]
        return shlex.split(line[len("train with: "):])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("corpus"))


def _documents(prefix: str) -> list:
    """The documents of a Megatron indexed dataset, as lists of ids."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    return [numpy.concatenate([dataset[i] for i in range(bounds[d], bounds[d + 1])]).tolist()
            for d in range(len(bounds) - 1)]


def _sentencepiece(model: str):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=model)


def _run(*argv: str) -> str:
    """The command in this process; returns what it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(arg) for arg in argv])
    return printed.getvalue()


# ---- the datasets hold the tokenizer's encoding --------------------------------------------

def test_datasets_are_the_sentencepiece_encoding_plus_eod_with_documents_held_out(corpus):
    sp = _sentencepiece(corpus.model)
    assert sp.vocab_size() == VOCAB and sp.eos_id() == 2
    expected = [sp.encode(text) + [sp.eos_id()] for text in corpus.texts]
    held = held_out_indices(len(expected), FRACTION, SEED)
    assert len(held) == round(FRACTION * len(expected))
    train = _documents(corpus.prefix + "_text_document")
    valid = _documents(corpus.prefix + "_valid_text_document")
    assert valid == [expected[i] for i in sorted(held)]
    assert train == [tokens for i, tokens in enumerate(expected) if i not in held]
    # Byte fallback, no normalization: every document decodes to its file's text.
    assert [sp.decode(tokens[:-1]) for tokens in train + valid] == \
        [text for i, text in enumerate(corpus.texts) if i not in held] + \
        [corpus.texts[i] for i in sorted(held)]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(corpus.prefix + "_text_document").index.dtype == numpy.uint16


def test_the_end_message_counts_and_names_what_to_train_with(corpus):
    lines = corpus.result.stdout.splitlines()
    tokens = sum(map(len, _documents(corpus.prefix + "_text_document")))
    counted = re.match(r"tokenized (\d+) documents into ([\d,]+) tokens in [\d.]+ s", lines[0])
    assert counted and int(counted[1]) == len(corpus.texts)
    assert int(counted[2].replace(",", "")) > tokens  # the held-out ones too
    training = len(corpus.texts) - len(held_out_indices(len(corpus.texts), FRACTION, SEED))
    assert f"{corpus.prefix}_text_document ({training} documents, {tokens:,} tokens)" in lines[0]
    assert f"vocabulary {VOCAB}, eod 2 appended to each document; token ids stored as uint16" \
           f"; Megatron pads the embedding to {VOCAB} rows" in corpus.result.stdout
    assert corpus.train_flags(corpus.result) == [
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus.model,
        "--train-data-path", corpus.prefix + "_text_document",
        "--valid-data-path", corpus.prefix + "_valid_text_document"]
    assert corpus.result.stderr == ""  # quiet: no progress bar off a terminal, no notices


def test_jsonl_keys_folders_workers_and_training_agree(corpus, tmp_path):
    """Each JSON key its own dataset; the JSONL's text equals the folder's; two workers
    write the bytes one writes; the same text trains the same SentencePiece model in
    another process; --no-append-eod drops only the eod; --overwrite replaces."""
    sp = _sentencepiece(corpus.model)
    _run("--input", corpus.jsonl, "--json-keys", "text", "title", "--sentencepiece-model",
         corpus.model, "--output-prefix", tmp_path / "jsonl", "--workers", "2")
    _run("--input", corpus.folder, "--input-glob", "*.py", "--sentencepiece-model",
         corpus.model, "--output-prefix", tmp_path / "folder")
    (tmp_path / "one_text_document.bin").write_bytes(b"replaced")
    _run("--input", corpus.jsonl, "--train-sentencepiece", VOCAB, "--output-prefix",
         tmp_path / "one", "--no-append-eod", "--overwrite")
    assert (tmp_path / "one.model").read_bytes() == Path(corpus.model).read_bytes()
    text = _documents(str(tmp_path / "jsonl_text_document"))
    assert text == [sp.encode(t) + [2] for t in corpus.texts]
    assert _documents(str(tmp_path / "jsonl_title_document")) == \
        [sp.encode(path.stem) + [2] for path in corpus.files]
    assert _documents(str(tmp_path / "one_text_document")) == [tokens[:-1] for tokens in text]
    for suffix in (".bin", ".idx"):
        written = [(tmp_path / f"{name}_text_document{suffix}").read_bytes()
                   for name in ("jsonl", "folder")]
        assert written[0] == written[1]
    assert not list(tmp_path.glob(".*"))  # no staging file left


def test_a_folders_files_that_are_not_utf8_are_skipped_and_counted(corpus, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("one document\n")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    printed = _run("--input", folder, "--sentencepiece-model", corpus.model, "--output-prefix",
                   tmp_path / "mixed")
    assert f"left out: 1 file in folders that is not UTF-8 text (first: {folder / 'b.png'})" \
        in printed
    assert _documents(str(tmp_path / "mixed_text_document")) == \
        [_sentencepiece(corpus.model).encode("one document\n") + [2]]


def test_training_lines_cut_long_lines_and_keep_newlines():
    assert list(training_lines("ab\n\ncdefg", max_chars=2)) == ["ab", "\n", "\n", "cd", "ef", "g"]
    assert "".join(training_lines("x" * 5000 + "\ny\n")) == "x" * 5000 + "\ny\n"


def test_a_json_value_that_is_no_string_is_named_by_file_and_line():
    document = RawDocument(0, "a.jsonl", 3, '{"text": 7}', True)
    with pytest.raises(ValueError, match=r"--json-keys text: a.jsonl line 3: 'text' holds a "
                                         r"JSON number; allowed: a string"):
        document_texts(document, ["text"])


# ---- bad input: one line, exit status 2, nothing written -----------------------------------

def _bad_inputs(corpus: Corpus, folder: Path) -> dict:
    """name -> (arguments, what the error line says)."""
    keyless = folder / "keyless.jsonl"
    keyless.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    broken = folder / "broken.jsonl"  # the bad line last, found by a worker at the end
    broken.write_text(corpus.jsonl.read_text() + '{"text": "unterminated\n')
    empty = folder / "empty.jsonl"
    empty.write_text("\n  \n")
    blank = folder / "blank.jsonl"
    blank.write_text('{"text": ""}\n')
    garbage = folder / "garbage.model"
    garbage.write_bytes(b"not a model")
    exists = folder / "out" / "exists"
    binary = folder / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    no_eos = _hugging_face_tokenizer(folder / "no_eos", corpus.files[:2], eos=None)
    model = ("--sentencepiece-model", corpus.model)
    return {
        "input that is not UTF-8": (["--input", binary, *model],
                                    f"--input {binary}: not UTF-8 text (byte 0x89 at offset 0)"),
        "missing input": (["--input", folder / "missing.jsonl", *model],
                          f"--input {folder / 'missing.jsonl'}: no such file or folder."),
        "line without the key": (["--input", keyless, *model],
                                 f"--json-keys text: {keyless} line 3 has no key 'text' (its "
                                 "keys: 'body')"),
        "invalid JSON at the end, two workers": (
            ["--input", broken, *model, "--workers", "2"],
            f"--input {broken} line {len(corpus.texts) + 1}: not valid JSON"),
        "no documents": (["--input", empty, *model], f"--input {empty}: no documents"),
        "no tokens": (["--input", blank, *model], f"--input {blank}: no tokens under 'text'"),
        "output exists": (["--input", corpus.jsonl, *model, "--output-prefix", exists],
                          f"--output-prefix {exists}: {exists}_text_document.bin exists; "
                          "allowed: a prefix whose outputs do not exist, or --overwrite"),
        "prefix that is a folder": (["--input", corpus.jsonl, *model, "--output-prefix",
                                     f"{folder / 'out'}/"], f"--output-prefix {folder / 'out'}/:"
                                                            " a folder without the start"),
        "model that does not load": (["--input", corpus.jsonl, "--sentencepiece-model",
                                      garbage], f"--sentencepiece-model {garbage}: does not "
                                                "load as a SentencePieceTokenizer"),
        "tokenizer without an end of document": (
            ["--input", corpus.jsonl, "--hf-tokenizer", no_eos],
            f"--hf-tokenizer {no_eos}: the tokenizer has no end-of-document token (Megatron "
            "reads an eos_token as eod); allowed: a tokenizer with one, or --no-append-eod."),
        "type without training": (["--input", corpus.jsonl, *model, "--sentencepiece-type",
                                   "unigram"], "--sentencepiece-type unigram applies to "
                                               "--train-sentencepiece"),
        "glob without a folder": (["--input", corpus.jsonl, *model, "--input-glob", "*.py"],
                                  "--input-glob applies to the folders"),
        "text files with several keys": (["--input", corpus.folder, *model, "--json-keys",
                                          "text", "title"], "a plain-text file is one "
                                                            "document of one key"),
        "nothing left to train on": (["--input", keyless, *model, "--validation-fraction",
                                      "0.9"], "--validation-fraction 0.9: holds out 2 of the "
                                              "2 documents"),
        "vocabulary too small to train": (["--input", corpus.jsonl, "--train-sentencepiece",
                                           "100"], "--train-sentencepiece 100: SentencePiece "
                                                   "refused (Vocabulary size is smaller than "
                                                   "required_chars"),
    }


BAD_INPUTS = ["missing input", "input that is not UTF-8", "line without the key",
              "invalid JSON at the end, two workers", "no documents", "no tokens",
              "output exists", "prefix that is a folder", "model that does not load",
              "tokenizer without an end of document", "type without training",
              "glob without a folder", "text files with several keys",
              "nothing left to train on", "vocabulary too small to train"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_nothing_written(corpus, tmp_path, capsys, case):
    arguments, says = _bad_inputs(corpus, tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "exists_text_document.bin").write_bytes(b"")  # what "output exists" finds
    before = sorted(out.iterdir())
    if "--output-prefix" not in arguments:
        arguments += ["--output-prefix", out / "corpus"]
    with pytest.raises(SystemExit) as exit_info:
        _run(*arguments)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{PROG}: error: ") and says in line, line
    assert sorted(out.iterdir()) == before


def test_two_tokenizers_are_refused_by_argparse(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run("--input", corpus.jsonl, "--sentencepiece-model", corpus.model, "--hf-tokenizer",
             tmp_path, "--output-prefix", tmp_path / "corpus")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"{PROG}: error: argument --hf-tokenizer: not allowed with argument --sentencepiece-model"
    assert list(tmp_path.iterdir()) == []


# ---- Megatron trains and validates on it ---------------------------------------------------

def _train(log_dir: Path, data_flags: list, *extra: str, nproc: int = 1) -> str:
    """The entry point on the corpus: 4 iterations, validation at 2 and 4 where there is a
    validation set."""
    log_dir.mkdir()
    module = ["-m", "megatron_null_moe.pretrain_gpt", *_gpt_flags(),
              "--moe-null-budget-controller", "--train-iters", "4", "--eval-iters", "1",
              "--eval-interval", "2", "--data-cache-path", str(log_dir / "cache"),
              *data_flags, *extra]  # the command's flags last: they win
    command = [sys.executable, *module] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), *module]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=_environment())
    output = result.stdout + result.stderr
    (log_dir / "output.txt").write_text(output)
    assert result.returncode == 0, output[-4000:]
    return output


def _validation_losses(output: str) -> dict:
    """Iteration -> validation loss (Megatron validates at each --eval-interval and once
    after the last iteration)."""
    return {int(iteration): float(value) for iteration, value in re.findall(
        r"validation loss at iteration (\d+) .*?lm loss value: ([\d.E+-]+)", output)}


def _checks_training(output: str, vocab: int, padded: int) -> None:
    losses = _validation_losses(output)
    assert sorted(losses) == [2, 4] and all(map(math.isfinite, losses.values())), losses
    assert losses[2] < math.log(padded) + 1  # a model of this vocabulary, not of random ids
    assert f"padded vocab (size: {vocab}) with {padded - vocab} dummy tokens (new size: " \
           f"{padded})" in output
    assert "null real fraction" in output


def test_trains_and_validates_on_it_one_process(corpus, tmp_path):
    output = _train(tmp_path / "run", corpus.train_flags(corpus.result))
    _checks_training(output, VOCAB, VOCAB)


@pytest.mark.world_size(2)
def test_trains_and_validates_on_it_expert_parallel_two_ranks(corpus, tmp_path):
    output = _train(tmp_path / "run", corpus.train_flags(corpus.result),
                    "--expert-model-parallel-size", "2", "--distributed-backend", "gloo",
                    nproc=2)
    _checks_training(output, VOCAB, VOCAB)


def _hugging_face_tokenizer(directory: Path, files: list, eos="<|endoftext|>") -> Path:
    """A byte-level BPE of 300 tokens trained on the files, with an eos_token (or none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(path) for path in files], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos).save_pretrained(directory)
    return directory


def test_a_hugging_face_tokenizer_writes_its_encoding_and_trains_without_validation(
        corpus, tmp_path):
    """No --validation-fraction: the flags train on everything with validation off."""
    from transformers import AutoTokenizer

    source = _hugging_face_tokenizer(tmp_path / "hf", corpus.files)
    prefix = tmp_path / "hf_corpus"
    printed = _run("--input", corpus.jsonl, "--hf-tokenizer", source, "--output-prefix", prefix)
    tokenizer = AutoTokenizer.from_pretrained(source)
    eos = tokenizer.eos_token_id
    assert _documents(f"{prefix}_text_document") == \
        [tokenizer(text).input_ids + [eos] for text in corpus.texts]
    assert f"vocabulary 300, eod {eos} appended" in printed
    copy = AutoTokenizer.from_pretrained(f"{prefix}_tokenizer")
    assert copy(corpus.texts[0]).input_ids == tokenizer(corpus.texts[0]).input_ids
    flags = corpus.train_flags(printed)
    assert flags == ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                     f"{prefix}_tokenizer", "--data-path", f"{prefix}_text_document",
                     "--split", "100,0,0", "--eval-iters", "0"]
    output = _train(tmp_path / "run", flags)
    assert "padded vocab (size: 300) with 84 dummy tokens (new size: 384)" in output
    assert " iteration        4/       4 |" in output and _validation_losses(output) == {}
