"""Router statistics of a mixture-of-experts run: auxiliary losses and expert load.

Every iteration (all ranks, collective), :func:`collect` returns

- ``moe_load_balancing_loss`` / ``moe_seq_load_balancing_loss`` / ``moe_z_loss``: the router
  losses *without* their coefficients, from megatron-core's tracker
  (``moe_utils.get_moe_layer_wise_logging_tracker`` filled by the routers, reduced by
  ``track_moe_metrics`` as Megatron-LM does: summed over pipeline stages, the aux loss's
  sequence-parallel parts summed, then averaged over data-parallel ranks, times 1 / micro-batches
  per rank, averaged over the MoE layers). That is the mean over the global batch's
  micro-batches of each micro-batch's loss, the same number for every layout. The z-loss, which
  megatron-core leaves rank-local, is first averaged over the tensor- and data-parallel ranks
  (under sequence parallelism each TP rank holds an equal share of the tokens).
- ``moe_tokens_per_expert``: [layers, E] float64, the tokens routed to each expert in each
  layer over the global batch (rows of dense layers are 0; a token counts once per chosen
  expert: the row sums are tokens x k), counted by a forward hook on every ``TopKRouter``
  (training forwards only).

:func:`log_window` prints and writes them for a ``--log-interval`` window.
"""

import torch
import torch.distributed as dist

from megatron_deft.config import moe_layer_pattern

# tracker name -> our metric name (the aux losses the config can enable, in a fixed order)
TRACKED = {
    "load_balancing_loss": "moe_load_balancing_loss",
    "seq_load_balancing_loss": "moe_seq_load_balancing_loss",
    "z_loss": "moe_z_loss",
}


def _enabled_losses(config) -> list:
    """Tracker names the routers will fill under this config."""
    moe = config.moe
    names = []
    if moe.moe_aux_loss_coeff > 0 and moe.moe_router_load_balancing_type == "aux_loss":
        names.append("load_balancing_loss")
    if moe.moe_aux_loss_coeff > 0 and moe.moe_router_load_balancing_type == "seq_aux_loss":
        names.append("seq_load_balancing_loss")
    if moe.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


class ExpertLoad:
    """Per-layer token counts of the routers, accumulated over one iteration's micro-batches."""

    def __init__(self, model: list, config):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts = torch.zeros(
            config.model.num_layers, config.moe.num_experts, dtype=torch.float64
        )
        for chunk in model:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)
        _create_tracker_entries(config)

    def _count(self, router, inputs, output) -> None:
        if router.training and torch.is_grad_enabled():
            _, routing_map = output  # [tokens, E] bool: the experts each token goes to
            self.counts[router.layer_number - 1] += routing_map.sum(0).to("cpu", torch.float64)

    def take(self, device) -> torch.Tensor:
        """The iteration's counts summed over all ranks, [layers, E]; resets them."""
        counts = self.counts.to(device, copy=True)
        # TP (sequence-parallel shards), DP, EP and PP ranks hold disjoint tokens or layers.
        dist.all_reduce(counts)
        self.counts.zero_()
        return counts.cpu()


def _create_tracker_entries(config) -> None:
    """Every rank gets the same tracker entries in the same order, even a pipeline stage
    without MoE layers: ``track_moe_metrics`` runs one collective per entry."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in _enabled_losses(config):
        tracker.setdefault(name, {"values": torch.zeros(config.model.num_layers)})
        tracker[name].setdefault("reduce_group", None)
        tracker[name].setdefault("avg_group", None)
        tracker[name].setdefault("reduce_group_has_dp", False)


def collect(config, expert_load: ExpertLoad, num_microbatches: int, device) -> dict:
    """This iteration's router losses and expert load (see the module docstring); collective."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if "z_loss" in tracker:  # megatron-core saves it unreduced: average it like the tokens
        tracker["z_loss"]["avg_group"] = parallel_state.get_tensor_and_data_parallel_group()
    losses = {}
    moe_utils.track_moe_metrics(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        total_loss_dict=losses,
        track_names=_enabled_losses(config),
        num_layers=config.model.num_layers,
        moe_layer_freq=moe_layer_pattern(config.moe.moe_layer_freq, config.model.num_layers),
    )
    metrics = {TRACKED[name]: value.item() for name, value in losses.items()}
    metrics["moe_tokens_per_expert"] = expert_load.take(device)
    return metrics


def log_window(window: list, iteration: int, writer, logger) -> None:
    """Console + TensorBoard for the metrics of a window's updating iterations: the mean router
    losses, and per MoE layer the tokens per expert over the window with the imbalance
    max / mean (1: perfectly balanced; E / k: every token on the same k experts)."""
    if not window:
        return
    losses = {
        key: sum(m[key] for m in window) / len(window)
        for key in TRACKED.values()
        if key in window[0]
    }
    counts = sum(m["moe_tokens_per_expert"] for m in window)  # [layers, E]
    moe_layers = (counts.sum(-1) > 0).nonzero().flatten().tolist()  # dense rows stay 0
    imbalance = counts.max(-1).values / counts.mean(-1).clamp(min=1e-12)  # max / mean
    parts = [f"{key.removeprefix('moe_').replace('_', ' ')} {v:.6f}" for key, v in losses.items()]
    parts.append(f"max expert load / mean {imbalance.max().item():.3f}")
    logger.info("  moe: " + " | ".join(parts))
    for layer in moe_layers:
        tokens = " ".join(str(int(n)) for n in counts[layer].tolist())
        logger.info(
            f"  moe layer {layer}: tokens per expert [{tokens}] | "
            f"max/mean {imbalance[layer].item():.3f}"
        )
    if writer is None:
        return
    for key, value in losses.items():
        writer.add_scalar(f"train/{key}", value, iteration)
    writer.add_scalar("train/moe_load_imbalance", imbalance.max().item(), iteration)
    for layer in moe_layers:
        row, experts = counts[layer], torch.arange(counts.shape[1], dtype=torch.float64)
        writer.add_scalar(f"moe/layer_{layer}/load_imbalance", imbalance[layer].item(), iteration)
        # one histogram bucket per expert index, its count the expert's tokens
        writer.add_histogram_raw(
            f"moe/layer_{layer}/tokens_per_expert",
            min=0,
            max=len(row) - 1,
            num=row.sum().item(),
            sum=(row * experts).sum().item(),
            sum_squares=(row * experts**2).sum().item(),
            bucket_limits=(experts + 0.5).tolist(),
            bucket_counts=row.tolist(),
            global_step=iteration,
        )
