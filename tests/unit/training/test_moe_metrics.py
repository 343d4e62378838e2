"""moe_metrics.log_window: the router losses and the expert load of a --log-interval window on
the console and in TensorBoard (a real SummaryWriter, read back with TensorBoard's reader)."""

import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from megatron_deft.training.moe_metrics import log_window

# two iterations of a 3-layer model whose layer 0 is dense (its row stays 0), 4 experts
WINDOW = [
    {
        "moe_load_balancing_loss": 1.2,
        "moe_z_loss": 3.0,
        "moe_tokens_per_expert": torch.tensor(
            [[0, 0, 0, 0], [10, 20, 30, 40], [25, 25, 25, 25]], dtype=torch.float64
        ),
    },
    {
        "moe_load_balancing_loss": 1.0,
        "moe_z_loss": 2.0,
        "moe_tokens_per_expert": torch.tensor(
            [[0, 0, 0, 0], [30, 20, 10, 40], [25, 25, 25, 25]], dtype=torch.float64
        ),
    },
]


def test_console_and_tensorboard_get_the_window_means_and_the_load_per_layer(tmp_path, caplog):
    writer = SummaryWriter(log_dir=str(tmp_path))
    logger = logging.getLogger("test_moe_metrics")
    with caplog.at_level(logging.INFO, logger="test_moe_metrics"):
        log_window(WINDOW, 7, writer, logger)
    writer.close()
    lines = caplog.messages
    # layer 1 over the window: [40, 40, 40, 80], mean 50, max 80
    assert lines[0] == (
        "  moe: load balancing loss 1.100000 | z loss 2.500000 | max expert load / mean 1.600"
    )
    assert lines[1:] == [
        "  moe layer 1: tokens per expert [40 40 40 80] | max/mean 1.600",
        "  moe layer 2: tokens per expert [50 50 50 50] | max/mean 1.000",
    ]
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    scalars = {tag: events.Scalars(tag)[0] for tag in events.Tags()["scalars"]}
    assert {tag: (s.step, pytest.approx(s.value)) for tag, s in scalars.items()} == {
        "train/moe_load_balancing_loss": (7, 1.1),
        "train/moe_z_loss": (7, 2.5),
        "train/moe_load_imbalance": (7, 1.6),
        "moe/layer_1/load_imbalance": (7, 1.6),
        "moe/layer_2/load_imbalance": (7, 1.0),
    }
    (histogram,) = events.Histograms("moe/layer_1/tokens_per_expert")
    assert histogram.step == 7
    assert histogram.histogram_value.bucket == [40, 40, 40, 80]
    assert histogram.histogram_value.num == 200
    assert "moe/layer_0/tokens_per_expert" not in events.Tags()["histograms"]
