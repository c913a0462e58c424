"""Prepare a corpus for Megatron: text in, Megatron's indexed dataset (``.bin``/``.idx``) out.

``python -m megatron_null_moe.data`` does what Megatron-LM's ``tools/preprocess_data.py``
does, which the megatron-core wheel does not ship: JSONL files (Megatron-LM's convention, one
JSON object per line, text under ``--json-keys``) and plain-text files or folders are
tokenized by Megatron's own tokenizer classes (the ones training builds from
``--tokenizer-type``), an end-of-document token is appended to each document, and the token
ids are written through megatron-core's ``IndexedDatasetBuilder``. It can train the
SentencePiece tokenizer on the corpus first and hold documents out for validation.

The modules in the order the data flows: ``readers`` (inputs to documents), ``tokenizers``
(Megatron's tokenizer, SentencePiece training), ``encoding`` (documents to token ids, in
worker processes), ``validation`` (held-out documents, the data flags to train with),
``writer`` (the indexed datasets, written all or nothing), ``__main__`` (the command).
"""
