"""The tokenizer a corpus is written with: Megatron's own tokenizer classes, and SentencePiece
training on the corpus.

Documents are tokenized by the object Megatron's ``build_tokenizer`` returns for
``--tokenizer-type SentencePieceTokenizer`` or ``HuggingFaceTokenizer`` with Megatron's
default tokenizer settings, the object training builds from the same flags. So the ids in
the dataset, the end-of-document id appended to each document and the vocabulary size are the
ones training sees (its ``eod`` is what ``GPTDataset`` masks and resets at with
``--eod-mask-loss`` and ``--reset-position-ids``):

- SentencePiece: the model's eos piece (``</s>``, id 2 in a model trained here);
- Hugging Face: the tokenizer's ``eos_token`` (a tokenizer without one has no ``eod``; with
  ``--append-eod``, the default, it is refused).
"""

import argparse
import dataclasses
import io
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

SENTENCEPIECE = "SentencePieceTokenizer"
HUGGING_FACE = "HuggingFaceTokenizer"
MODEL_FLAGS = {SENTENCEPIECE: "--sentencepiece-model", HUGGING_FACE: "--hf-tokenizer"}
TRAIN_FLAG = "--train-sentencepiece"
# Megatron's defaults: the embedding is padded to a multiple of this times TP.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128

# SentencePiece training, chosen so that any text round-trips (decode(encode(text)) == text)
# and the same corpus gives the same model on any machine.
SENTENCEPIECE_OPTIONS = dict(
    byte_fallback=True,                  # characters outside the vocabulary become UTF-8 bytes
    normalization_rule_name="identity",  # no NFKC folding of the text
    remove_extra_whitespaces=False,      # runs of spaces and indentation kept
    add_dummy_prefix=False,              # no space added before each document
    allow_whitespace_only_pieces=True,   # indentation gets pieces of its own
    split_digits=True,                   # numbers digit by digit
    character_coverage=0.9995,           # SentencePiece's default: rarest characters as bytes
    input_sentence_size=2_000_000,       # at most this many lines, sampled with the seed
    shuffle_input_sentence=True,
    num_threads=8,                       # fixed: the model does not depend on the machine
    minloglevel=2,                       # warnings and errors only
)
# Training lines longer than this are cut (SentencePiece drops lines over its byte limit).
TRAINING_LINE_CHARS = 2048
SENTENCEPIECE_TYPES = ("bpe", "unigram")


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """What Megatron builds the tokenizer from: --tokenizer-type and --tokenizer-model."""

    tokenizer_type: str
    model: str

    def training_flags(self) -> Tuple[str, ...]:
        return "--tokenizer-type", self.tokenizer_type, "--tokenizer-model", self.model


def _tokenizer_args(spec: TokenizerSpec) -> argparse.Namespace:
    """Megatron's tokenizer arguments at their defaults, as a launch without tokenizer flags
    other than --tokenizer-type and --tokenizer-model has them."""
    from megatron.training.config.training_config import TokenizerConfig

    args = argparse.Namespace(**{field.name: field.default
                                 for field in dataclasses.fields(TokenizerConfig)})
    args.tokenizer_type, args.tokenizer_model = spec.tokenizer_type, spec.model
    args.pad_vocab_size = False  # the padding is training's business; said in the end message
    return args


