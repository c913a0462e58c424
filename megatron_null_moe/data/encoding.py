"""Documents to token ids, in worker processes.

Each worker builds the tokenizer once (``start_worker``) and encodes whole documents
(``encode``): parse, tokenize each key's text with Megatron's tokenizer, append the
end-of-document id. The pool hands results back in input order, so the dataset does not
depend on --workers; with one worker nothing is forked.
"""

import dataclasses
import multiprocessing
import threading
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import numpy

from megatron_null_moe.cli import call_quietly
from megatron_null_moe.data.readers import RawDocument, document_texts
from megatron_null_moe.data.tokenizers import TokenizerSpec, end_of_document, megatron_tokenizer

# Documents a worker takes at a time: fewer round trips for short JSON lines, little
# imbalance for whole files.
CHUNK_SIZE = 16
# Chunks per worker read ahead of the writer.
IN_FLIGHT_CHUNKS = 8


@dataclasses.dataclass(frozen=True)
class EncodingSettings:
    """What every worker needs (picklable: sent to each worker once)."""

    tokenizer: TokenizerSpec
    keys: Tuple[str, ...]
    append_eod: bool
    dtype: str  # numpy's name of the dataset's dtype


@dataclasses.dataclass(frozen=True)
class EncodedDocument:
    """A document's token ids for each key (empty where its text has no tokens)."""

    index: int
    tokens: Tuple[numpy.ndarray, ...]


def encode_texts(tokenize, texts: Sequence[str], eod: Optional[int],
                 dtype: numpy.dtype) -> Tuple[numpy.ndarray, ...]:
    """Each text's ids, then ``eod`` (None: nothing) after a text that has tokens, as
    Megatron-LM's --append-eod does; a text without tokens stays empty."""
    encoded = []
    for text in texts:
        ids = list(tokenize(text))
        if ids and eod is not None:
            ids.append(eod)
        encoded.append(numpy.asarray(ids, dtype=dtype))
    return tuple(encoded)


# The worker's tokenizer and settings, set once per process by start_worker.
_worker: Optional[tuple] = None


def start_worker(settings: EncodingSettings) -> None:
    global _worker
    tokenizer = megatron_tokenizer(settings.tokenizer)
    eod = end_of_document(tokenizer) if settings.append_eod else None
    _worker = (tokenizer, eod, settings)


def encode(document: RawDocument) -> EncodedDocument:
    tokenizer, eod, settings = _worker
    texts = document_texts(document, settings.keys)
    return EncodedDocument(document.index, encode_texts(tokenizer.tokenize, texts, eod,
                                                        numpy.dtype(settings.dtype)))


def encoded_documents(documents: Iterable[RawDocument], settings: EncodingSettings,
                      workers: int) -> Iterator[EncodedDocument]:
    """The documents encoded, in their order, by ``workers`` processes (1: this one)."""
    if workers == 1:
        start_worker(settings)
        yield from map(encode, documents)
        return
    # The pool reads its input as fast as it can; the window keeps at most this many
    # documents read and not yet written, so a corpus larger than memory streams through.
    window = _Window(workers * CHUNK_SIZE * IN_FLIGHT_CHUNKS)
    # call_quietly: a spawned worker (macOS, Windows) imports Megatron afresh, quietly too.
    start = (f"{__name__}:{start_worker.__name__}", settings)
    with multiprocessing.Pool(workers, initializer=call_quietly, initargs=start) as pool:
        try:
            for encoded in pool.imap(encode, window.feed(documents), chunksize=CHUNK_SIZE):
                window.done()
                yield encoded
        finally:
            window.close()  # before the pool's exit, which waits for its reader thread


class _Window:
    """A bound on the documents between the pool's reader thread and the writer."""

    def __init__(self, size: int):
        self.size = size
        self.free = threading.Semaphore(size)
        self.closed = threading.Event()

    def feed(self, documents: Iterable[RawDocument]) -> Iterator[RawDocument]:
        for document in documents:
            self.free.acquire()
            if self.closed.is_set():
                return
            yield document

    def done(self) -> None:
        self.free.release()

    def close(self) -> None:
        """Let a reader waiting for room go (to stop), so that the pool can shut down."""
        self.closed.set()
        self.free.release(self.size)
