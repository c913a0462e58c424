"""Safetensors shards written as the tensors come, with the index transformers reads.

A safetensors file is written whole, so the writer holds at most one shard's tensors
(``max_shard_bytes``) before writing them out; the index (``model.safetensors.index.json``)
maps every name to its file.
"""

import json
import os
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


class SafetensorsShards:
    """``add`` tensors in any order (each name once); ``close`` writes the last shard and the
    index, names the files model-0000I-of-0000N.safetensors and returns the index."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: List[List[str]] = []  # the names in each written file
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        """Add ``tensor`` as ``name``, written in ``dtype``."""
        size = tensor.numel() * dtype.itemsize
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._write_pending()
        # A copy of its own: safetensors refuses tensors that share memory (views of one
        # Megatron tensor), and the source is released after its layer.
        self._pending[name] = tensor.detach().to("cpu", dtype, copy=True).contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _write_pending(self) -> None:
        path = self._file(len(self._written))
        save_file(self._pending, str(path), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o666 & ~umask)  # safetensors writes 0600; the model is to be shared
        self._written.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _file(self, index: int, count: int = 0) -> Path:
        suffix = f"-of-{count:05d}" if count else ""
        return self.directory / f"model-{index + 1:05d}{suffix}.safetensors"

    def close(self) -> dict:
        if self._pending or not self._written:
            self._write_pending()
        count, weight_map = len(self._written), {}
        for index, names in enumerate(self._written):
            final = self._file(index, count)
            self._file(index).rename(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return index
