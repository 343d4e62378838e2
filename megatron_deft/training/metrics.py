"""Console + TensorBoard logging of training/validation metrics (one writer, last rank)."""

import contextlib
import logging
import time

logger = logging.getLogger("megatron_deft")

# Statistic name in the step metrics -> label in the log.
OBJECTIVE_STATS = {
    "gate": "mean gate",
    "alpha": "mean alpha",
    "p_target": "mean p_target",
    "renyi2_entropy": "mean renyi2 entropy",
    "confident_conflict": "confident-conflict fraction",
}


class MetricsLogger:
    """Averages step metrics over ``--log-interval`` iterations and writes them out.

    Only the writer rank (the last global rank, which is on the last pipeline stage) prints and
    writes TensorBoard scalars; every rank holds the same reduced metrics.
    """

    def __init__(self, is_writer: bool, tensorboard_dir, objective, train_iters: int,
                 tokens_per_iteration: int):
        self.is_writer = is_writer
        self.has_alpha = objective.family == "qlog"  # the exponent exists for q-log objectives
        self.is_nll = objective.name == "nll"
        self.train_iters = train_iters
        self.tokens_per_iteration = tokens_per_iteration
        self.writer = None
        if is_writer and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._window = []
        self._window_start = time.perf_counter()

    def record(self, iteration: int, metrics: dict, lr: float, samples_consumed: int,
               log_now: bool) -> None:
        """Add one iteration; on ``log_now`` print/write the window's means and reset it."""
        self._window.append(metrics)
        if not log_now:
            return
        elapsed = time.perf_counter() - self._window_start
        window = self._window
        finite = [m for m in window if m["updated"]]
        per_iter = elapsed / len(window)
        # Means over the iterations that updated (nan when every iteration was skipped).
        means = {key: sum(m[key] for m in finite) / len(finite) if finite else float("nan")
                 for key in ("loss", "nll", "grad_norm", *OBJECTIVE_STATS)}
        self._window, self._window_start = [], time.perf_counter()
        if not self.is_writer:
            return
        stats = {k: v for k, v in means.items() if k in OBJECTIVE_STATS}
        if not self.has_alpha:
            stats.pop("alpha")
        parts = [
            f"iteration {iteration:6d}/{self.train_iters}",
            f"loss {means['loss']:.6f}",
            *([] if self.is_nll else [f"nll {means['nll']:.6f}"]),
            f"lr {lr:.3e}",
            f"grad norm {means['grad_norm']:.4f}",
            f"tokens/s {self.tokens_per_iteration / per_iter:.1f}",
            f"samples {samples_consumed}",
            f"ETA {_duration(per_iter * (self.train_iters - iteration))}",
            *(f"{OBJECTIVE_STATS[k]} {v:.4f}" for k, v in stats.items()),
        ]
        skipped = len(window) - len(finite)
        if skipped:
            parts.append(f"skipped {skipped}")
        logger.info(" | ".join(parts))
        if self.writer:
            scalars = {"loss": means["loss"], "nll": means["nll"], "lr": lr,
                       "grad_norm": means["grad_norm"],
                       "tokens_per_second": self.tokens_per_iteration / per_iter,
                       "samples_consumed": samples_consumed, **stats}
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, iteration)
            self.writer.flush()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation, checkpointing) is left out of tokens/s and the ETA."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - start

    def validation(self, iteration: int, metrics: dict) -> None:
        if not self.is_writer:
            return
        logger.info(f"validation at iteration {iteration} | loss {metrics['loss']:.6f} | "
                    f"nll {metrics['nll']:.6f} | tokens {metrics['tokens']}")
        if self.writer:
            self.writer.add_scalar("valid/loss", metrics["loss"], iteration)
            self.writer.add_scalar("valid/nll", metrics["nll"], iteration)
            self.writer.flush()

    def skipped(self, iteration: int, metrics: dict, consecutive: int) -> None:
        if self.is_writer:
            logger.warning(f"iteration {iteration}: non-finite loss {metrics['loss']} or grad "
                           f"norm {metrics['grad_norm']}; update skipped ({consecutive} in a row)")

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
