"""Run megatron-core 0.16.1 on CPU (gloo): one opt-in set of call-site fixes.

megatron-core assumes CUDA in a handful of places: CUDA tensor factories, ``torch.cuda`` calls
and CUDA tensor-type checks, each listed below with what replaces it (found by running the
trainer and evaluator on CPU; tests/unit/compat/test_cpu.py and the multi-process trainer and
evaluator tests exercise them).
The trainer calls :func:`enable` only for ``--device cpu``; GPU runs never import this module.

What :func:`enable` changes, and nothing else:

1. A module-scoped stand-in for the name ``torch`` in the megatron modules listed in
   ``_CUDA_ASSUMING_MODULES``. The stand-in forwards every attribute to the real ``torch``
   except: tensor factories map ``device="cuda"`` (or an int / ``cuda:N``) to CPU, and
   ``torch.cuda`` becomes :class:`_CpuCuda` (``current_device() -> "cpu"``, no-op
   ``synchronize``/streams, RNG calls on the CPU generator). This covers the pipeline
   schedules' token counters, p2p receive buffers, DDP buffers, optimizer/clip-grad/grad-scaler
   scalars, the no-Apex l2 norm (``utils.local_multi_tensor_l2_norm``), RoPE's ``inv_freq`` move,
   ``GlobalMemoryBuffer``, the default causal masks, the sequence-parallel gather /
   reduce-scatter buffers (``tensor_parallel.mappings`` and the linear layers' backward) and
   the inference KV cache (``Attention._allocate_memory``, used by megatron-deft-eval).
2. The CUDA RNG tracker's private state getters/setters point at the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work.
3. Tensor-method call sites, patched only for the duration of the listed calls: the dtype
   dispatch in the optimizers and ``clip_grad_by_total_norm_fp32`` compares ``tensor.type()``
   with ``'torch.cuda.FloatTensor'`` (CPU tensors report the CUDA type name there), and
   ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings with PP > 1) calls
   ``weight.data.cuda()`` (a no-op for CPU tensors there).

4. MoE: the routers, the token dispatchers, the experts and ``moe_utils`` (the aux-loss
   tracker) are in the stand-in list of 1 (router weights moved to ``current_device()``, the
   alltoall dispatcher's ``torch.cuda.Stream`` and the event it synchronises on); its
   device-to-host copy of the split sizes returns numpy for host tensors too, as gloo's
   ``all_to_all_single`` needs lists, not tensors (``_patch_moe_host_copies``).

5. The RNG tracker's warning "CPU RNG state changed within GPU RNG context" is filtered out: on
   CPU the tracker's "CUDA" generator (2.) is the CPU generator, so every dropout inside
   ``fork()`` (attention dropout, and again when activation recomputation replays it) changes
   it by design (``_quiet_rng_fork_warning``).

The real ``torch`` module and all other modules stay untouched. Two CPU choices are plain
config, not patches (``megatron_deft.models.gpt.transformer_config``): fused kernels off, and
``batch_p2p_comm=False`` because gloo pairs a batched send-to-prev/send-to-next (interleaved
schedule, PP=2) with the wrong receive buffers.
"""

import contextlib
import functools
import importlib
import logging
import types

import torch

# Modules whose global name `torch` is replaced by the CPU stand-in.
_CUDA_ASSUMING_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    # MoE: the router's weights/buffers on current_device(), the alltoall dispatcher's
    # torch.cuda.Stream / tokens-per-expert counters, the experts' and tracker's buffers
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.experts",
)

# Tensor factories that accept a `device=` keyword and are called with "cuda" in megatron.
_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
)

_enabled = False


def _cpu_device(device):
    """Map any CUDA device spelling (str, int, torch.device) to "cpu"; keep others."""
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return factory(*args, **kwargs)

    return wrapper


class _NoStream:
    """Stand-in for a CUDA stream/event: every synchronisation is a no-op on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        """An event that is already complete (the alltoall dispatcher synchronises on it)."""
        return _NoStream()

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _CpuCuda:
    """The subset of ``torch.cuda`` megatron-core touches, answered for a CPU process."""

    Stream = _NoStream
    Event = _NoStream

    def __init__(self):
        self.random = types.SimpleNamespace(
            get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state
        )

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    @staticmethod
    def default_stream(device=None):
        return _NoStream()

    current_stream = default_stream

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Module-scoped stand-in for ``torch``: real torch except CUDA devices and ``torch.cuda``."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_scoped_depth = 0  # the wrapped calls nest (DistributedOptimizer.__init__ -> _build_...)


@contextlib.contextmanager
def _cuda_tensor_methods():
    """Inside: ``cpu_tensor.type()`` answers 'torch.cuda.<X>Tensor' (megatron's dtype dispatch)
    and ``cpu_tensor.cuda()`` returns the tensor itself (tied-embedding setup)."""
    global _scoped_depth
    if _scoped_depth:
        yield
        return
    saved = {name: torch.Tensor.__dict__.get(name) for name in ("type", "cuda")}
    real_type, real_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    def stay_on_cpu(self, *args, **kwargs):
        return self if self.device.type == "cpu" else real_cuda(self, *args, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = cuda_named_type, stay_on_cpu
    _scoped_depth += 1
    try:
        yield
    finally:
        _scoped_depth -= 1
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def _scoped(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_tensor_methods():
            return fn(*args, **kwargs)

    return wrapper


def _patch_tensor_method_call_sites():
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clipped = _scoped(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clipped
    optimizer.clip_grad_by_total_norm_fp32 = clipped  # imported by name there
    float16 = optimizer.Float16OptimizerWithFloat16Params
    float16.__init__ = _scoped(float16.__init__)
    dist = distrib_optimizer.DistributedOptimizer
    dist.__init__ = _scoped(dist.__init__)
    build = dist.__dict__["_build_model_and_main_param_groups"].__func__
    dist._build_model_and_main_param_groups = classmethod(_scoped(build))
    # language_module.py:244 moves the tied output weight with `.cuda()` before all-reducing it.
    LanguageModule.setup_embeddings_and_output_layer = _scoped(
        LanguageModule.setup_embeddings_and_output_layer
    )


def _patch_rng_state_accessors():
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )


def _patch_moe_host_copies():
    """The alltoall dispatcher asks ``maybe_move_tensor_to_cpu(t, as_numpy=True)`` for its split
    sizes, which returns a tensor already on the host unchanged (not as numpy), and gloo's
    ``all_to_all_single`` then refuses tensor split sizes: host tensors become numpy too."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host  # imported by name there


def _quiet_rng_fork_warning():
    """Drops the tracker's CPU-RNG-changed warning (item 5 of the module docstring)."""
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )


def enable() -> None:
    """Apply the CPU fixes to megatron-core. Idempotent; call before building the model."""
    global _enabled
    if _enabled:
        return
    stand_in = _TorchOnCpu()
    for module_name in _CUDA_ASSUMING_MODULES:
        importlib.import_module(module_name).torch = stand_in
    _patch_rng_state_accessors()
    _patch_tensor_method_call_sites()
    _patch_moe_host_copies()
    _quiet_rng_fork_warning()
    _enabled = True


def is_enabled() -> bool:
    """True once :func:`enable` ran in this process."""
    return _enabled
