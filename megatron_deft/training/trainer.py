"""The training loop: build everything once, then step / log / validate / checkpoint.

trainer = Trainer(config)   # process groups, data, model (DDP), optimizer, LR, resume
trainer.train()             # iterations [resumed iteration, --train-iters)
trainer.close()             # TensorBoard, process groups
"""

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_deft.config import Config
from megatron_deft.conversion import source
from megatron_deft.models.layout import padded_vocab_size
from megatron_deft.training import checkpointing, moe_metrics, save_directory, setup, step
from megatron_deft.training.arguments import objective_of
from megatron_deft.training.data import build_train_valid_loaders
from megatron_deft.training.metrics import MetricsLogger, logger


class TrainingStopped(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite iterations)."""


class Trainer:
    """One run of SFT on megatron-core; see the module docstring."""

    def __init__(self, config: Config):
        self.config = config
        setup.initialize_distributed(config)
        self._save_lock = save_directory.claim(config.checkpoint.save)
        try:
            self._build(config)
        except BaseException:
            self._release_save_directory()  # e.g. a refused --load: the process may go on
            raise

    def _build(self, config: Config) -> None:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        self.train_loader, self.valid_loader, self.vocab_size = build_train_valid_loaders(
            config, dp_rank, dp_size
        )
        self.padded_vocab = padded_vocab_size(
            self.vocab_size,
            config.model.make_vocab_size_divisible_by,
            config.parallel.tensor_model_parallel_size,
        )
        self.model = setup.build_model(config, self.padded_vocab)
        self.optimizer, self.scheduler = setup.build_optimizer(config, self.model)
        self.expert_load = (  # router statistics of MoE runs
            moe_metrics.ExpertLoad(self.model, config) if config.moe.num_experts else None
        )
        self.objective = objective_of(config)
        self.class_names = self.train_loader.class_names  # --token-class-key labels
        self.iteration = 0
        self.hf_source = None  # the Hugging Face model the weights came from, carried to export
        self.last_checkpoint = None  # the newest full checkpoint of this run (resumable)
        if config.checkpoint.load:
            self.iteration = checkpointing.load_checkpoint(
                config.checkpoint.load,
                self.model,
                self.optimizer,
                self.scheduler,
                self.train_loader,
                config,
            )
            self.hf_source = source.checkpoint_record(config.checkpoint.load)
            logger.info(
                f"loaded {config.checkpoint.load} at iteration {self.iteration}"
                + (" (weights only: --finetune)" if config.checkpoint.finetune else "")
            )
            if self.iteration:
                self.last_checkpoint = checkpointing.checkpoint_dir(
                    config.checkpoint.load, self.iteration
                )
        train = config.training
        self.metrics = MetricsLogger(
            is_writer=dist.get_rank() == dist.get_world_size() - 1,
            tensorboard_dir=train.tensorboard_dir,
            objective=self.objective,
            class_names=self.class_names,
            train_iters=train.train_iters,
            start_iteration=self.iteration,
        )
        self.consecutive_skips = 0

    def train(self) -> None:
        """Run to --train-iters; save at the end (with --save) unless just saved."""
        train, ckpt = self.config.training, self.config.checkpoint
        while self.iteration < train.train_iters:
            self._train_one()
            it = self.iteration
            with self.metrics.paused():
                if train.eval_interval and it % train.eval_interval == 0 and self.valid_loader:
                    self.metrics.validation(it, self.evaluate())
                if ckpt.save and ckpt.save_interval and it % ckpt.save_interval == 0:
                    self._periodic_save()
        if ckpt.save and not (ckpt.save_interval and self.iteration % ckpt.save_interval == 0):
            self.save()

    def train_step(self) -> dict:
        """One optimizer step on the next global batch (:func:`step.train_step` with this run's
        model, data and objective; MoE runs add the router losses and expert load); its metrics.
        No iteration count, logging, validation or checkpointing: :meth:`train` adds those."""
        batch = self.train_loader.next_global_batch()
        return step.train_step(
            self.model,
            self.optimizer,
            self.scheduler,
            batch.microbatches,
            self.config,
            self.objective,
            self.vocab_size,
            num_classes=len(self.class_names),
            expert_load=self.expert_load,
        )

    def _train_one(self) -> None:
        metrics = self.train_step()
        self.iteration += 1
        if metrics["updated"]:
            self.consecutive_skips = 0
        else:
            self.consecutive_skips += 1
            self.metrics.skipped(self.iteration, metrics, self.consecutive_skips)
            limit = self.config.training.max_skipped_iters
            if self.consecutive_skips >= limit:
                raise TrainingStopped(
                    f"stopping at iteration {self.iteration}: {self.consecutive_skips} consecutive "
                    "iterations with a non-finite loss or grad norm "
                    f"(--max-skipped-iters {limit}); lower --lr, check the data, or "
                    + (
                        f"resume from {self.last_checkpoint}, the last checkpoint (written "
                        "before these skips)"
                        if self.last_checkpoint
                        else "restart: no checkpoint was written before these skips"
                    )
                )
        log_now = self.iteration % self.config.training.log_interval == 0
        lr = self.optimizer.param_groups[0]["lr"]
        consumed = {
            "samples": self.train_loader.samples_consumed,
            "rows": self.train_loader.rows_consumed,
        }
        self.metrics.record(self.iteration, metrics, lr, consumed, log_now)

    def evaluate(self) -> dict:
        """Token-mean validation loss (the objective) and NLL over --eval-iters global batches
        (all of them if fewer)."""
        for chunk in self.model:
            chunk.eval()
        sums = {"loss": 0.0, "nll": 0.0}
        tokens = 0
        for index, batch in enumerate(self.valid_loader.eval_batches()):
            if index >= self.config.training.eval_iters:
                break
            metrics = step.eval_step(
                self.model, batch.microbatches, self.config, self.objective, self.vocab_size
            )
            for key in sums:
                sums[key] += metrics[key] * metrics["tokens"]
            tokens += metrics["tokens"]
        for chunk in self.model:
            chunk.train()
        return {**{key: value / max(tokens, 1) for key, value in sums.items()}, "tokens": tokens}

    def _periodic_save(self) -> None:
        """Save, unless the last update was skipped: a checkpoint inside a non-finite streak
        would resume straight into it (the stop message names the last one before it)."""
        if self.consecutive_skips:
            if dist.get_rank() == 0:
                logger.warning(
                    f"not saving iteration {self.iteration}: its update was skipped "
                    f"({self.consecutive_skips} in a row)"
                )
            return
        self.save()

    def save(self) -> None:
        directory = checkpointing.save_checkpoint(
            self.config.checkpoint.save,
            self.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            self.train_loader,
            self.config,
            hf_source=self.hf_source,
        )
        self.last_checkpoint = directory
        if dist.get_rank() == 0:
            logger.info(f"saved checkpoint {directory}")

    def close(self, keep_process_group: bool = False) -> None:
        self.metrics.close()
        self._release_save_directory()
        setup.destroy_distributed(keep_process_group)

    def _release_save_directory(self) -> None:
        if self._save_lock is not None:
            self._save_lock.close()
            self._save_lock = None
