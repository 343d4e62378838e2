"""Which core attention runs (``--attention-backend``), decided once from the flag, the device
and whether Transformer Engine is importable.

========  =====================================================  ======================  ==========
backend   attention kernel                                       packed rows             where
========  =====================================================  ======================  ==========
te        Transformer Engine's fused attention (flash / cuDNN),  THD (cu_seqlens)        CUDA + TE
          TE layer spec
flex      ``flex_attention``, document-causal block mask         THD                     CUDA
sdpa      causal ``scaled_dot_product_attention`` per sample     THD                     anywhere
unfused   megatron-core's local attention, [b, 1, s, s] mask     dense block mask        anywhere
========  =====================================================  ======================  ==========

``auto`` picks te > flex (CUDA without TE) > sdpa (CPU, or where flex cannot run: attention
dropout, head size under ``FLEX_MIN_HEAD_SIZE``). An explicit choice the machine cannot run is a
:class:`ConfigError` (one line at startup), never a silent fall back.
"""

from megatron_deft.conventions import ConfigError

try:  # optional GPU dependency
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # CPU machines and plain-PyTorch GPU installs
    HAVE_TE = False

DESCRIPTIONS = {
    "te": "Transformer Engine fused attention (THD for packed rows)",
    "flex": "FlexAttention, document-causal block mask (THD for packed rows)",
    "sdpa": "causal scaled_dot_product_attention per packed sample (THD for packed rows)",
    "unfused": "megatron-core unfused attention on a dense [b, 1, s, s] mask",
}
"""backend -> what runs (the startup log line)."""

FLEX_MIN_HEAD_SIZE = 16
"""The compiled flex_attention kernel's smallest head size (torch 2.11's inductor: "embedding
dimension of the query, key, and value must be at least 16"; seen on an H200)."""


def _impossible(backend, device, have_te, attention_dropout, head_size):
    """Why ``backend`` cannot run here (None if it can)."""
    if backend == "te" and not (device == "cuda" and have_te):
        return "needs --device cuda with Transformer Engine installed"
    if backend == "flex" and device != "cuda":
        return "needs --device cuda (FlexAttention has no CPU backward)"
    if backend == "flex" and attention_dropout > 0:
        return "has no attention dropout; use --attention-dropout 0 or another backend"
    if backend == "flex" and head_size < FLEX_MIN_HEAD_SIZE:
        return f"needs a head size of at least {FLEX_MIN_HEAD_SIZE}, got {head_size}"
    return None


def resolve(
    requested: str,
    device: str,
    have_te: bool = HAVE_TE,
    attention_dropout: float = 0.0,
    head_size: int = 128,
) -> str:
    """The backend that runs for ``--attention-backend requested`` (ConfigError if it cannot)."""
    if requested == "auto":
        requested = "te" if device == "cuda" and have_te else "flex" if device == "cuda" else "sdpa"
        if _impossible(requested, device, have_te, attention_dropout, head_size):
            requested = "sdpa"  # runs anywhere, with dropout and any head size
    why = _impossible(requested, device, have_te, attention_dropout, head_size)
    if why is not None:
        raise ConfigError(f"--attention-backend {requested} {why}")
    return requested


def backend_of(config) -> str:
    """The backend a run's config resolves to (see :func:`resolve`)."""
    return resolve(
        config.model.attention_backend,
        config.training.device,
        attention_dropout=config.model.attention_dropout,
        head_size=config.model.head_size,
    )
