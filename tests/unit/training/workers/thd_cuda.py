"""torchrun worker (1 rank, CUDA, bf16): packed THD on the GPU's own attention (auto: te with
Transformer Engine, else flex) vs megatron-core's unfused attention on the dense mask.

Writes OUT_DIR/results.json; tests/unit/training/test_thd_cuda.py asserts on it.
"""

import sys

import torch.distributed as dist
from common import write_results
from single_process import thd_matches_dense_mask


def main(out_dir):
    result = {}
    thd_matches_dense_mask(result, "auto", ["--device", "cuda", "--bf16"])
    write_results(out_dir, {"thd_vs_dense": result})


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
