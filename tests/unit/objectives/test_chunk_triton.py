"""The fused output layer's Triton chunk kernels (``chunk_triton``) against float64: each kernel
alone, and the whole fused loss with ``kernel="triton"``. On CPU they run through Triton's
interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py sets without CUDA), compiled on
a GPU (the cuda-marked case, which the GPU self-check runs). Skipped where triton is not
importable."""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton (the interpreter on CPU)", allow_module_level=True)
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py

from megatron_deft.objectives import chunk_triton, linear_vocab_parallel_loss  # noqa: E402
from megatron_deft.objectives.linear_vocab_parallel import default_kernel  # noqa: E402
from tests.unit.objectives.test_linear_vocab_parallel import (  # noqa: E402
    VOCAB,
    assert_close,
    float64_reference,
    fused,
    make_inputs,
)

# the interpreter warns of -inf - -inf in masked lanes (whose results the kernels never use)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
ROWS, COLUMNS, REAL = 6, 2600, 2500  # three column steps of 1024, the last partial; 100 padding


def chunk(dtype, device="cpu", seed=0):
    """Logits [ROWS, COLUMNS] (scale ~4, each row's max in another column step), the targets'
    columns and which rows own theirs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, COLUMNS, generator=g, dtype=torch.float64) * 4
    logits[torch.arange(ROWS), torch.tensor([5, 1030, 2100, 2499, 40, 1500])] = 20.0
    logits[:, REAL:] = 50.0  # padding ids: counted, they would win every max
    column = torch.randint(0, REAL, (ROWS,), generator=g)
    owns = torch.tensor([True, False, True, True, False, True])
    return logits.to(dtype).to(device), column.to(device), owns.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_match_float64(dtype):
    logits, column, owns = chunk(dtype)
    out = chunk_triton.chunk_partials(logits, column, owns, REAL)
    z = logits.double()[:, :REAL]  # the kernel reads the same rounded logits
    m = z.amax(-1)
    t = torch.where(owns, z.gather(-1, column.unsqueeze(-1)).squeeze(-1), 0.0)
    s1, s2 = (z - m[:, None]).exp().sum(-1), (2 * (z - m[:, None])).exp().sum(-1)
    assert out.dtype == torch.float32 and out.shape == (ROWS, 4)
    assert torch.equal(out[:, 0].double(), m)
    for what, ours, ref in zip(("z_y", "S1", "S2"), out[:, 1:].unbind(-1), (t, s1, s2)):
        assert_close(ours, ref, 1e-5, 1e-6, what)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_logits_grad_matches_float64(dtype, tol):
    """A column block whose padding starts at REAL; rows 1 and 4 have no target in it (-1)."""
    logits, column, _ = chunk(dtype, seed=1)
    column[[1, 4]] = -1
    g = torch.Generator().manual_seed(2)
    row_max = logits.float()[:, :REAL].amax(-1) + torch.rand(ROWS, generator=g)
    scale, onehot = torch.rand(ROWS, generator=g), torch.rand(ROWS, generator=g)
    z = logits.double()
    ref = (z - row_max.double()[:, None]).exp() * scale.double()[:, None]
    ref[:, REAL:] = 0
    rows = torch.arange(ROWS)[column >= 0]
    ref[rows, column[rows]] -= onehot.double()[rows]
    out = chunk_triton.logits_grad_(logits, row_max, scale, onehot, column, REAL)
    assert out.data_ptr() == logits.data_ptr() and out.dtype == dtype
    assert_close(out, ref, tol, 1e-7, "d logits")


@pytest.mark.parametrize("objective", ["nll", "deft", "cayley", "eaft:k=3", "p_top:0.05"])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_fused_loss_matches_float64(objective, chunk_size):
    """fp32 through both kernels, the last 5 ids padding: loss, d hidden, d weight, stats."""
    hidden, weight, target, mask = make_inputs(seed=4, dtype=torch.float32)
    weight[-5:] = 4.0
    target = target.clamp(max=VOCAB - 6)
    loss, stats, d_hidden, d_weight = fused(
        hidden,
        weight,
        target,
        objective,
        mask,
        vocab_size=VOCAB - 5,
        chunk_size=chunk_size,
        kernel="triton",
    )
    ref_loss, ref_stats, ref_dh, ref_dw = float64_reference(
        hidden, weight[:-5], target, objective, mask
    )
    assert_close(loss, ref_loss, 2e-5, 2e-6, "loss")
    assert_close(d_hidden, ref_dh, 2e-5, 2e-6, "d hidden")
    assert_close(d_weight[:-5], ref_dw, 2e-5, 2e-6, "d weight")
    assert torch.count_nonzero(d_weight[-5:]) == 0
    for name, value in ref_stats.items():
        assert_close(stats[name], value, 2e-5, 2e-6, name)


@pytest.mark.parametrize("objective", ["nll", "deft", "eaft"])
def test_bf16_follows_the_torch_kernels(objective):
    """bf16: the Triton path reads the bf16 logits directly (no fp32 copy) and hands d logits on
    in bf16; loss as the PyTorch path's, gradients to bf16 rounding."""
    hidden, weight, target, mask = make_inputs(seed=6, dtype=torch.bfloat16)
    ours = fused(hidden, weight, target, objective, mask, chunk_size=4, kernel="triton")
    ref = fused(hidden, weight, target, objective, mask, chunk_size=4, kernel="torch")
    assert ours[2].dtype == ours[3].dtype == torch.bfloat16
    assert_close(ours[0], ref[0], 1e-5, 1e-6, "loss")
    assert_close(ours[2], ref[2], 2e-2, 2e-2, "d hidden")
    assert_close(ours[3], ref[3], 2e-2, 2e-2, "d weight")


