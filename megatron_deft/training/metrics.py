"""Console + TensorBoard logging of training/validation metrics (one writer, last rank).

TensorBoard tags, every ``--log-interval`` iterations (means over the iterations that updated):

- ``train/<stat>`` scalars: loss, nll, lr, grad_norm, loss_tokens_per_second (loss-carrying
  tokens, not padding or prompt slots), samples_consumed and rows_consumed (a packed row holds
  several samples) and the objective's token means (its token statistics, objectives/
  token_stats.py: gate, p_target, renyi2_entropy, the exponent a of q-log objectives, eaft's
  top-k entropy; and confident_conflict);
- ``train/<stat>_histogram``: histograms of gate, p_target and exponent over the window's tokens;
- with ``--token-class-key``, per class ``<name>``: ``train_class/<name>/<stat>`` (token mean),
  ``train_class/<name>/<stat>_histogram`` and ``train_class/<name>/token_fraction`` (its share
  of the window's loss tokens);
- ``valid/loss``, ``valid/nll`` at each validation.

A run starting at iteration T (T > 0: resumed; T = 0: started afresh) writes a restart marker at
step T + 1: TensorBoard (and tools/gate_dynamics_logs.py) then hide what an earlier run logged
into the same directory after step T (a killed run's steps after its last checkpoint, or a whole
earlier attempt), so every step appears once, with this run's values.
"""

import contextlib
import logging
import time

from megatron_deft.objectives.token_stats import TOKEN_STATS, stats_of
from megatron_deft.training import moe_metrics
from megatron_deft.training.token_classes import split_histograms

logger = logging.getLogger("megatron_deft")

# Statistic name in the step metrics -> label in the log: the token statistics that have one
# (token_stats.TOKEN_STATS) and the confident-conflict fraction.
OBJECTIVE_STATS = {stat.name: stat.label for stat in TOKEN_STATS if stat.label}
OBJECTIVE_STATS["confident_conflict"] = "confident-conflict fraction"


