"""Preprocessed SFT data on disk (megatron-core indexed format) and the samples source over it.

``tools/preprocess_sft_data.py --output-prefix P`` writes, per data set::

    P_tokens.bin/.idx      token ids, one sequence per sample (IndexedDataset, the smallest
                           dtype for the vocabulary: uint16 below 65500 ids, else int32)
    P_lossmask.bin/.idx    uint8 loss flags, aligned with the ids (1 = response token or EOS)
    P_loss_counts.npy      int32 [num_samples]: flagged tokens after the first of each sample
                           (= its loss-carrying targets untruncated; lets loading skip the .bin)
    P.json                 sidecar: tokenizer (type, model, vocab size, fingerprint), data
                           format, keys, counts of skipped lines, tool version; written last

Samples are stored *before* the over-long policy, so one preprocessed set serves every
``seq_length``: :class:`IndexedSamples` applies ``truncate``/``drop`` and the no-loss rule at
load time exactly like :func:`megatron_deft.data.sft_dataset.tokenize_samples`, and then behaves
like :class:`TokenizedSamples` (``lengths``, ``loss_token_counts``, ``sample(k)``) for
packing and :class:`SFTDataLoader`. Opening maps the files and reads only the index and the
per-sample counts (O(num_samples) small integers); token data is read from the page cache
one sample at a time as rows are built, so resident memory does not grow with the data size.
"""

import hashlib
import json
import os
from typing import Dict, Tuple

import numpy as np

from megatron_deft.data.chat_format import ChatTemplateError, tokenize_conversation
from megatron_deft.data.jsonl import DataError
from megatron_deft.data.tokenizer import Tokenizer

FORMAT_NAME = "megatron-deft-sft-indexed"
FORMAT_VERSION = 1
TOKENS_SUFFIX = "_tokens"
LOSSMASK_SUFFIX = "_lossmask"
LOSS_COUNTS_SUFFIX = "_loss_counts.npy"

# Fixed probe inputs: two tokenizers that encode them identically (ids, special ids, vocab size,
# chat template masks) are treated as the same tokenizer, wherever their files live.
_PROBE_TEXT = (
    "The quick brown fox jumps over 13 lazy dogs; naive cafe, naïve café, 東京, Ελλάδα, 🙂!\n"
    "\tdef f(x):\n\t\treturn x ** 2  # 3.14159, 1e-5, $42.00, <|user|> </s> <s>"
)
_PROBE_CONVERSATION = (
    ("system", "You are terse."),
    ("user", "What is 12 + 30? Answer with a number."),
    ("assistant", "42"),
    ("user", "And 1 + 1?"),
    ("assistant", "2, of course."),
)


