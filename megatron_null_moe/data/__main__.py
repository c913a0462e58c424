"""Tokenize a corpus into Megatron's indexed dataset, the input of --data-path (CPU).

    python -m megatron_null_moe.data --input corpus.jsonl notes/ --input-glob '*.md' \
        --train-sentencepiece 32000 --output-prefix data/corpus \
        --validation-fraction 0.01 --workers 8

writes ``data/corpus_text_document.bin/.idx`` (training), ``data/corpus_valid_text_document``
(the held-out documents) and ``data/corpus.model`` (the tokenizer), all or nothing, and ends
with the flags to train with. What Megatron-LM's ``tools/preprocess_data.py`` does, which the
megatron-core wheel does not ship; docs/data.md says what each option does.
"""

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_null_moe.cli import quiet_if_command

quiet_if_command(__name__)  # before Megatron is imported: its notices fire at import

from megatron_null_moe.cli import refusals_as_errors  # noqa: E402
from megatron_null_moe.data import encoding, readers, tokenizers, validation, writer  # noqa: E402
from megatron_null_moe.data.tokenizers import (  # noqa: E402
    HUGGING_FACE,
    SENTENCEPIECE,
    TokenizerSpec,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_null_moe.data",
        description="Tokenize JSONL and plain-text files into Megatron's indexed dataset "
                    "(.bin/.idx), the input of --data-path, and print the flags to train "
                    "with.")
    parser.add_argument("--input", type=Path, nargs="+", required=True, metavar="PATH",
                        help="JSONL files (suffix .jsonl or .json: one JSON object per line, "
                             "each line one document), plain-text files (any other suffix: "
                             "each file one document, UTF-8) and folders (their files, "
                             "recursively, sorted, by the same rule; hidden files and folders "
                             "left out, files that are not UTF-8 text skipped and counted).")
    parser.add_argument("--input-glob", nargs="+", default=None, metavar="PATTERN",
                        help="read only the files in folders whose name matches one of the "
                             "patterns, e.g. '*.py' '*.md' (files named directly are always "
                             "read).")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="the keys of each JSON line that hold the text, each written to "
                             "a dataset of its own, PREFIX_KEY_document (default: text); "
                             "plain-text files go to the one key there is.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sentencepiece-model", type=Path, metavar="FILE",
                        help="tokenize with this SentencePiece model (train with "
                             "--tokenizer-type SentencePieceTokenizer); it is copied to "
                             "PREFIX.model.")
    source.add_argument("--hf-tokenizer", type=Path, metavar="DIR",
                        help="tokenize with this Hugging Face tokenizer directory, read "
                             "offline with transformers' AutoTokenizer (train with "
                             "--tokenizer-type HuggingFaceTokenizer); its tokenizer files are "
                             "written to PREFIX_tokenizer/.")
    source.add_argument("--train-sentencepiece", type=int, metavar="VOCAB",
                        help="train a SentencePiece model of VOCAB pieces on the input first "
                             "(byte fallback, so any text round-trips; no normalization; "
                             "spaces kept; digits split; seeded; docs/data.md lists every "
                             "option) and write it to PREFIX.model.")
    parser.add_argument("--sentencepiece-type", choices=tokenizers.SENTENCEPIECE_TYPES,
                        default=None,
                        help="with --train-sentencepiece: bpe (default; fast) or unigram.")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seeds the SentencePiece training's sample of lines and the draw "
                             "of held-out documents (default 1234).")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the tokenizer's end-of-document token, Megatron's eod "
                             "(SentencePiece: its eos piece; Hugging Face: its eos_token), to "
                             "each document (default: on).")
    parser.add_argument("--validation-fraction", type=float, default=0.0, metavar="F",
                        help="hold out round(F x documents), at least one, drawn with --seed, "
                             "in PREFIX_valid_KEY_document (train with --train-data-path and "
                             "--valid-data-path); default 0: all training, --data-path with "
                             "--split 100,0,0 --eval-iters 0 (Megatron's --split, contiguous "
                             "ranges of documents, is the other way).")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX_KEY_document.bin and .idx (Megatron-LM's names) "
                             "and the tokenizer beside them, all or nothing, in an existing "
                             "folder.")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that exist (refused otherwise).")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes (default 1: no pool); the output does not "
                             "depend on N.")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refusals of option combinations argparse does not know."""
    if args.sentencepiece_type is not None and args.train_sentencepiece is None:
        raise ValueError(f"--sentencepiece-type {args.sentencepiece_type} applies to "
                         "--train-sentencepiece; allowed: --train-sentencepiece VOCAB with "
                         "it, or no --sentencepiece-type.")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: allowed: 1 or more processes.")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise ValueError(f"--json-keys {' '.join(args.json_keys)}: a key named twice; "
                         "allowed: distinct keys.")
    validation.check_fraction(args.validation_fraction)


def tokenizer_type(args: argparse.Namespace) -> str:
    return HUGGING_FACE if args.hf_tokenizer is not None else SENTENCEPIECE


def tokenizer_output(args: argparse.Namespace) -> Path:
    """PREFIX.model for SentencePiece, the folder PREFIX_tokenizer for Hugging Face."""
    suffix = "_tokenizer" if tokenizer_type(args) == HUGGING_FACE else ".model"
    return Path(args.output_prefix + suffix)


def dataset_prefixes(args: argparse.Namespace) -> List[Tuple[str, str, bool]]:
    """(prefix, key, held out) of every dataset written."""
    held = (False, True) if args.validation_fraction > 0 else (False,)
    return [(validation.dataset_prefix(args.output_prefix, key, held_out), key, held_out)
            for held_out in held for key in args.json_keys]


def prepare_tokenizer(args: argparse.Namespace, files: Sequence[readers.InputFile],
                      staged: Optional[Path]):
    """(spec the workers load, tokenizer, eod): trained on the input, or loaded and
    checked, and written to the staged output (None: the output is the given model)."""
    if args.train_sentencepiece is not None:
        texts = (text for document in readers.raw_documents(files)
                 for text in readers.document_texts(document, args.json_keys))
        say(f"training a SentencePiece model ({args.sentencepiece_type or 'bpe'}, "
            f"{args.train_sentencepiece} pieces) on the input")
        staged.write_bytes(tokenizers.train_sentencepiece(
            texts, args.train_sentencepiece, args.sentencepiece_type or "bpe", args.seed))
        spec, flag = TokenizerSpec(SENTENCEPIECE, str(staged)), tokenizers.TRAIN_FLAG
    elif args.sentencepiece_model is not None:
        spec = TokenizerSpec(SENTENCEPIECE, str(args.sentencepiece_model))
        flag = tokenizers.MODEL_FLAGS[SENTENCEPIECE]
    else:
        spec = TokenizerSpec(HUGGING_FACE, str(args.hf_tokenizer))
        flag = tokenizers.MODEL_FLAGS[HUGGING_FACE]
    tokenizer, eod = tokenizers.load_tokenizer(spec, flag, args.append_eod)
    if staged is not None and args.sentencepiece_model is not None:
        shutil.copyfile(args.sentencepiece_model, staged)
    elif staged is not None and args.hf_tokenizer is not None:
        tokenizers.save_hugging_face(args.hf_tokenizer, staged)
    return spec, tokenizer, eod


def say(message: str) -> None:
    """A note on stderr while the command works, where someone watches (a terminal)."""
    if sys.stderr.isatty():
        print(f"{message} ...", file=sys.stderr, flush=True)


def _progress(encoded, total: int):
    try:
        from tqdm import tqdm  # installed with transformers and huggingface_hub
    except ImportError:
        return encoded
    return tqdm(encoded, total=total, unit=" documents", desc="tokenizing", file=sys.stderr,
                disable=None)  # None: off where stderr is not a terminal


def refuse_empty(counts: Dict[str, writer.DatasetCount], prefixes, args) -> None:
    """Every dataset has a document with tokens, or nothing is written."""
    for prefix, key, held_out in prefixes:
        if counts[prefix].documents:
            continue
        if held_out:
            raise ValueError(f"--validation-fraction {args.validation_fraction}: the held-out "
                             f"documents have no tokens under {key!r}, so {prefix} would be "
                             "empty; allowed: a larger fraction or another --seed.")
        raise ValueError(f"--input {' '.join(map(str, args.input))}: no tokens under {key!r} "
                         f"(every document's text is empty), so {prefix} would be empty; "
                         "allowed: documents with text.")


def prepare(args: argparse.Namespace) -> dict:
    """Check, tokenize and write; returns the report."""
    started = time.perf_counter()
    check_arguments(args)
    files = readers.input_files(args.input, args.input_glob)
    readers.refuse_plain_text_with_several_keys(files, args.json_keys)
    prefixes = dataset_prefixes(args)
    outputs = [Path(prefix + suffix) for prefix, _, _ in prefixes for suffix in (".bin", ".idx")]
    model_output = tokenizer_output(args)
    given = args.sentencepiece_model
    keep_given = given is not None and model_output.resolve() == given.resolve()
    outputs += [] if keep_given else [model_output]  # --sentencepiece-model PREFIX.model
    writer.refuse_existing(args.output_prefix, outputs, args.overwrite)
    num_documents = readers.count_documents(files)
    if num_documents == 0:
        raise ValueError(f"--input {' '.join(map(str, args.input))}: no documents (empty files "
                         "and blank lines only); allowed: files with text.")
    held_out = validation.held_out_indices(num_documents, args.validation_fraction, args.seed)
    skipped: List[Path] = []
    empty = 0
    with writer.staged(outputs) as staging:
        spec, tokenizer, eod = prepare_tokenizer(args, files, staging.get(model_output))
        dtype = writer.dataset_dtype(tokenizer.vocab_size)
        datasets = writer.IndexedDatasets([prefix for prefix, _, _ in prefixes], staging, dtype)
        settings = encoding.EncodingSettings(spec, tuple(args.json_keys), args.append_eod,
                                             dtype.name)
        encoded = encoding.encoded_documents(readers.raw_documents(files, skipped), settings,
                                             args.workers)
        for document in _progress(encoded, num_documents):
            held = document.index in held_out
            for key, tokens in zip(args.json_keys, document.tokens):
                prefix = validation.dataset_prefix(args.output_prefix, key, held)
                empty += not datasets.add(prefix, tokens)
        counts = dict(datasets.finalize())
        refuse_empty(counts, prefixes, args)
    final = TokenizerSpec(spec.tokenizer_type, str(model_output))
    return {
        "documents": num_documents - len(skipped),
        "tokens": sum(count.tokens for count in counts.values()),
        "datasets": [(prefix, counts[prefix]) for prefix, _, _ in prefixes],
        "empty_documents": empty, "skipped_files": skipped,
        "tokenizer": final, "vocab_size": tokenizer.vocab_size, "eod": eod,
        "padded_vocab_size": tokenizers.padded_vocab_size(tokenizer.vocab_size),
        "dtype": dtype.name,
        "train_flags": {key: final.training_flags() + validation.data_flags(
            validation.dataset_prefix(args.output_prefix, key),
            validation.dataset_prefix(args.output_prefix, key, True) if held_out else None)
            for key in args.json_keys},
        "seconds": time.perf_counter() - started,
    }


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def summary(report: dict, args: argparse.Namespace) -> List[str]:
    """What the end of a run prints: counts and time, what was left out, the tokenizer, the
    flags to train with."""
    datasets = "; ".join(f"{prefix} ({_count(count.documents, 'document')}, "
                         f"{_count(count.tokens, 'token')})"
                         for prefix, count in report["datasets"])
    lines = [f"tokenized {_count(report['documents'], 'document')} into "
             f"{_count(report['tokens'], 'token')} in {report['seconds']:.1f} s with "
             f"{_count(args.workers, 'worker')}: {datasets}"]
    left_out = []
    if report["empty_documents"]:
        left_out.append(f"{_count(report['empty_documents'], 'document')} without tokens")
    if report["skipped_files"]:
        left_out.append(f"{_count(len(report['skipped_files']), 'file')} in folders that "
                        f"{'is' if len(report['skipped_files']) == 1 else 'are'} not UTF-8 "
                        f"text (first: {report['skipped_files'][0]})")
    if left_out:
        lines.append(f"left out: {'; '.join(left_out)}")
    eod = f"eod {report['eod']}" + (" appended to each document" if args.append_eod else
                                    " (not appended: --no-append-eod)")
    if report["eod"] is None:
        eod = "no eod (not appended: --no-append-eod)"
    lines.append(f"tokenizer: {report['tokenizer'].model} ({report['tokenizer'].tokenizer_type}, "
                 f"vocabulary {report['vocab_size']:,}, {eod}; token ids stored as "
                 f"{report['dtype']}; Megatron pads the embedding to "
                 f"{report['padded_vocab_size']:,} rows at TP 1 with its default "
                 f"--make-vocab-size-divisible-by {tokenizers.MAKE_VOCAB_SIZE_DIVISIBLE_BY})")
    several = len(report["train_flags"]) > 1
    for key, flags in report["train_flags"].items():
        lines.append(f"train with{f' ({key})' if several else ''}: {shlex.join(flags)}")
    return lines


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with refusals_as_errors(parser.prog):
        report = prepare(args)
    for line in summary(report, args):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