class MetricsLogger:
    """Averages step metrics over ``--log-interval`` iterations and writes them out.

    Only the writer rank (the last global rank, which is on the last pipeline stage) prints and
    writes TensorBoard scalars; every rank holds the same reduced metrics.
    """

    def __init__(
        self,
        is_writer: bool,
        tensorboard_dir,
        objective,
        train_iters: int,
        class_names=(),
        start_iteration: int = 0,
    ):
        self.is_writer = is_writer
        self.objective, self.class_names = objective, tuple(class_names)
        # the logged statistics this objective has (e.g. the exponent exists for q-log ones)
        has = {stat.name for stat in stats_of(objective)} | {"confident_conflict"}
        self.stats = [name for name in OBJECTIVE_STATS if name in has]
        self.is_nll = objective.name == "nll"
        self.train_iters = train_iters
        self.writer = None
        if is_writer and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step writes a SessionLog.START at that step: readers drop every event of
            # the same directory at or after it that was written before the marker.
            purge_step = start_iteration + 1
            self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=purge_step)
        self._window = []
        self._window_start = time.perf_counter()
        self._window_counts = None  # summed token_class_counts of the window's updates

    def record(
        self, iteration: int, metrics: dict, lr: float, consumed: dict, log_now: bool
    ) -> None:
        """Add one iteration; on ``log_now`` print/write the window's means and reset it.
        ``consumed``: {"samples": n, "rows": n} read by the whole run so far."""
        self._window.append(metrics)
        if metrics["updated"]:
            counts = metrics["token_class_counts"]
            self._window_counts = (
                counts if self._window_counts is None else (self._window_counts + counts)
            )
        if not log_now:
            return
        elapsed = time.perf_counter() - self._window_start
        window = self._window
        finite = [m for m in window if m["updated"]]
        per_iter = elapsed / len(window)
        # skipped iterations processed their tokens too
        loss_tokens_per_second = sum(m["tokens"] for m in window) / elapsed
        # Means over the iterations that updated (nan when every iteration was skipped).
        means = {
            key: sum(m[key] for m in finite) / len(finite) if finite else float("nan")
            for key in ("loss", "nll", "grad_norm", *self.stats)
        }
        window_counts = self._window_counts
        self._window, self._window_start, self._window_counts = [], time.perf_counter(), None
        if not self.is_writer:
            return
        stats = {name: means[name] for name in self.stats}
        parts = [
            f"iteration {iteration:6d}/{self.train_iters}",
            f"loss {means['loss']:.6f}",
            *([] if self.is_nll else [f"nll {means['nll']:.6f}"]),
            f"lr {lr:.3e}",
            f"grad norm {means['grad_norm']:.4f}",
            f"loss tokens/s {loss_tokens_per_second:.1f}",
            f"samples {consumed['samples']}",
            f"rows {consumed['rows']}",
            f"ETA {_duration(per_iter * (self.train_iters - iteration))}",
            *(f"{OBJECTIVE_STATS[k]} {v:.4f}" for k, v in stats.items()),
        ]
        skipped = len(window) - len(finite)
        if skipped:
            parts.append(f"skipped {skipped}")
        logger.info(" | ".join(parts))
        histograms = {}
        if window_counts is not None:
            histograms = split_histograms(window_counts, self.class_names, self.objective)
        self._log_classes(histograms)
        if "moe_tokens_per_expert" in window[0]:  # MoE: router losses and expert load
            moe_metrics.log_window(finite, iteration, self.writer, logger)
        if self.writer:
            scalars = {
                "loss": means["loss"],
                "nll": means["nll"],
                "lr": lr,
                "grad_norm": means["grad_norm"],
                "loss_tokens_per_second": loss_tokens_per_second,
                "samples_consumed": consumed["samples"],
                "rows_consumed": consumed["rows"],
                **stats,
            }
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, iteration)
            self._write_histograms(histograms, iteration)
            self.writer.flush()

    def _log_classes(self, histograms: dict) -> None:
        """One console line per token class: its share of the loss tokens and its means."""
        for name in self.class_names:
            if name not in histograms:
                logger.info(f"  class {name}: no loss tokens in this window")
                continue
            stats = histograms[name]
            means = " | ".join(f"mean {stat} {h.mean:.4f}" for stat, h in stats.items())
            logger.info(
                f"  class {name}: {100 * _token_fraction(histograms, name):.1f}% of "
                f"loss tokens | {means}"
            )

    def _write_histograms(self, histograms: dict, iteration: int) -> None:
        for name, stats in histograms.items():
            prefix = "train" if name is None else f"train_class/{name}"
            for stat, histogram in stats.items():
                self.writer.add_histogram_raw(
                    f"{prefix}/{stat}_histogram",
                    global_step=iteration,
                    **histogram.tensorboard_raw(),
                )
                if name is not None:
                    self.writer.add_scalar(f"{prefix}/{stat}", histogram.mean, iteration)
            if name is not None:
                self.writer.add_scalar(
                    f"{prefix}/token_fraction", _token_fraction(histograms, name), iteration
                )

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
        logger.info(
            f"validation at iteration {iteration} | loss {metrics['loss']:.6f} | "
            f"nll {metrics['nll']:.6f} | tokens {metrics['tokens']}"
        )
        if self.writer:
            self.writer.add_scalar("valid/loss", metrics["loss"], iteration)
            self.writer.add_scalar("valid/nll", metrics["nll"], iteration)
            self.writer.flush()

    def skipped(self, iteration: int, metrics: dict, consecutive: int) -> None:
        if self.is_writer:
            logger.warning(
                f"iteration {iteration}: non-finite loss {metrics['loss']} or grad "
                f"norm {metrics['grad_norm']}; update skipped ({consecutive} in a row)"
            )

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _token_fraction(histograms: dict, name: str) -> float:
    """Share of the window's loss tokens in class ``name`` (histograms of split_histograms)."""
    return histograms[name]["gate"].num / histograms[None]["gate"].num


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
