"""Live bytes of the tensors the GPU role allocates, and their peak, on a host without a device allocator
to ask.

On CUDA `torch.cuda.max_memory_allocated` is the answer. On a CPU-only host the CPU plays the GPU, and
its allocator keeps no statistics, so the engine counts for itself: while a GPU-role task runs, a
`TorchDispatchMode` sees every aten op, and each op output that owns new storage (its schema declares
no alias, so views and in-place results are skipped) is counted until that storage is freed (a weak
reference to the storage, which torch keeps one Python object per storage for). What is counted: the
activations, intermediates and copies of the GPU role; not counted: the pools (allocated before), and
what tasks on the CPU side allocate.

torch's own `torch.distributed._tools.mem_tracker.MemTracker` works the same way but is built around
nn.Module hooks and one thread; the engine's tasks run on several worker threads and are plain
functions, so each task enters its own small mode over one shared counter.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class ActivationTracker:
    """Counts the live bytes of storages allocated inside `tracking()` blocks (any thread), and the peak."""

    def __init__(self) -> None:
        # torch imports torch._dynamo lazily, the first time a dispatch mode runs an op; that import
        # leaves its caller's frames (the running task's tensors) in a reference cycle until the garbage
        # collector happens to run, so the first task's peak would depend on the collector. Imported here.
        import torch._dynamo  # noqa: F401

        self._lock = threading.Lock()
        self._host = threading.local()   # `host_side`, per worker thread
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        with self._lock:
            if key in self._live:
                return
            nbytes = st.nbytes()
            self._live[key] = (nbytes, weakref.ref(st, lambda _ref, key=key: self._release(key)))
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        with self._lock:
            nbytes, _ = self._live.pop(key, (0, None))
            self.current -= nbytes

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.current

    @contextmanager
    def tracking(self):
        """Count what the ops run on this thread inside the block allocate."""
        with _Counting(self):
            yield

    @contextmanager
    def host_side(self):
        """Inside a counted task, ops whose outputs a GPU run keeps in host memory (a gather on the CPU side
        of the link before its copy crosses): not counted, on this thread."""
        self._host.on = True
        try:
            yield
        finally:
            self._host.on = False


class _Counting(TorchDispatchMode):
    def __init__(self, tracker: ActivationTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(self.tracker._host, "on", False):
            return out
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) and len(returns) == len(out) else (out,)
        for ret, o in zip(returns, outs):
            if ret.alias_info is None:   # new storage (views and in-place results alias an input)
                for t in tree_leaves(o):
                    if isinstance(t, torch.Tensor):
                        self.tracker.add(t)
        return out
