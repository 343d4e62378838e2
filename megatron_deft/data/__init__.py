"""SFT data pipeline: JSONL/Parquet -> conversations -> tokens + loss flags -> (packed) rows ->
batches.

Modules, in pipeline order:
    config       RecordFormat, TokenizerConfig, DataConfig: the settings (one field per --flag)
    sources      record files by suffix: JSONL lines, Parquet rows (batched); DataError
    jsonl        reading, format detection, file:line / file:row N errors
    tokenizer    Tokenizer protocol, SentencePiece / local Hugging Face, build_tokenizer
    chat_format  conversation -> ids + loss flags (HF chat template or the built-in one)
    sft_dataset  all samples tokenized, over-long policy applied and counted
    cache        optional on-disk cache of tokenized splits (--data-cache-dir)
    packing      samples -> rows of seq_length (best-fit decreasing), row layout
    batch        rows -> micro-batch dict (attention mask, cu_seqlens); unpack_batch
    loader       seeded, resumable global-batch order; DP slicing; state_dict
    builder      build_sft_data(data, records, tokenizer, ...) -> SFTData, the trainer's entry point
    indexed      preprocessed sets on disk (megatron-core .bin/.idx + sidecar), mmap samples
    preprocess   JSONL/Parquet -> preprocessed set, by workers (tools/preprocess_sft_data.py)
    blend        --data-path syntax: one set, a union, or a weighted blend of preprocessed sets
    synthetic_tasks  seeded self-checking SFT tasks (addition, reverse, sort) for quickstarts
"""

from megatron_deft.data.batch import collate_rows, unpack_batch
from megatron_deft.data.blend import parse_data_path
from megatron_deft.data.builder import SFTData, SplitReport, build_sft_data
from megatron_deft.data.chat_format import last_reply_span, tokenize_conversation
from megatron_deft.data.config import DataConfig, RecordFormat, TokenizerConfig
from megatron_deft.data.indexed import IndexedSamples
from megatron_deft.data.jsonl import DataError, read_samples
from megatron_deft.data.loader import GlobalBatch, SFTDataLoader
from megatron_deft.data.packing import IGNORE_INDEX
from megatron_deft.data.preprocess import preprocess_sft_data
from megatron_deft.data.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "DataConfig",
    "DataError",
    "GlobalBatch",
    "IGNORE_INDEX",
    "IndexedSamples",
    "RecordFormat",
    "SFTData",
    "SFTDataLoader",
    "SplitReport",
    "Tokenizer",
    "TokenizerConfig",
    "build_sft_data",
    "build_tokenizer",
    "collate_rows",
    "last_reply_span",
    "parse_data_path",
    "preprocess_sft_data",
    "read_samples",
    "tokenize_conversation",
    "unpack_batch",
]
