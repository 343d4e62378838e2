"""compat.megatron_fixes: megatron-core 0.16.1 bugs that hit every device. Without Transformer
Engine the router's gate GEMM (moe_utils.router_gating_linear) stops with a NameError; after
``apply()`` it is x W^T, with the gradients of x W^T (float64 reference)."""

import subprocess
import sys

import pytest
import torch

ROUTER_GEMM = """
import torch
from megatron.core.transformer.moe import moe_utils
moe_utils.router_gating_linear(torch.ones(3, 4), torch.ones(2, 4), None, torch.float32)
"""


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_te_importable(), reason="the bug needs Transformer Engine absent")
def test_router_gate_gemm_fails_without_the_fix():
    done = subprocess.run(
        [sys.executable, "-c", ROUTER_GEMM], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "NameError: name 'te_general_gemm' is not defined" in done.stderr


def test_router_gate_gemm_after_the_fix_is_x_w_transposed():
    from megatron.core.transformer.moe import moe_utils

    from megatron_deft.compat import megatron_fixes

    megatron_fixes.apply()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=generator, requires_grad=True)  # [s, b, h]
    w = torch.randn(4, 8, generator=generator, requires_grad=True)  # [E, h]
    logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
    upstream = torch.randn(2, 5, 4, generator=generator)
    (logits * upstream).sum().backward()
    x64, w64 = x.detach().double(), w.detach().double()
    assert torch.allclose(logits.double(), x64 @ w64.T, atol=1e-5)
    assert torch.allclose(x.grad.double(), upstream.double() @ w64, atol=1e-5)
    expected_w = upstream.double().reshape(-1, 4).T @ x64.reshape(-1, 8)
    assert torch.allclose(w.grad.double(), expected_w, atol=1e-5)
