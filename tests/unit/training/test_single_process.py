"""Global per-token loss normalisation, packed rows, non-finite iterations, console/TensorBoard
logging.
One torchrun launch (1 rank) of workers/single_process.py."""

import math
import os

import pytest

WORKER_DIR = os.path.join(os.path.dirname(__file__), "workers")


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory):
    return torchrun(
        os.path.join(WORKER_DIR, "single_process.py"), 1, tmp_path_factory.mktemp("single")
    )


def test_uneven_micro_batches_give_the_single_batch_loss_and_gradient(results):
    """4 micro-batches with different loss-token counts through megatron's schedule == one
    float64 F.cross_entropy pass over the whole batch, sum / global count."""
    norm = results["normalisation"]
    assert len(set(norm["counts"])) == len(norm["counts"])  # genuinely uneven
    assert norm["schedule_tokens"] == sum(norm["counts"])
    assert abs(norm["schedule_loss"] - norm["reference_loss"]) <= 1e-6 * norm["reference_loss"]
    assert abs(norm["schedule_nll"] - norm["reference_loss"]) <= 1e-5 * norm["reference_loss"]
    assert norm["max_grad_relative_error"] < 1e-5
    assert norm["grad_norm"] > 0.1
    # The per-micro-batch mean that per-token normalisation avoids is measurably different.
    assert abs(norm["mean_of_microbatch_means"] - norm["reference_loss"]) > 1e-3


def test_packed_row_gives_each_sample_its_standalone_loss(results):
    """Two packed rows as one THD stream (no dense mask) vs every sample alone."""
    packing = results["packing"]
    assert packing["thd"] and packing["segments"] >= 4 and packing["loss_tokens"] > 10
    assert packing["max_abs_difference"] < 1e-5
    # With one segment over the stream samples would see each other: the check can fail.
    assert packing["one_segment_difference"] > 1e-3


def test_thd_matches_the_dense_mask_path_in_logits_loss_and_gradients(results):
    """--attention-backend sdpa (THD) vs unfused (megatron-core on the [b, 1, s, s] mask) on
    the same packed global batch and weights: fp32 rounding apart."""
    thd = results["thd_vs_dense"]
    assert thd["backend"] == "sdpa" and thd["same_parameters"]
    assert thd["thd_batch"] and thd["dense_batch"] and thd["same_rows"]
    assert thd["max_logit_difference"] <= 1e-5 * thd["logit_scale"]
    thd_loss, dense_loss = thd["loss"]
    assert abs(thd_loss - dense_loss) <= 1e-6 * dense_loss
    assert thd["grads_nonzero"] and thd["max_grad_relative_error"] < 1e-5
    # Said once per process: sdpa by the first trainer of the worker, then unfused here.
    assert thd["attention_log"] == [
        "attention: unfused: megatron-core unfused attention on a dense [b, 1, s, s] mask"
    ]


def test_non_finite_iteration_is_skipped_without_touching_weights_or_schedule(results):
    nf = results["non_finite"]
    assert nf["skipped_updated_flag"] is False
    assert nf["weights_changed_by_skipped_iteration"] is False
    assert nf["scheduler_advanced_on_skip"] is False
    assert nf["recovered_updated_flag"] is True and math.isfinite(nf["recovered_loss"])


def test_consecutive_non_finite_iterations_stop_training_with_a_clear_message(results):
    nf = results["non_finite"]
    # Iterations 4 and 5 non-finite with --max-skipped-iters 2 -> stop at 5.
    assert nf["stopped_at_iteration"] == 5
    assert "2 consecutive iterations with a non-finite loss or grad norm" in nf["stop_message"]
    assert "--max-skipped-iters 2" in nf["stop_message"]


def test_checkpoint_is_never_written_from_non_finite_weights(results):
    nf = results["non_finite"]
    assert nf["nan_save"] == "refusing to save iteration 5: weights are not finite"
    assert nf["nan_save_left_tracker"] is None


def test_log_lines_carry_every_required_field(results):
    lines = results["non_finite"]["log_lines"]
    first = next(line for line in lines if line.startswith("iteration      1/10"))
    for field in (
        "loss ",
        "nll ",
        "lr ",
        "grad norm ",
        "loss tokens/s ",
        "samples 8 | rows 8",  # not packed: one sample per row
        "ETA ",
        "mean gate ",
        "mean exponent ",
        "mean p_target ",
        "mean renyi2 entropy ",
        "confident-conflict fraction ",
    ):
        assert field in first, field
    assert any("iteration 2: non-finite loss nan" in line for line in lines)
    # the mock data's token classes get one line each: share of loss tokens and means
    after_first = lines[lines.index(first) + 1 : lines.index(first) + 3]
    for line, name in zip(after_first, ("long", "short")):
        assert line.startswith(f"  class {name}: ") and "% of loss tokens | mean gate " in line
    assert any(line.startswith("validation at iteration 3 | loss ") for line in lines)


def test_tensorboard_receives_training_and_validation_scalars(results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        results["non_finite"]["tensorboard_dir"], size_guidance={"histograms": 0}
    )
    events.Reload()
    histograms = set(events.Tags()["histograms"])
    for stat in ("gate", "p_target", "exponent"):  # deft has an exponent
        for prefix in ("train", "train_class/long", "train_class/short"):
            assert f"{prefix}/{stat}_histogram" in histograms, (prefix, stat)
    tags = set(events.Tags()["scalars"])
    for name in ("long", "short"):
        for stat in ("gate", "p_target", "exponent", "token_fraction"):
            assert f"train_class/{name}/{stat}" in tags
    for tag in (
        "train/loss",
        "train/nll",
        "valid/nll",
        "train/lr",
        "train/grad_norm",
        "train/gate",
        "train/p_target",
        "train/renyi2_entropy",
        "train/confident_conflict",
        "valid/loss",
    ):
        assert tag in tags, tag
    logged = [event.step for event in events.Scalars("train/loss")]
    assert logged[:3] == [1, 2, 3]