def megatron_tokenizer(spec: TokenizerSpec):
    """The tokenizer training builds from the spec's flags."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    return build_tokenizer(_tokenizer_args(spec))


def end_of_document(tokenizer) -> Optional[int]:
    """Megatron's ``eod`` of the tokenizer, None where it has none."""
    try:
        eod = tokenizer.eod
    except (AttributeError, NotImplementedError):
        return None
    return eod if isinstance(eod, int) and 0 <= eod < tokenizer.vocab_size else None


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1,
                      divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """The embedding rows Megatron makes for the vocabulary (its vocab_size_with_padding)."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    args = argparse.Namespace(make_vocab_size_divisible_by=divisible_by,
                              tensor_model_parallel_size=tensor_parallel, rank=0)
    return vocab_size_with_padding(vocab_size, args, logging_enabled=False)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_tokenizer(spec: TokenizerSpec, flag: str, needs_eod: bool):
    """(tokenizer, eod) for the spec, given by ``flag``. ValueError naming the flag for a
    path that is not there, a tokenizer that does not load, and a missing end-of-document
    token when documents get one."""
    path = Path(spec.model)
    if spec.tokenizer_type == SENTENCEPIECE:
        what = "a SentencePiece .model file"
        if not path.is_file():
            raise ValueError(f"{flag} {path}: no such file; allowed: {what}.")
    else:
        what = ("a Hugging Face tokenizer directory (tokenizer.json or a slow tokenizer's "
                "files, with tokenizer_config.json), read offline")
        if not path.is_dir():
            raise ValueError(f"{flag} {path}: not a directory; allowed: {what}.")
    try:
        tokenizer = megatron_tokenizer(spec)
        eod = end_of_document(tokenizer)
    except Exception as error:  # whatever the library raises for a file it cannot read
        raise ValueError(f"{flag} {path}: does not load as a {spec.tokenizer_type} "
                         f"({_first_line(error)}); allowed: {what}.") from None
    if needs_eod and eod is None:
        token = "an eos piece" if spec.tokenizer_type == SENTENCEPIECE else "an eos_token"
        raise ValueError(f"{flag} {path}: the tokenizer has no end-of-document token (Megatron "
                         f"reads {token} as eod); allowed: a tokenizer with one, or "
                         "--no-append-eod.")
    return tokenizer, eod


def save_hugging_face(directory: Path, destination: Path) -> None:
    """The tokenizer files of ``directory`` (not the model's weights) written to
    ``destination`` by transformers itself."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(destination))


def training_lines(text: str, max_chars: int = TRAINING_LINE_CHARS) -> Iterator[str]:
    """The text's lines with their newline, long ones cut into pieces of ``max_chars``: what
    SentencePiece trains on (it samples lines, and skips lines over its length limit)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        for piece in range(start, end, max_chars):
            yield text[piece:min(piece + max_chars, end)]
        start = end


def _sentencepiece_message(error: BaseException) -> str:
    """SentencePiece's message without its source location ("Internal: src/x.cc(12) [a] ")."""
    return re.sub(r"^.*?\.cc\(\d+\)\s*(\[[^\]]*\]\s*)?", "", _first_line(error)).strip()


class _TrainingLines:
    """The lines SentencePiece trains on. An error while reading the texts (a bad JSON line)
    ends the lines and is kept, to be raised as itself after SentencePiece stops (raised
    inside its iterator it would come back as SentencePiece's RuntimeError)."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.error: Optional[Exception] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self.texts:
                yield from training_lines(text)
        except Exception as error:
            self.error = error


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str,
                        seed: int) -> bytes:
    """A SentencePiece model (its bytes) of ``vocab_size`` pieces trained on the texts'
    lines with SENTENCEPIECE_OPTIONS; ValueError naming --train-sentencepiece when
    SentencePiece refuses (a vocabulary too small for the bytes and characters, or larger
    than the corpus gives)."""
    import sentencepiece

    lines = _TrainingLines(texts)
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, max_sentence_length=4 * TRAINING_LINE_CHARS,
            **SENTENCEPIECE_OPTIONS)
    except RuntimeError as error:
        if lines.error is not None:
            raise lines.error from None
        raise ValueError(f"{TRAIN_FLAG} {vocab_size}: SentencePiece refused "
                         f"({_sentencepiece_message(error) or 'no text to train on'}); "
                         "allowed: a vocabulary this corpus supports.") from None
    if lines.error is not None:
        raise lines.error
    return model.getvalue()
