"""Fixes for megatron-core 0.16.1 bugs that hit every device (CPU and GPU alike).

Unlike :mod:`megatron_deft.compat.cpu` (CPU-only call-site patches, never imported by GPU runs),
these are applied by the trainer on every device, before the model is built (1 by ``apply``, 2 by
the model config, which asks ``masked_softmax_kernel_importable``):

1. ``megatron.core.transformer.moe.moe_utils`` imports ``te_general_gemm`` only when
   Transformer Engine is importable, yet ``RouterGatingLinearFunction`` (the router's gate
   GEMM, ``router_gating_linear``) tests ``te_general_gemm is not None`` unconditionally: without
   TE (CPU, or a plain-PyTorch GPU install) every MoE forward stops with ``NameError:
   name 'te_general_gemm' is not defined``. The fix defines the name as None there, so the gate
   takes megatron-core's own ``torch.mm`` path.
2. ``FusedScaleMaskSoftmax.is_kernel_available`` (the local attention's softmax, with
   ``masked_softmax_fusion``) imports the compiled extension ``scaled_masked_softmax_cuda``
   without a guard once a bf16 / fp16 input fits the kernel's shapes: on a GPU without Megatron's
   fused kernels (a plain PyTorch install) the first such attention forward stops with
   ``ModuleNotFoundError`` (seen on an H200, torch 2.11). The fusion is asked for only where the
   extension imports; elsewhere megatron-core's torch softmax runs.
"""

import importlib.util

_applied = False


def apply() -> None:
    """Apply the fixes (idempotent)."""
    global _applied
    if _applied:
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # TE absent: the import never bound it
        moe_utils.te_general_gemm = None
    _applied = True


def masked_softmax_kernel_importable() -> bool:
    """Whether megatron-core's fused masked softmax can run (fix 2)."""
    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None
