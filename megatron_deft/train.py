"""megatron-deft-train: token-level-objective SFT on megatron-core.

Launch with torchrun; flags follow Megatron-LM's names (``--help`` lists them all).

Tiny CPU run, TP=2 (2 processes, gloo, synthetic data)::

    torchrun --nproc_per_node 2 -m megatron_deft.train --device cpu --mock-data \\
        --vocab-size 500 --tensor-model-parallel-size 2 --num-layers 2 --hidden-size 64 \\
        --num-attention-heads 4 --num-query-groups 2 --seq-length 64 --micro-batch-size 2 \\
        --global-batch-size 8 --train-iters 20 --lr 1e-3 --lr-warmup-iters 2 \\
        --sft-objective deft --save /tmp/deft-ckpt --save-interval 10

GPU run: the same with ``--device cuda --bf16`` and real data (``--train-data``,
``--tokenizer-type``, ``--tokenizer-model``) instead of ``--mock-data``.
"""

import atexit
import logging
import os
import sys

from megatron_deft.utils.known_warnings import ignore_import_notices

ignore_import_notices()  # megatron-core's Apex/TE-absent notices and the like


def _configure_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    # megatron-core logs its full configs and bucket layouts at INFO; keep our lines readable.
    for name in ("megatron", "megatron_fsdp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Every rank reads the data and reports the same counts; rank 0 says it once.
    if rank != "0":
        logging.getLogger("megatron_deft.data").setLevel(logging.WARNING)


def main(argv=None) -> int:
    """parse -> build -> train -> close. Exit codes: 0 done, 1 stopped by errors, 2 bad flags."""
    from megatron_deft.training.arguments import parse_config
    from megatron_deft.training.checkpointing import CheckpointError

    # Validate everything before touching torch.distributed or building anything.
    try:
        config = parse_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except CheckpointError as error:  # the checkpoint the run starts from is missing or damaged
        print(f"megatron-deft-train: error: {error}", file=sys.stderr)
        return _exit_stopped(before_process_group=True)
    _configure_logging()

    from megatron_deft.config import ConfigError
    from megatron_deft.data import DataError
    from megatron_deft.training.trainer import Trainer, TrainingStopped

    trainer, stopped = None, False
    try:
        trainer = Trainer(config)
        trainer.train()
    # ConfigError here: a setting only the built model can refute (--fp8-format on layers
    # without Transformer Engine)
    except (TrainingStopped, CheckpointError, DataError, ConfigError) as error:
        logging.getLogger("megatron_deft").error(str(error))
        stopped = True
    finally:
        if trainer is not None:
            trainer.close()
        else:  # stopped while building (e.g. a refused --load)
            from megatron_deft.training.setup import destroy_distributed

            destroy_distributed()
    return _exit_stopped() if stopped else 0


def _exit_stopped(before_process_group: bool = False) -> int:
    """Exit code 1 for a run stopped with its one-line error. With several ranks the process
    ends here, skipping the interpreter's teardown: that takes seconds with megatron-core
    loaded, and torchrun SIGTERMs every rank still running once one has exited with an error,
    so the slower ranks would end by a signal instead of exiting 1 like the first."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 1
    if before_process_group:
        _meet_the_other_ranks()
    atexit._run_exitfuncs()  # what a normal exit runs first (logging, multiprocessing)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _meet_the_other_ranks() -> None:
    """A run stopped before its process group existed (a damaged checkpoint found while the
    flags are parsed) waits at a barrier, so every rank has printed its line before the first
    one exits (torchrun then SIGTERMs the others)."""
    import datetime

    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ:
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # the checkpoint writer's spawn context re-imports __main__
    sys.exit(main())
