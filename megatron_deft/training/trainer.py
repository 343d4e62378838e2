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
from megatron_deft.training import checkpointing, moe_metrics, setup, step
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
        train = config.training
        self.metrics = MetricsLogger(
            is_writer=dist.get_rank() == dist.get_world_size() - 1,
            tensorboard_dir=train.tensorboard_dir,
            objective=self.objective,
            class_names=self.class_names,
            train_iters=train.train_iters,
            tokens_per_iteration=train.global_batch_size * config.model.seq_length,
            start_iteration=self.iteration,
        )
        self.history = []  # per-iteration metrics of this process (tests read it)
        self.consecutive_skips = 0

    def train(self, stop_after: int = None) -> None:
        """Run to --train-iters (or stop early after ``stop_after``, as if killed: no save)."""
        train, ckpt = self.config.training, self.config.checkpoint
        last = train.train_iters if stop_after is None else min(stop_after, train.train_iters)
        while self.iteration < last:
            self._train_one()
            it = self.iteration
            with self.metrics.paused():
                if train.eval_interval and it % train.eval_interval == 0 and self.valid_loader:
                    self.metrics.validation(it, self.evaluate())
                if ckpt.save and ckpt.save_interval and it % ckpt.save_interval == 0:
                    self.save()
        if (
            stop_after is None
            and ckpt.save
            and not (ckpt.save_interval and self.iteration % ckpt.save_interval == 0)
        ):
            self.save()

    def _train_one(self) -> None:
        batch = self.train_loader.next_global_batch()
        metrics = step.train_step(
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
        self.iteration += 1
        self.history.append(dict(metrics, iteration=self.iteration))
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
                    f"(--max-skipped-iters {limit}); lower --lr, check the data, or resume from "
                    "the last checkpoint"
                )
        log_now = self.iteration % self.config.training.log_interval == 0
        lr = self.optimizer.param_groups[0]["lr"]
        self.metrics.record(self.iteration, metrics, lr, self.train_loader.rows_consumed, log_now)

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
        if dist.get_rank() == 0:
            logger.info(f"saved checkpoint {directory}")

    def close(self, keep_process_group: bool = False) -> None:
        self.metrics.close()
        setup.destroy_distributed(keep_process_group)
