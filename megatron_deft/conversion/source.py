"""The record of the Hugging Face model a checkpoint descends from, carried to its export.

Export writes the model a user converted, however long it was trained in between: the same
``architectures`` class (a Mistral stays MistralForCausalLM), the source's config.json fields
we do not own (token ids, initializer range, ...), its tokenizer files and generation config.
All of that is one record in the checkpoint's common state::

    hf_source = {"config": {...config.json of the source...},
                 "files": {"tokenizer.json": b"...", "generation_config.json": b"...", ...}}

written by the converter, read back by the trainer from the checkpoint it loads (--load,
--pretrained-checkpoint, a resume from its own --save) and written into every checkpoint it
saves; absent (None) for models that never came from Hugging Face.

Why the files travel inside every checkpoint's common state, not in a folder beside them: each
``iter_N`` then is complete on its own and published by the same atomic rename as its weights
(no second thing to write atomically, clean up or find); a resumed run needs neither
--pretrained-checkpoint nor the converted directory, which may be long gone; a run saving into a
new --save directory carries the record along; and export of any iteration finds it. The cost
is a few MB (a 128k-token tokenizer.json is ~9 MB) in each common.pt and in the broadcast of the
common state dist_checkpointing makes at each save to check the ranks agree, beside GBs of
weights.
"""

import os
from typing import Iterable, Optional

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
"""Files of a Hugging Face tokenizer (whichever of them a model ships)."""

GENERATION_CONFIG = "generation_config.json"
"""Generation defaults (EOS ids, sampling settings) of the model; not a tokenizer file."""

RECORDED_FILES = TOKENIZER_FILES + (GENERATION_CONFIG,)

KEY = "hf_source"
"""The record's key in a checkpoint's common state."""


def read_files(directory: str, names: Iterable[str] = RECORDED_FILES) -> dict:
    """{name: bytes} of the files ``names`` present in ``directory``."""
    files = {}
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                files[name] = handle.read()
    return files


def source_record(hf_dir: str, hf_config: dict) -> dict:
    """The record of the Hugging Face model in ``hf_dir`` (its parsed config.json given)."""
    return {"config": hf_config, "files": read_files(hf_dir)}


def write_files(files: dict, directory: str, names: Iterable[str]) -> list:
    """Write the ``files`` ({name: bytes}) among ``names`` into ``directory`` (created only when
    there is one to write); returns their names."""
    written = [name for name in names if name in files]
    if written:
        os.makedirs(directory, exist_ok=True)
    for name in written:
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(files[name])
    return written


def record_of(common: dict, root: str) -> Optional[dict]:
    """The record in a checkpoint's common state (``root`` is its checkpoint root). Checkpoints
    converted before the record existed kept the source's config.json as ``hf_config`` and its
    tokenizer files in ``root/tokenizer/``."""
    if KEY in common:
        return common[KEY]
    if "hf_config" in common:
        return {"config": common["hf_config"], "files": read_files(os.path.join(root, "tokenizer"))}
    return None


def checkpoint_record(root: str) -> Optional[dict]:
    """The record of the checkpoint the tracker under ``root`` names (what a run loads)."""
    from megatron.core import dist_checkpointing

    from megatron_deft.training.checkpointing import existing_checkpoint_dir, read_tracker

    directory = existing_checkpoint_dir(root, read_tracker(root))
    return record_of(dist_checkpointing.load_common_state_dict(directory), root)