def test_the_kernel_option():
    hidden, weight, target, _ = make_inputs(dtype=torch.float32)
    assert default_kernel(hidden) == "torch"  # CPU tensors: PyTorch ops unless asked
    with pytest.raises(ValueError, match=r"kernel must be one of \['torch', 'triton'\]"):
        fused(hidden, weight, target, "nll", kernel="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["nll", "deft", "cayley", "eaft"])
def test_compiled_on_the_gpu(objective):
    """Compiled, on CUDA, at 1024 tokens x 50000 ids (200 of them padding), h 256: the default
    kernel is Triton; fp32 against float64, bf16 against the PyTorch kernels."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1024, 1, 256, generator=g, dtype=torch.float64)
    weight = torch.randn(50000, 256, generator=g, dtype=torch.float64) * 0.2
    target = torch.randint(0, 49800, (1024, 1), generator=g)
    target[::7] = -100
    upstream = torch.linspace(0.5, 1.5, 1024, device="cuda")[:, None]

    def run(dtype, kernel):
        h = hidden.to("cuda", dtype).requires_grad_(True)
        w = weight.to("cuda", dtype).requires_grad_(True)
        kernel = kernel or default_kernel(h)
        loss, stats = linear_vocab_parallel_loss(
            h, w, target.cuda(), objective, vocab_size=49800, kernel=kernel
        )
        (loss * upstream).sum().backward()
        return kernel, {"loss": loss, "gate": stats["gate"], "d hidden": h.grad, "d weight": w.grad}

    _, reference = run(torch.float64, "torch")
    for (dtype, tol), baseline in [
        ((torch.float32, 1e-4), reference),
        ((torch.bfloat16, 2e-2), None),
    ]:
        kernel, ours = run(dtype, None)
        assert kernel == "triton"
        baseline = baseline or run(dtype, "torch")[1]
        for what, ref in baseline.items():
            scale = ref.abs().max().item()
            assert_close(ours[what], ref, tol, tol * 0.1 * scale, f"{dtype} {what}")
