"""Fixes for megatron-core 0.16.1 bugs that hit every device (CPU and GPU alike).

Unlike :mod:`megatron_deft.compat.cpu` (CPU-only call-site patches, never imported by GPU runs),
these are applied by the trainer on every device, before the model is built:

1. ``megatron.core.transformer.moe.moe_utils`` imports ``te_general_gemm`` only when
   Transformer Engine is importable, yet ``RouterGatingLinearFunction`` (the router's gate
   GEMM, ``router_gating_linear``) tests ``te_general_gemm is not None`` unconditionally: without
   TE (CPU, or a plain-PyTorch GPU install) every MoE forward stops with ``NameError:
   name 'te_general_gemm' is not defined``. The fix defines the name as None there, so the gate
   takes megatron-core's own ``torch.mm`` path.
"""

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