def payload_paths(prefix: str) -> Dict[str, str]:
    """Every file of a preprocessed set, by role; the sidecar (``json``) is the last written."""
    paths = {"json": prefix + ".json", "loss_counts": prefix + LOSS_COUNTS_SUFFIX}
    for role, suffix in (("tokens", TOKENS_SUFFIX), ("lossmask", LOSSMASK_SUFFIX)):
        paths[role + "_bin"] = prefix + suffix + ".bin"
        paths[role + "_idx"] = prefix + suffix + ".idx"
    return paths


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Hex digest of how ``tokenizer`` encodes a fixed text and conversation (with loss flags),
    plus its vocabulary size and special ids. Independent of file paths and mtimes."""
    conversations = []
    # Without the system turn too: some chat templates reject system messages.
    for probe in (_PROBE_CONVERSATION, _PROBE_CONVERSATION[1:]):
        try:
            ids, flags = tokenize_conversation(probe, tokenizer)
            conversations.append([[int(i) for i in ids], [bool(f) for f in flags]])
        except ChatTemplateError as error:
            conversations.append(str(error))
    payload = {
        "vocab_size": int(tokenizer.vocab_size),
        "special": [tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id],
        "text": [int(i) for i in tokenizer.encode(_PROBE_TEXT)],
        "conversations": conversations,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def tokenizer_description(tokenizer_type: str, tokenizer_model: str, tokenizer) -> Dict:
    """The sidecar's ``tokenizer`` entry."""
    return {
        "type": tokenizer_type,
        "model": os.path.abspath(tokenizer_model) if tokenizer_model else None,
        "vocab_size": int(tokenizer.vocab_size),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def read_sidecar(prefix: str) -> Dict:
    """The validated sidecar of a preprocessed set; clear errors for missing or foreign files."""
    paths = payload_paths(prefix)
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise DataError(
            prefix,
            None,
            f"is not a complete preprocessed data set: missing {', '.join(missing)} "
            "(make it with tools/preprocess_sft_data.py --output-prefix PREFIX)",
            reason="missing_file",
        )
    try:
        with open(paths["json"], encoding="utf-8") as handle:
            sidecar = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(paths["json"], None, f"unreadable sidecar: {error}", "invalid") from error
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT_NAME:
        raise DataError(paths["json"], None, f"is not a {FORMAT_NAME} sidecar", "invalid")
    if sidecar.get("version") != FORMAT_VERSION:
        raise DataError(
            paths["json"],
            None,
            f"has format version {sidecar.get('version')}, this code reads version "
            f"{FORMAT_VERSION}: re-run tools/preprocess_sft_data.py",
            reason="invalid",
        )
    return sidecar


def check_tokenizer(prefix: str, sidecar: Dict, tokenizer_type: str, tokenizer) -> None:
    """Refuses token ids that were made by a different tokenizer than this run's."""
    stored = sidecar["tokenizer"]
    # The type is only reported: a converted tokenizer that encodes identically is the same one.
    mine = {
        "vocab_size": int(tokenizer.vocab_size),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }
    if any(stored[key] != mine[key] for key in mine):
        raise DataError(
            prefix + ".json",
            None,
            f"was preprocessed with tokenizer {stored['type']} {stored['model']} "
            f"(vocab {stored['vocab_size']}, fingerprint {stored['fingerprint']}) but this run "
            f"uses {tokenizer_type} (vocab {mine['vocab_size']}, fingerprint "
            f"{mine['fingerprint']}); its token ids would be meaningless. Pass the same "
            "--tokenizer-type/--tokenizer-model or re-run tools/preprocess_sft_data.py",
            reason="tokenizer_mismatch",
        )


class IndexedSamples:
    """Memory-mapped preprocessed samples with the over-long policy applied (see module doc).

    Kept sample ``k`` is stored sample ``kept[k]`` cut to ``lengths[k] <= seq_length`` tokens.
    """

    def __init__(self, prefix: str, seq_length: int, overlong: str = "truncate"):
        # megatron.core costs seconds to import; only binary data sets pay for it.
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={overlong!r} is not one of truncate, drop")
        self.prefix, self.seq_length = prefix, seq_length
        self.sidecar = read_sidecar(prefix)
        self._tokens = IndexedDataset(prefix + TOKENS_SUFFIX, mmap=True)
        self._flags = IndexedDataset(prefix + LOSSMASK_SUFFIX, mmap=True)
        full_lengths = self._tokens.sequence_lengths.astype(np.int64)
        full_loss = np.load(prefix + LOSS_COUNTS_SUFFIX, mmap_mode="r")
        self._check_consistent(full_lengths, full_loss)
        self.kept, self.lengths, self.loss_token_counts, self.counts = self._apply_policy(
            full_lengths, np.asarray(full_loss, dtype=np.int64), overlong
        )
        # Preprocessed sets carry no token classes (--token-class-key needs JSONL input).
        self.classes, self.class_names = np.full(len(self.kept), -1, dtype=np.int32), ()

    def __len__(self) -> int:
        return len(self.kept)

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [n], loss_flags bool [n])`` of kept sample ``index``."""
        stored, length = int(self.kept[index]), int(self.lengths[index])
        ids = self._tokens.get(stored, 0, length).astype(np.int32)
        return ids, self._flags.get(stored, 0, length).astype(bool)

    def _apply_policy(self, full_lengths: np.ndarray, full_loss: np.ndarray, overlong: str):
        """Mirrors ``tokenize_samples``: an over-long sample is dropped (counted) or truncated
        (counted), then a sample whose targets carry no loss is dropped (counted)."""
        over = full_lengths > self.seq_length
        loss = full_loss.copy()
        if overlong == "drop":
            keep = ~over
        else:
            keep = np.ones(len(full_lengths), dtype=bool)
            for stored in np.flatnonzero(over):  # only truncated samples are read
                flags = self._flags.get(int(stored), 0, self.seq_length)
                loss[stored] = int(np.count_nonzero(flags[1:]))
        no_loss = keep & (loss == 0)
        keep &= ~no_loss
        kept = np.flatnonzero(keep)
        lengths = np.minimum(full_lengths[kept], self.seq_length)
        counts = dict(
            num_truncated=int(over.sum()) if overlong == "truncate" else 0,
            num_dropped_overlong=int(over.sum()) if overlong == "drop" else 0,
            num_dropped_no_loss=int(no_loss.sum()),
            num_samples=len(kept),
            num_tokens=int(lengths.sum()),
            num_loss_tokens=int(loss[kept].sum()),
        )
        return kept, lengths, loss[kept], counts

    def _check_consistent(self, full_lengths: np.ndarray, full_loss: np.ndarray) -> None:
        """Catches partial copies and files from different runs without reading the .bin."""
        paths = payload_paths(self.prefix)
        expected = int(self.sidecar["num_samples"])
        sizes = {
            "tokens": len(self._tokens),
            "lossmask": len(self._flags),
            "loss_counts": len(full_loss),
        }
        num_tokens = int(full_lengths.sum())
        byte_sizes = {
            paths["tokens_bin"]: num_tokens * self._tokens.index.dtype_size,
            paths["lossmask_bin"]: num_tokens,
        }
        problems = [f"{role} has {n} samples" for role, n in sizes.items() if n != expected]
        problems += [
            f"{path} has {os.path.getsize(path)} bytes, expected {size}"
            for path, size in byte_sizes.items()
            if os.path.getsize(path) != size
        ]
        if not np.array_equal(self._flags.sequence_lengths, self._tokens.sequence_lengths):
            problems.append("token and loss-mask sequence lengths differ")
        if problems:
            raise DataError(
                self.prefix,
                None,
                f"inconsistent preprocessed data set (sidecar says {expected} samples): "
                + "; ".join(problems)
                + ". Re-run tools/preprocess_sft_data.py",
                reason="invalid",
            )
