"""Checkpoints: exact resume (plain optimizer at TP=2, distributed optimizer at DP=2) with its
TensorBoard log continued without duplicate steps (the metrics compared are read back from the
runs' TensorBoard logs, float32), an interrupted save never breaks the previous
checkpoint, resharded loading TP=2 -> PP=2 (weights only, and a full resume with the plain
optimizer). One torchrun launch of workers/checkpoint_resume.py (2 ranks)."""

import os

import pytest

RUNS = ("tp2_plain", "dp2_distopt")

WORKER_DIR = os.path.join(os.path.dirname(__file__), "workers")


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory):
    return torchrun(WORKER_DIR + "/checkpoint_resume.py", 2, tmp_path_factory.mktemp("checkpoint"))


@pytest.mark.parametrize("run", RUNS)
def test_killed_and_resumed_run_reproduces_uninterrupted_losses_and_weights(results, run):
    result = results[run]
    uninterrupted = result["uninterrupted"]
    assert uninterrupted["steps"] == [1, 2, 3, 4, 5, 6]
    assert result["before_kill"]["steps"] == [1, 2, 3, 4, 5]
    assert result["before_kill"]["loss"] == uninterrupted["loss"][:5]
    assert result["resumed_from"] == 3
    # Same process layout, same data, same restored state: identical (bitwise in float32; the
    # weights below bitwise in full).
    for key in ("loss", "grad_norm", "lr"):
        assert result["after_resume"][key] == uninterrupted[key], key
    assert result["max_weight_difference"] == 0.0
    assert len(set(uninterrupted["loss"])) == 6  # training changes the loss: the check has teeth


@pytest.mark.parametrize("run", RUNS)
def test_resumed_run_replaces_what_the_killed_run_logged_after_its_checkpoint(results, run):
    """The killed run logged iterations 1-5 but saved only 3; the resumed run logs 4-6 into the
    same TensorBoard directory. Readers see each step once, 4 and 5 from the resumed run."""
    from tools.gate_dynamics_logs import read_scalars

    result = results[run]
    steps, losses = read_scalars(result["tensorboard_dir"])["loss"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses == result["uninterrupted"]["loss"]


@pytest.mark.parametrize("run", RUNS)
def test_interrupted_save_leaves_previous_checkpoint_loadable(results, run):
    result = results[run]
    # A half-written iter_0000006.partial and a temp tracker were left behind: ignored.
    assert result["tracker_before_resume"] == 3
    assert result["tracker_after"] == 6
    # The completed save of iteration 6 replaced the debris; nothing partial or temporary remains.
    assert result["checkpoint_entries"] == [
        ".lock",
        "iter_0000003",
        "iter_0000006",
        "latest_checkpointed_iteration.txt",
    ]


def test_resharded_load_reproduces_weights_and_validation_loss(results):
    reshard = results["reshard"]
    assert reshard["iteration_after_finetune_load"] == 0
    # Loaded as TP=1 x PP=2 from the TP=2 checkpoint: each stage's full weights match exactly.
    assert reshard["max_weight_difference_stage0"] == 0.0
    assert reshard["max_weight_difference_stage1"] == 0.0
    # 4 layers x 6 params + embedding + final norm (+ the last stage's tied output copy).
    assert reshard["num_weights_stage0"] + reshard["num_weights_stage1"] == 27
    saved_loss = results["tp2_plain"]["resumed_valid_loss"]
    assert abs(reshard["valid_loss"] - saved_loss) <= 1e-5 * saved_loss


def test_full_resume_in_another_layout_continues_the_run(results):
    """Iteration 3 of the TP=2 run resumed as TP=1 x PP=2 (model + plain Adam state resharded):
    iterations 4-6 and the final weights match the uninterrupted TP=2 run (summation order
    differs between layouts: 1e-5 relative)."""
    reshard = results["reshard"]
    assert reshard["resharded_resume_from"] == 3
    expected = results["tp2_plain"]["uninterrupted"]
    got = reshard["resharded_resume"]
    assert got["steps"] == [4, 5, 6]
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(expected[key][3:], rel=1e-5), key
    assert reshard["resharded_resume_weight_error_stage0"] < 1e-5
    assert reshard["resharded_resume_weight_error_stage1"] < 1e-5


def test_distributed_optimizer_resume_across_layouts_is_refused_clearly(results):
    message = results["reshard"]["distopt_load_across_layouts"]
    assert "saved with {'tp': 1, 'pp': 1}" in message
    assert "this run is {'tp': 2, 'pp': 1}" in message
    assert "--finetune" in message


@pytest.mark.parametrize("stage", [0, 1])
def test_weights_only_load_tolerates_absent_extra_state_but_not_absent_weights(results, stage):
    """A Transformer Engine model keeps FP8 metadata in ``_extra_state``; a checkpoint converted
    from Hugging Face (or trained with the local spec) has none. Only that may be absent."""
    result = results["extra_state"]
    assert result[f"extra_state_load_stage{stage}"] == "loaded, set_extra_state calls 0"
    message = result[f"missing_weight_load_stage{stage}"]
    assert "lacks model weights" in message and "layer_norm_bogus" in message


def test_full_resume_with_another_schedule_is_refused_unless_overridden(results):
    """megatron-core alone would resume with the checkpoint's LR (3e-3) and ignore --lr 1e-3."""
    result = results["schedule"]
    message = result["changed_lr"]
    assert "--lr 0.001 (checkpoint: 0.003)" in message
    # 6 -> 8 train iterations moves the decay end (LR and weight decay): named once.
    assert message.count("--lr-decay-iters (default: --train-iters) 8 (checkpoint: 6)") == 1
    assert "--override-opt-param-scheduler" in message
    schedule = result["overridden_schedule"]
    assert result["overridden_iteration"] == 6 and schedule["num_steps"] == 6
    assert schedule["max_lr"] == 1e-3 and schedule["lr_decay_steps"] == 8


def test_re_save_interrupted_between_its_renames_reads_the_moved_aside_copy(tmp_path):
    """_publish moves an existing iter_N aside (.stale) before renaming the new one into place;
    stopped in between, the tracker's iteration is read from the .stale copy. Pure file system:
    no checkpoint content is needed."""
    from megatron_deft.training.checkpointing import (
        CheckpointError,
        _publish,
        checkpoint_dir,
        existing_checkpoint_dir,
    )

    root = str(tmp_path)
    for attempt in ("first", "second"):
        partial = os.path.join(root, "partial")
        os.makedirs(partial)
        open(os.path.join(partial, "marker"), "w").write(attempt)
        _publish(partial, checkpoint_dir(root, 5), root, 5)
        final = existing_checkpoint_dir(root, 5)
        assert (
            final == checkpoint_dir(root, 5)
            and open(os.path.join(final, "marker")).read() == attempt
        )
    assert sorted(os.listdir(root)) == ["iter_0000005", "latest_checkpointed_iteration.txt"]
    os.rename(checkpoint_dir(root, 5), checkpoint_dir(root, 5) + ".stale")  # the window
    assert existing_checkpoint_dir(root, 5) == checkpoint_dir(root, 5) + ".stale"
    with pytest.raises(CheckpointError, match="no checkpoint directory for iteration 6"):
        existing_checkpoint_dir(root, 6)
