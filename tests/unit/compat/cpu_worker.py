"""torchrun worker (2 ranks) for the CPU compat layer: enable() is idempotent and leaves the
real torch alone; a TP=2 GPT's gathered logits equal the TP=1 GPT's (same layout-invariant init)."""

import sys

import torch
import torch.distributed as dist
from common import config_for, logits_of, write_results

from megatron_deft.training.trainer import Trainer


def full_logits(trainer) -> torch.Tensor:
    """[b, s, V] logits of the first training micro-batch, vocab shards gathered over TP."""
    from megatron.core import parallel_state

    # DP rank 0's first micro-batch on every rank (with TP=1 the two ranks are DP replicas).
    shared = [trainer.train_loader.next_global_batch().microbatches[0]]
    dist.broadcast_object_list(shared, src=0)
    batch = shared[0]
    with torch.no_grad():
        shard = logits_of(trainer.model[0].module, batch["tokens"], batch["position_ids"], None)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def main(out_dir):
    from megatron.core.pipeline_parallel import schedules

    from megatron_deft.compat import cpu

    result = {}
    tp2 = Trainer(config_for(2, 1))  # enables the compat layer
    stand_in = schedules.torch
    cpu.enable()
    result["stand_in_unchanged"] = schedules.torch is stand_in and stand_in is not torch
    result["stand_in_maps_cuda"] = str(schedules.torch.zeros(1, device="cuda").device)
    result["real_torch_cuda_available"] = torch.cuda.is_available()
    result["real_type_name"] = torch.zeros(1).type()
    result["tensor_methods_restored"] = "type" not in torch.Tensor.__dict__ and (
        "cuda" not in torch.Tensor.__dict__
    )
    logits_tp2 = full_logits(tp2)
    tp2.close(keep_process_group=True)
    tp1 = Trainer(config_for(1, 1))  # DP=2, TP=1
    logits_tp1 = full_logits(tp1)
    tp1.close(keep_process_group=True)
    result["logits_shape"] = list(logits_tp1.shape)
    result["logits_max_abs_difference"] = (logits_tp2 - logits_tp1).abs().max().item()
    result["logits_scale"] = logits_tp1.abs().max().item()
    write_results(out_dir, result)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
