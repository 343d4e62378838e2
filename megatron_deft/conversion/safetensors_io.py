"""Streaming access to Hugging Face safetensors checkpoints: one tensor in memory at a time.

Reading: ``model.safetensors`` or the shards of ``model.safetensors.index.json``; files are
memory-mapped (``safe_open``), a tensor is materialised only when asked for.
Writing: tensors are buffered up to ``max_shard_bytes`` then written as one shard, so the
writer holds at most one shard; names follow HF (``model-00001-of-00003.safetensors``) with an
index when there is more than one shard.
"""

import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_deft.conversion.hf_config import ConversionError

logger = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFTensorReader:
    """{tensor name: file} of a checkpoint dir; tensors are read one at a time on demand."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                self.file_of = dict(json.load(handle)["weight_map"])
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            with safe_open(os.path.join(hf_dir, SINGLE), framework="pt") as handle:
                self.file_of = {name: SINGLE for name in handle.keys()}
        else:
            raise ConversionError(
                f"{hf_dir}: no {SINGLE} or {INDEX} (only safetensors checkpoints are supported)"
            )
        self._handles = {}

    def _handle(self, name: str):
        if name not in self.file_of:
            raise ConversionError(f"{self.hf_dir}: missing tensor {name}")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.hf_dir, file), framework="pt")
        return self._handles[file]

    def check(self, name: str, expected_shape: tuple) -> None:
        """Raise naming the tensor, its file and both shapes unless it has ``expected_shape``."""
        shape = tuple(self._handle(name).get_slice(name).get_shape())
        if shape != tuple(expected_shape):
            raise ConversionError(
                f"{os.path.join(self.hf_dir, self.file_of[name])}: tensor {name} has shape "
                f"{list(shape)}, config.json implies {list(expected_shape)}"
            )

    def read(self, name: str, expected_shape: tuple) -> torch.Tensor:
        self.check(name, expected_shape)
        return self._handle(name).get_tensor(name)

    def unused(self, used: set) -> list:
        return sorted(n for n in self.file_of if n not in used and not n.endswith(IGNORED_SUFFIXES))


class ShardWriter:
    """Buffers tensors and writes HF safetensors shards of at most ``max_shard_bytes``."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._buffer, self._buffer_bytes = {}, 0
        self._shards = []  # [(temporary file name, [tensor names])]
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, os.path.join(self.out_dir, file), metadata={"format": "pt"})
        self._shards.append((file, list(self._buffer)))
        logger.info(f"wrote shard {len(self._shards)} ({self.total_bytes / 2**30:.2f} GiB so far)")
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list:
        """Write the last shard, give shards their final names (+ index); returns the files."""
        if self._buffer:
            self._flush()
        count = len(self._shards)
        final = (
            [SINGLE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for (temp, names), name in zip(self._shards, final):
            os.rename(os.path.join(self.out_dir, temp), os.path.join(self.out_dir, name))
            weight_map.update({tensor: name for tensor in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.out_dir, INDEX), "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2)
        return final
