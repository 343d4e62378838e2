"""Peak memory of a call: the high-water mark of allocations above what was allocated before it.

On CUDA this is the caching allocator's statistics. On CPU there is no allocator counter, so the
profiler's allocation/free events are replayed in time order; the result is a property of the code
(which buffers it allocates and when it frees them), independent of machine load.
"""

import contextlib
import os
from typing import Callable

import torch


@contextlib.contextmanager
def stderr_silenced():
    """Redirects file descriptor 2 (the CPU profiler's native code prints start/stop lines
    there)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Runs fn() once and returns its peak allocated bytes above the allocation level before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
