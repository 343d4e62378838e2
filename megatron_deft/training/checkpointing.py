"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist format).

Layout (Megatron-LM's)::

    SAVE/iter_0000006/                  one complete checkpoint (sharded tensors + common.pt)
    SAVE/latest_checkpointed_iteration.txt   the `latest` tracker: "6"

Contents: model (sharded, reshardable across TP/PP), optimizer (plain: per-parameter sharded
state; distributed: ``dp_reshardable``), LR scheduler, iteration, data position (rows consumed),
RNG states (per TP/PP rank), the run's config and the model's architecture (checked on load:
a mismatch with the run's flags is one line naming the flag), and the record of the Hugging Face
model the weights came from (carried from load to save, for export). Checkpoints marked
``weights_only`` (converted from Hugging Face by tools/convert_checkpoint.py) load like
--finetune: weights only, iteration 0. Weights-only loads tolerate exactly one mismatch: module
``_extra_state`` the checkpoint lacks (Transformer Engine layers keep FP8 scaling metadata there;
a checkpoint converted or trained without TE has none, and TE starts it afresh).

Atomicity: a checkpoint is written to ``iter_N.partial/`` and renamed to ``iter_N/`` by rank 0
only after every rank finished; the tracker is then replaced atomically (write temp, rename).
An interrupted save leaves at most a ``.partial`` directory that nothing reads, so the previous
checkpoint and tracker stay valid (the next run removes it: ``save_directory``). A checkpoint is
never written from non-finite weights.

Integrity: every checkpoint holds ``checksums.json`` (size and CRC-32 of each file, hashed as the
shards are written: ``checksums``), written before it is published; a load verifies every file
against it (each rank a share of the files) unless --no-verify-checkpoint, and a missing,
truncated or corrupted file, or one megatron-core cannot read, is one line naming it.
"""

import contextlib
import dataclasses
import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_deft.config import Config
from megatron_deft.conventions import TRACKER
from megatron_deft.conversion import source
from megatron_deft.models.architecture import architecture_mismatch, architecture_of
from megatron_deft.training import checksums
from megatron_deft.training.setup import finish_param_sync
from megatron_deft.utils.known_warnings import checkpoint_load_deprecations_ignored

logger = logging.getLogger(__name__)

_DIST_OPT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


COMMON_STATE = "common.pt"
"""The file of a checkpoint holding its common (non-sharded) state (megatron-core's name)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which and why."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def existing_checkpoint_dir(root: str, iteration: int) -> str:
    """``checkpoint_dir``, or its ``.stale`` copy when a re-save of that iteration stopped
    between moving the old copy aside and renaming the new one into place (``_publish``)."""
    final = checkpoint_dir(root, iteration)
    for directory in (final, final + ".stale"):
        if os.path.isdir(directory):
            return directory
    raise CheckpointError(f"{root}: no checkpoint directory for iteration {iteration} ({final})")


def read_tracker(root: str):
    """Iteration named by the tracker, or None when ``root`` holds no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _layout(config: Config) -> dict:
    par = config.parallel
    return {"tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size}


def _inner_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _rng_state():
    """RNG states of this rank as a ShardedObject (one per TP x PP position, DP replicas)."""
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        state,
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state(modules) -> dict:
    """Sharded state of the unwrapped model chunks, keyed "model" (one chunk) or "model<i>"."""
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": module.sharded_state_dict() for i, module in enumerate(modules)}


def load_model_weights(directory: str, modules) -> None:
    """Only the model weights of one checkpoint (an ``iter_N`` directory) into the unwrapped GPT
    chunks ``modules``, resharded to this process's TP/PP layout (evaluation, export, and
    --finetune / converted checkpoints); see the module docstring on ``_extra_state``."""
    state = _model_state(modules)
    with checkpoint_load_deprecations_ignored():
        loaded, _, absent = dist_checkpointing.load(
            state, directory, strict=StrictHandling.RETURN_UNEXPECTED
        )
    _refuse_absent_weights(absent, directory)
    for key, module in zip(state, modules):
        result = module.load_state_dict(loaded[key], strict=False)
        _refuse_absent_weights(result.missing_keys, directory)
        if result.unexpected_keys:
            raise CheckpointError(f"{directory}: unexpected model keys {result.unexpected_keys}")


def _refuse_absent_weights(keys, directory: str) -> None:
    """Model keys the checkpoint lacks: only ``_extra_state`` may be missing."""
    absent = sorted(key for key in keys if not key.endswith("_extra_state"))
    if absent:
        raise CheckpointError(
            f"{directory} lacks model weights {absent[:8]}"
            + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
        )


def _sharded_state(model, optimizer, config: Config, is_loading: bool, with_rng: bool):
    """The sharded state dict both save and load use (loading fills it in place)."""
    model_state = _model_state([chunk.module for chunk in model])
    state = dict(model_state)
    if is_loading and config.parallel.use_distributed_optimizer:
        # dp_reshardable loading needs allocated Adam states to load into (measured).
        for inner in _inner_optimizers(optimizer):
            inner._init_optimizer_states_with_dummy_values()
    state["optimizer"] = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=dict(_DIST_OPT_FORMAT)
    )
    if with_rng:  # one object per (PP, TP) position: only loadable into the same layout
        state["rng_state"] = _rng_state()
    return state


def _all_finite(model) -> bool:
    finite = torch.tensor([1], dtype=torch.int32, device=next(model[0].parameters()).device)
    for chunk in model:
        for param in chunk.parameters():
            if not torch.isfinite(param).all():
                finite.zero_()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def save_checkpoint(
    root, iteration, model, optimizer, scheduler, loader, config: Config, hf_source=None
) -> str:
    """Write ``root/iter_N`` atomically and point the tracker at it. Returns the directory.
    ``hf_source``: the loaded checkpoint's record of its Hugging Face source, carried on for
    export (:mod:`megatron_deft.conversion.source`)."""
    finish_param_sync(model, config)
    if not _all_finite(model):
        raise CheckpointError(f"refusing to save iteration {iteration}: weights are not finite")
    final = checkpoint_dir(root, iteration)
    partial = final + ".partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    finish_param_sync(model, config)
    state = _sharded_state(model, optimizer, config, is_loading=False, with_rng=True)
    state.update(
        iteration=iteration,
        opt_param_scheduler=scheduler.state_dict(),
        data=loader.state_dict(),
        layout=_layout(config),
        config=dataclasses.asdict(config),
        architecture=architecture_of(config.model, model[0].module.vocab_size, config.moe),
    )
    state[source.KEY] = hf_source
    with checksums.hashing_shard_writes():
        dist_checkpointing.save(state, partial)
    dist.barrier()
    if rank0:
        checksums.write_manifest(partial)
        _publish(partial, final, root, iteration)
    dist.barrier()
    return final


def _publish(partial: str, final: str, root: str, iteration: int) -> None:
    """Rename the finished checkpoint into place, then replace the tracker atomically."""
    if os.path.exists(final):  # re-saving an iteration: move the old copy aside first
        stale = final + ".stale"  # read in its place if we stop before the next rename
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(partial, final)
        _fsync_directory(root)
        shutil.rmtree(stale)
    else:
        os.rename(partial, final)
    temp = os.path.join(root, TRACKER + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(f"{iteration}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, os.path.join(root, TRACKER))
    _fsync_directory(root)  # the renames themselves survive a power loss


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def verify_checksums(directory: str) -> None:
    """Every file of ``directory`` against its checksums.json, the files shared out over the
    ranks (each reads ~1/world of the bytes); the first problem found is raised on every rank.
    A checkpoint without a manifest (older, or converted) loads unverified, with a warning."""
    try:
        files = checksums.read_manifest(directory)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if files is None:
        if dist.get_rank() == 0:
            logger.warning(f"{directory} has no {checksums.CHECKSUMS}: loading it unverified")
        return
    names = sorted(files)[dist.get_rank() :: dist.get_world_size()]
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(
        problems, checksums.verify_files(directory, {n: files[n] for n in names})
    )
    problems = [line for lines in problems for line in lines]
    if problems:
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        raise CheckpointError(f"--load {problems[0]}{more}")


def read_common_state(directory: str, verify: bool = True) -> dict:
    """The common (non-sharded) state of one checkpoint directory (no process group needed):
    its common.pt checked against the manifest first unless ``verify`` is False; a mismatch or
    an unreadable file is a CheckpointError (one line naming it)."""
    if verify:
        try:
            files = checksums.read_manifest(directory)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        if files and COMMON_STATE in files:
            problems = checksums.verify_files(directory, {COMMON_STATE: files[COMMON_STATE]})
            if problems:
                raise CheckpointError(f"--load {problems[0]}")
    with _unreadable_as_checkpoint_error(directory):
        return dist_checkpointing.load_common_state_dict(directory)


@contextlib.contextmanager
def _unreadable_as_checkpoint_error(directory: str):
    """A checkpoint megatron-core cannot read (a truncated, missing or garbage file: possible
    with --no-verify-checkpoint or without a manifest) is one line, not its deep traceback."""
    try:
        yield
    except CheckpointError:
        raise
    # torch's CheckpointException (failures of its reader threads/ranks) is a BaseException
    except (Exception, CheckpointException) as error:
        cause = _root_cause(error)
        reason = str(cause).strip().splitlines()
        raise CheckpointError(
            f"--load {directory}: unreadable checkpoint ({type(cause).__name__}"
            + (f": {reason[0][:300]}" if reason else "")
            + ")"
        ) from error


def _root_cause(error: BaseException) -> BaseException:
    """The first rank's exception inside torch's CheckpointException (``failures``: rank ->
    (exception, traceback)); ``error`` itself otherwise."""
    failures = getattr(error, "failures", None)
    if isinstance(error, CheckpointException) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def _restore_adam_steps(optimizer, loaded_state) -> None:
    """Give every parameter its own, correct Adam ``step`` after a dp_reshardable load.

    megatron-core 0.16.1 (no Apex/TE) hands all parameters one shared ``step`` tensor and then
    overwrites it with the per-parameter value of the *dummy* state it loaded into (1), not the
    saved step; AdamW would then also add 1 per parameter per update. The saved step survives in
    the param groups of the loaded state.
    """
    inners = _inner_optimizers(optimizer)
    per_inner = [loaded_state] if len(inners) == 1 else list(loaded_state.values())
    for inner, state in zip(inners, per_inner):
        steps = {group["step"] for group in state["optimizer"]["param_groups"]}
        if len(steps) != 1:
            raise CheckpointError(f"inconsistent optimizer steps in the checkpoint: {steps}")
        step = float(steps.pop())
        for param_state in inner.optimizer.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)


def _check_architecture(common: dict, directory: str, config: Config, padded_vocab: int):
    """One line naming the flag when the run's architecture differs from the checkpoint's
    (checkpoints written before the architecture was recorded are not checked)."""
    saved = common.get("architecture")
    if saved is None:
        return
    mismatch = architecture_mismatch(
        saved,
        architecture_of(config.model, padded_vocab, config.moe),
        config.parallel.tensor_model_parallel_size,
    )
    if mismatch:
        raise CheckpointError(f"--load {directory}: architecture mismatch: {mismatch}")


_SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_style": "--lr-decay-style",
    "lr_decay_steps": "--lr-decay-iters (default: --train-iters)",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--lr-decay-iters (default: --train-iters)",
    "wd_incr_style": "the weight-decay schedule",
}
"""OptimizerParamScheduler state (all but the step count) -> the flag behind it."""


def _check_schedule(saved: dict, scheduler, directory: str, config: Config) -> None:
    """A full resume continues the saved LR/weight-decay schedule. megatron-core would silently
    prefer the checkpoint's values over changed flags; a difference is an error naming the
    flags instead, unless --override-opt-param-scheduler asks for this run's values. (The WSD
    decay flags are not in the scheduler's state: they always come from this run.)"""
    if config.checkpoint.override_opt_param_scheduler:
        return
    current = scheduler.state_dict()
    differences = {}
    for key, flag in _SCHEDULE_FLAGS.items():
        if key in saved and saved[key] != current[key]:
            differences.setdefault(flag, f"{flag} {current[key]} (checkpoint: {saved[key]})")
    if differences:
        raise CheckpointError(
            f"--load {directory}: this run's schedule differs from the checkpoint's: "
            f"{'; '.join(differences.values())}. Use the checkpoint's values to continue its "
            "schedule, or add --override-opt-param-scheduler to continue from its iteration "
            "with this run's"
        )


def load_checkpoint(root, model, optimizer, scheduler, loader, config: Config) -> int:
    """Restore from the tracker's checkpoint; returns the iteration to continue from (0 when
    fine-tuning: weights only). Another TP/PP layout reshards the model weights and the plain
    optimizer's state; the distributed optimizer's state only loads into the same layout."""
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"--load {root}: no {TRACKER} (no complete checkpoint there)")
    directory = existing_checkpoint_dir(root, iteration)
    if not config.checkpoint.no_verify_checkpoint:
        verify_checksums(directory)
    common = read_common_state(directory, verify=False)  # verified with the rest just above
    _check_architecture(common, directory, config, model[0].module.vocab_size)
    # Converted (e.g. Hugging Face) checkpoints hold weights only: start them like --finetune.
    full = not (config.checkpoint.finetune or common.get("weights_only", False))
    same_layout = common["layout"] == _layout(config)
    if full and not same_layout and config.parallel.use_distributed_optimizer:
        raise CheckpointError(
            f"--load {directory} was saved with {common['layout']}, this run is "
            f"{_layout(config)}: distributed-optimizer state (dp_reshardable) cannot be resharded "
            "across TP/PP; add --finetune to load the (resharded) model weights only"
        )
    if not full:
        with _unreadable_as_checkpoint_error(directory):
            load_model_weights(directory, [chunk.module for chunk in model])
        return 0
    state = _sharded_state(model, optimizer, config, is_loading=True, with_rng=same_layout)
    with _unreadable_as_checkpoint_error(directory), checkpoint_load_deprecations_ignored():
        loaded = dist_checkpointing.load(state, directory)
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(loaded["model" if len(model) == 1 else f"model{i}"])
    with torch.no_grad():  # the distributed optimizer copies into leaf views
        optimizer.load_state_dict(loaded["optimizer"])
    if config.parallel.use_distributed_optimizer:
        _restore_adam_steps(optimizer, loaded["optimizer"])
    _check_schedule(loaded["opt_param_scheduler"], scheduler, directory, config)
    # With the override, megatron-core keeps the scheduler's (this run's) values and restores
    # only the step count; otherwise the values are equal (checked above).
    scheduler.override_opt_param_scheduler = config.checkpoint.override_opt_param_scheduler
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    loader.load_state_dict(loaded["data"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        logger.warning(
            f"resumed {directory} saved with {common['layout']} as {_layout(config)}: "
            "model and optimizer state resharded, RNG states reseeded"
        )
    return int(loaded["iteration"])
